"""Discrete sequence chunking (DSC): chunks in a small network's states.

1. Each neuron is discretised on its own by exact 1-D k-means (dynamic
   programming over the sorted values; labels ordered by centre, 0 = lowest).
2. The population state at ``t`` is the tuple of the ``H`` labels; distinct
   tuples get integer state ids in order of first appearance.
3. Chunks are learned like byte-pair encoding over the state-id sequence:
   parse by longest match, count adjacent pairs of the parse, add the most
   frequent pairs seen at least ``min_count`` times as new chunks, repeat for
   ``rounds`` rounds.
4. A state goes back to a vector with each neuron at its centre: the vector
   written into the network when grafting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from chunktui.rnn.parse import Piece, longest_match_parse


# ---------------------------------------------------------------- 1-D k-means
def kmeans_1d(values, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact 1-D k-means (minimum within-cluster sum of squares).

    Returns ``centres`` (k',) ascending and ``labels`` (n,) with label ``j``
    meaning centre ``j``. ``k' = min(k, #distinct values)``. Clusters of sorted
    data are contiguous, so the optimum is a DP over split points:
    ``D[m][i] = min_j D[m-1][j] + SSE(j..i-1)`` with SSE from prefix sums.
    Ties break toward the earliest split, so results are deterministic.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("kmeans_1d needs at least one value")
    # Work on distinct values with multiplicities: cheaper, and identical optimum.
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    n = uniq.size
    k = max(1, min(k, n))
    w = counts.astype(np.float64)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cx = np.concatenate([[0.0], np.cumsum(w * uniq)])
    cxx = np.concatenate([[0.0], np.cumsum(w * uniq * uniq)])

    def sse(j: np.ndarray, i: int | np.ndarray) -> np.ndarray:
        """Cost of one cluster holding distinct values j..i-1 (j < i)."""
        cnt = cw[i] - cw[j]
        s = cx[i] - cx[j]
        return np.maximum(cxx[i] - cxx[j] - s * s / cnt, 0.0)

    # D[m, i]: best cost of the first i distinct values in m clusters;
    # arg[m, i]: start of the last cluster. The leftmost optimal start is
    # non-decreasing in i (the SSE cost obeys the quadrangle inequality), so
    # each layer is solved by divide and conquer, vectorised over all the
    # sub-problems of one recursion depth: O(k n log n) instead of O(k n^2).
    D = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    D[0, 0] = 0.0
    for m in range(1, k + 1):
        # Segments (ilo, ihi, jlo, jhi): ends ilo..ihi, optimal start within jlo..jhi.
        ilo, ihi = np.array([m]), np.array([n])
        jlo, jhi = np.array([m - 1]), np.array([n - 1])
        while ilo.size:
            mid = (ilo + ihi) // 2
            top = np.minimum(jhi, mid - 1)
            cnt = top - jlo + 1                                        # >= 1 by construction
            seg = np.repeat(np.arange(mid.size), cnt)
            offs = np.concatenate([[0], np.cumsum(cnt)[:-1]])
            j = jlo[seg] + np.arange(seg.size) - offs[seg]
            cost = D[m - 1, j] + sse(j, mid[seg])
            order = np.lexsort((j, cost, seg))                         # per segment: cheapest, then earliest
            first = order[offs]
            best_j = j[first]
            arg[m, mid] = best_j
            D[m, mid] = cost[first]
            left = ilo <= mid - 1
            right = mid + 1 <= ihi
            ilo, ihi, jlo, jhi = (np.concatenate([ilo[left], mid[right] + 1]),
                                  np.concatenate([mid[left] - 1, ihi[right]]),
                                  np.concatenate([jlo[left], best_j[right]]),
                                  np.concatenate([best_j[left], jhi[right]]))
    # Backtrack split points.
    bounds = [n]
    for m in range(k, 0, -1):
        bounds.append(int(arg[m, bounds[-1]]))
    bounds = bounds[::-1]                                              # 0 = b0 < b1 < ... < bk = n
    centres = np.array([(cx[b] - cx[a]) / (cw[b] - cw[a]) for a, b in zip(bounds[:-1], bounds[1:])])
    uniq_label = np.searchsorted(np.array(bounds[1:]), np.arange(n), side="right")
    return centres, uniq_label[inverse]


def kmeans_1d_robust(values, k: int, seed: int = 0, n_init: int = 8, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Seeded robust 1-D clustering: k-medians (Lloyd steps with cluster MEDIANS, so a few
    outlying values cannot drag a centre), k-means++-style seeding, the best of ``n_init``
    starts by total absolute deviation. Same return as :func:`kmeans_1d`; same seed, same result."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("kmeans_1d_robust needs at least one value")
    uniq = np.unique(x)
    k = max(1, min(k, uniq.size))
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(n_init):
        centres = [float(rng.choice(uniq))]
        while len(centres) < k:                                  # ++ seeding on distances
            d = np.abs(uniq[:, None] - np.array(centres)[None]).min(1)
            centres.append(float(rng.choice(uniq, p=d / d.sum())))
        c = np.sort(np.array(centres))
        for _ in range(iters):
            lab = assign_1d(x, c)
            new = np.array([np.median(x[lab == j]) if np.any(lab == j) else c[j] for j in range(k)])
            new = np.sort(new)
            if np.allclose(new, c):
                break
            c = new
        cost = float(np.abs(x - c[assign_1d(x, c)]).sum())
        if best is None or cost < best[0] - 1e-12:
            best = (cost, c)
    centres = best[1]
    return centres, assign_1d(x, centres)


def assign_1d(values, centres: np.ndarray) -> np.ndarray:
    """Label of the nearest centre (ties to the lower one): applies a fit to new data."""
    v = np.asarray(values, dtype=np.float64)[..., None]
    return np.abs(v - np.asarray(centres)[None, :]).argmin(-1)


# ---------------------------------------------------------------- discretiser
@dataclass
class Discretiser:
    """Per-neuron k-means fit. ``centres[n]`` are neuron ``n``'s centres, ascending."""

    centres: list[np.ndarray]

    @classmethod
    def fit(cls, states: np.ndarray, k: int = 4, method: str = "exact", seed: int = 0) -> "Discretiser":
        """``states`` (T,H) -> one 1-D clustering per neuron: ``exact`` k-means (DP) or
        ``robust`` seeded k-medians (:func:`kmeans_1d_robust`)."""
        if method == "exact":
            return cls([kmeans_1d(states[:, n], k)[0] for n in range(states.shape[1])])
        if method == "robust":
            return cls([kmeans_1d_robust(states[:, n], k, seed=seed + n)[0] for n in range(states.shape[1])])
        raise ValueError(f"method must be 'exact' or 'robust', got {method!r}")

    def labels(self, states: np.ndarray) -> np.ndarray:
        """(T,H) float -> (T,H) int labels."""
        return np.stack([assign_1d(states[:, n], c) for n, c in enumerate(self.centres)], axis=1)

    def tuples(self, states: np.ndarray) -> list[tuple[int, ...]]:
        return [tuple(int(v) for v in row) for row in self.labels(states)]

    def vector(self, state: tuple[int, ...]) -> np.ndarray:
        """A discrete state back to a vector: each neuron at its centre. (H,)"""
        return np.array([self.centres[n][lab] for n, lab in enumerate(state)])

    def to_json(self) -> dict:
        return {"centres": [c.tolist() for c in self.centres]}


def state_ids(tuples: list[tuple[int, ...]]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Integer id per distinct state tuple, in order of first appearance."""
    index: dict[tuple[int, ...], int] = {}
    ids = np.array([index.setdefault(t, len(index)) for t in tuples], dtype=np.int64)
    return ids, list(index)


# ---------------------------------------------------------------- chunk learning
@dataclass
class ChunkParams:
    """Defaults: learn until no adjacent pair of the parse recurs (a pair seen
    twice is a chunk), 8 new chunks a round, most frequent first. ``rounds``
    only caps the work; on a 8,500-step run learning ends within ~60 rounds."""

    rounds: int = 1000         # learning rounds at most (each re-parses with longest match)
    min_count: int = 2         # a pair must be seen at least this often in the parse
    per_round: int = 8         # at most this many new chunks per round (most frequent first)


@dataclass
class DSCResult:
    vocabulary: dict[tuple, int]        # chunk (tuple of state ids) -> count in the final parse
    parse: list[Piece]                  # final longest-match parse of the state-id sequence
    learned: list[tuple] = field(default_factory=list)  # chunks added, in order

    @property
    def parse_length(self) -> int:
        return len(self.parse)


def count_pairs(parse: list[Piece]) -> Counter:
    """Adjacent (chunk, next chunk) pairs of a parse."""
    return Counter((a.chunk, b.chunk) for a, b in zip(parse[:-1], parse[1:]))


def learn_chunks(seq, params: ChunkParams | None = None) -> DSCResult:
    """Byte-pair-style chunk learning over ``seq`` (any hashable items)."""
    p = params or ChunkParams()
    items = tuple(seq)
    vocab: set[tuple] = {(s,) for s in items}
    learned: list[tuple] = []
    parse = longest_match_parse(items, vocab)
    for _ in range(p.rounds):
        pairs = count_pairs(parse)
        # Most frequent first; ties broken by the pair itself so the order is deterministic.
        ranked = sorted(((c, pair) for pair, c in pairs.items() if c >= p.min_count),
                        key=lambda cp: (-cp[0], repr(cp[1])))
        new = [a + b for _, (a, b) in ranked if a + b not in vocab][: p.per_round]
        if not new:
            break
        vocab.update(new)
        learned.extend(new)
        parse = longest_match_parse(items, vocab)
    counts = Counter(piece.chunk for piece in parse)
    vocabulary = dict(sorted(counts.items(), key=lambda kv: (-kv[1], repr(kv[0]))))
    return DSCResult(vocabulary, parse, learned)


@dataclass
class DSC:
    """The whole pipeline on one trajectory: discretiser, state ids, chunks."""

    discretiser: Discretiser
    states: list[tuple[int, ...]]       # id -> state tuple
    ids: np.ndarray                     # (T,) state id per step
    chunks: DSCResult

    @classmethod
    def run(cls, trajectory_states: np.ndarray, k: int = 4, params: ChunkParams | None = None,
            kmeans: str = "exact", seed: int = 0) -> "DSC":
        disc = Discretiser.fit(trajectory_states, k, method=kmeans, seed=seed)
        ids, states = state_ids(disc.tuples(trajectory_states))
        return cls(disc, states, ids, learn_chunks(ids.tolist(), params))

    @property
    def n_states(self) -> int:
        return len(self.states)

    def chunk_of_step(self) -> list[int]:
        """For every step ``t``, the index into ``chunks.parse`` of the chunk holding it."""
        out: list[int] = []
        for i, piece in enumerate(self.chunks.parse):
            out.extend([i] * len(piece))
        return out
