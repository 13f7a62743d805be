"""Unsupervised chunk discovery (docs/method.md section 4): chunks without labels.

At one layer, K learnable unit vectors u_k are fitted to the states h_t by the
max-cosine objective

    loss = - mean_t max_k cos(u_k, h_t)

so each token pulls only its best chunk towards itself (online spherical
k-means). We train it with Adam as METHOD describes, on large minibatches,
with the gradient written out by hand instead of autograd: for the winning
chunk k of token t, d cos / d u_k = h_t / |h_t| (then projected onto the
tangent of the unit sphere), which is one `index_add_` of the normalised
states. The only large operation per step is the (B, d) @ (d, K) similarity
matmul. After every Adam step the rows are renormalised (projected Adam), so
the learning rate keeps its meaning.

Dead chunks (no token won in the last `reseed_every` steps) are re-seeded on
the worst-covered tokens of the current batch (lowest best cosine), with
their Adam moments reset; reseeding stops after `reseed_until` of the steps
so the last re-seeded chunks can settle.

A discovered chunk is a direction plus a cosine threshold, calibrated from
the tokens it wins: the `threshold_quantile` quantile of their cosines (with
the default 0.1, 90 % of the tokens it wins match it). `typical` is the mean
projection <h, u> of those tokens, which grafting moves a state's component
to.

States are clustered raw (not centred): matching (`matching.py`) and
perturbation (`perturb.py`) use the raw cosine <h, u> / |h| and the raw
projection, so a chunk found here matches exactly the tokens it was
calibrated on. (LLaMA-family streams have a large shared mean direction,
cosine about 0.75 with most states on SmolLM2; clustering raw states still
beats both baselines, measured.) Centring is available (`centre=True`) for
experiments only: chunks record `extra["centred"]`, and matching would need
the same centring to agree.

Evaluation against labels (word identity, part-of-speech tags) uses the
normalised mutual information (arithmetic-mean normalisation) and purity of
the max-cosine assignment, compared with two baselines on the same tokens in
the same run: Euclidean k-means (k-means++ seeding, Lloyd iterations) with the
same K, and K random unit directions.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from chunktui.engine.dictionary import Chunk, chunk_id
from chunktui.shared.errors import CorpusError
from chunktui.shared.settings import ProgressFn
from chunktui.engine.corpus import HiddenStates, TokenTable

METHOD_NAME = "unsupervised-discovery"
COSINE_SLACK = 1e-5  # thresholds sit this far below the calibrating cosine (float32 vs float64 rounding)


def _quiet(stage: str, fraction: float | None, message: str) -> None:
    pass


@dataclass
class DiscoveryConfig:
    """Settings of one discovery run (all layers use the same)."""

    k: int = 256  # chunks per layer
    steps: int = 300  # Adam steps
    batch_size: int = 4096  # tokens per step (the whole corpus when smaller)
    lr: float = 0.03  # Adam learning rate, cosine-decayed to lr / 10
    seed: int = 0
    reseed_every: int = 20  # steps between dead-chunk checks
    reseed_until: float = 0.85  # fraction of the steps after which no chunk is re-seeded
    threshold_quantile: float = 0.1  # threshold = this quantile of the cosines of the tokens a chunk wins
    init: str = "data"  # "data": K distinct token states; "random": Gaussian directions
    centre: bool = False  # subtract the corpus mean first (experiments only: matching uses raw states)

    def check(self) -> None:
        if self.k < 1:
            raise CorpusError(f"--k must be at least 1, got {self.k}.")
        if self.steps < 1 or self.batch_size < 1:
            raise CorpusError("--steps and --batch-size must be at least 1.")
        if not 0.0 <= self.threshold_quantile < 1.0:
            raise CorpusError(f"threshold quantile must be in [0, 1), got {self.threshold_quantile}.")
        if self.init not in ("data", "random"):
            raise CorpusError(f"Unknown init '{self.init}': use 'data' or 'random'.")

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LayerDiscovery:
    """K directions fitted at one layer, and how the fitting tokens fall among them."""

    directions: torch.Tensor  # (K, d) unit rows
    threshold: torch.Tensor  # (K,) cosine thresholds (NaN for dead chunks)
    typical: torch.Tensor  # (K,) mean projection <h, u> of won tokens (NaN for dead chunks)
    wins: torch.Tensor  # (K,) tokens won (max cosine) on the fitting tokens
    assign: torch.Tensor  # (T,) index of the max-cosine chunk of each token
    best_cos: torch.Tensor  # (T,) its cosine
    reseeded: int  # chunks re-seeded during training
    seconds: float
    loss: list[float] = field(default_factory=list)  # mean best cosine, every reseed_every steps
    mean: torch.Tensor | None = None  # (d,) when centred

    @property
    def dead(self) -> torch.Tensor:
        return self.wins == 0

    @property
    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())


# --------------------------------------------------------------------------- fitting


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def assign_max_cosine(Xn: torch.Tensor, U: torch.Tensor, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Best chunk and its cosine for each row of Xn (T, d; unit rows) against U (K, d; unit rows)."""
    best_cos, best = [], []
    for a in range(0, Xn.shape[0], block):
        value, index = (Xn[a:a + block] @ U.T).max(1)
        best_cos.append(value)
        best.append(index)
    return torch.cat(best), torch.cat(best_cos)


@torch.no_grad()
def fit_directions(X: torch.Tensor, config: DiscoveryConfig, device: torch.device | str = "cpu",
                   progress: Callable[[float], None] | None = None) -> LayerDiscovery:
    """Fit config.k unit directions to the states X (T, d) by the max-cosine objective."""
    config.check()
    t0 = time.perf_counter()
    device = torch.device(device)
    X = X.to(device, torch.float32)
    T, d = X.shape
    if T == 0:
        raise CorpusError("No tokens to discover chunks in.")
    mean = None
    if config.centre:
        mean = X.mean(0)
        X = X - mean
    Xn = _normalise(X)  # (T, d)
    K = config.k
    g = torch.Generator(device="cpu").manual_seed(int(config.seed))

    if config.init == "data":
        # distinct tokens when there are enough; otherwise repeats with a little noise
        pick = torch.randperm(T, generator=g)[:K]
        if len(pick) < K:
            pick = torch.cat([pick, torch.randint(T, (K - len(pick),), generator=g)])
        C = Xn[pick.to(device)] + 0.01 * torch.randn(K, d, generator=g).to(device) / math.sqrt(d)
    else:
        C = torch.randn(K, d, generator=g).to(device)
    C = _normalise(C)
    param = torch.nn.Parameter(C)
    opt = torch.optim.Adam([param], lr=config.lr)
    batch = min(config.batch_size, T)
    order = torch.randperm(T, generator=g).to(device)
    cursor = 0
    window_wins = torch.zeros(K, dtype=torch.long, device=device)
    reseeded = 0
    history: list[float] = []
    stop_reseeding = int(config.reseed_until * config.steps)
    for step in range(config.steps):
        if cursor + batch > T:
            order = torch.randperm(T, generator=g).to(device)
            cursor = 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        xb = Xn[idx]  # (B, d)
        U = param.data  # unit rows (renormalised after every step)
        sim = xb @ U.T  # (B, K)
        best_cos, best = sim.max(1)
        window_wins += torch.bincount(best, minlength=K)
        # d(-mean max cos)/dU: -x_t / B summed into each token's winner, projected onto the sphere's tangent
        grad = torch.zeros_like(U).index_add_(0, best, xb, alpha=-1.0 / batch)
        grad -= U * (U * grad).sum(-1, keepdim=True)
        param.grad = grad
        for group in opt.param_groups:  # cosine decay to lr / 10
            group["lr"] = config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        opt.step()
        param.data = _normalise(param.data)
        if (step + 1) % config.reseed_every == 0:
            history.append(float(best_cos.mean()))
            dead = (window_wins == 0).nonzero().flatten()
            if len(dead) and step < stop_reseeding:
                # the worst-covered tokens of this batch, one per dead chunk
                worst = best_cos.argsort()[:len(dead)]
                n = len(worst)
                param.data[dead[:n]] = xb[worst]
                state = opt.state.get(param)
                if state:
                    state["exp_avg"][dead[:n]] = 0
                    state["exp_avg_sq"][dead[:n]] = 0
                reseeded += n
            window_wins.zero_()
            if progress is not None:
                progress((step + 1) / config.steps)

    U = param.data.detach()
    assign, best_cos = assign_max_cosine(Xn, U)
    wins = torch.bincount(assign, minlength=K)
    threshold, typical = calibrate(X, U, assign, best_cos, config.threshold_quantile)
    return LayerDiscovery(directions=U.cpu(), threshold=threshold.cpu(), typical=typical.cpu(), wins=wins.cpu(),
                          assign=assign.cpu(), best_cos=best_cos.cpu(), reseeded=reseeded,
                          seconds=time.perf_counter() - t0, loss=history, mean=None if mean is None else mean.cpu())


@torch.no_grad()
def calibrate(X: torch.Tensor, U: torch.Tensor, assign: torch.Tensor, best_cos: torch.Tensor,
              quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk: the `quantile` of the cosines of the tokens it wins, and their mean projection <h, u>.

    Chunks that win nothing get NaN for both. Vectorised: tokens sorted by
    (chunk, cosine), the quantile read at an offset inside each chunk's run.
    """
    K = U.shape[0]
    wins = torch.bincount(assign, minlength=K)
    proj = (X * U[assign]).sum(-1)  # (T,) <h_t, u_{assign t}>
    typical = torch.zeros(K, dtype=X.dtype, device=X.device).index_add_(0, assign, proj) / wins.clamp(min=1)
    # sort by chunk, then cosine: a lexicographic key on (assign, cos in [-1, 1])
    key = assign.double() * 4.0 + (best_cos.double() + 1.0)
    sorted_cos = best_cos[key.argsort()]
    starts = torch.cumsum(wins, 0) - wins
    offset = torch.floor(quantile * (wins - 1).clamp(min=0).double()).long()
    threshold = sorted_cos[(starts + offset).clamp(max=max(len(sorted_cos) - 1, 0))] if len(sorted_cos) else \
        torch.zeros(K, device=X.device)
    # minus a rounding slack: matching recomputes the cosine in float64, and a token exactly at the
    # threshold (e.g. a repeated sentence) must still match
    threshold = threshold - COSINE_SLACK
    nan = torch.tensor(float("nan"), device=X.device)
    return torch.where(wins > 0, threshold, nan), torch.where(wins > 0, typical, nan)


# --------------------------------------------------------------------------- baselines


@torch.no_grad()
def kmeans(X: torch.Tensor, k: int, seed: int = 0, iters: int = 30, device: torch.device | str = "cpu",
           block: int = 8192) -> torch.Tensor:
    """Euclidean k-means (k-means++ seeding, Lloyd iterations) -> (T,) cluster index. The baseline."""
    X = X.to(device, torch.float32)
    T = X.shape[0]
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    sq = (X * X).sum(-1)  # (T,)

    # k-means++: each new centre drawn with probability proportional to D^2
    first = int(torch.randint(T, (1,), generator=g))
    centres = [X[first]]
    d2 = (X - X[first]).square().sum(-1)
    for _ in range(1, min(k, T)):
        p = d2.clamp(min=0).double().cpu()
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=g)) if float(p.sum()) > 0 else \
            int(torch.randint(T, (1,), generator=g))
        centres.append(X[nxt])
        d2 = torch.minimum(d2, (X - X[nxt]).square().sum(-1))
    C = torch.stack(centres)
    assign = torch.zeros(T, dtype=torch.long, device=X.device)
    for _ in range(iters):
        c2 = (C * C).sum(-1)[None]
        assign = torch.cat([(sq[a:a + block, None] - 2 * X[a:a + block] @ C.T + c2).argmin(1)
                            for a in range(0, T, block)])
        counts = torch.bincount(assign, minlength=len(C))
        sums = torch.zeros_like(C).index_add_(0, assign, X)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], C)
        if torch.equal(new, C):
            break
        C = new
    return assign.cpu()


@torch.no_grad()
def random_directions(d: int, k: int, seed: int = 0) -> torch.Tensor:
    """K random unit directions (K, d), seeded. The second baseline."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    return _normalise(torch.randn(k, d, generator=g))


# --------------------------------------------------------------------------- evaluation


def contingency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, B) counts of label pairs; rows where either label is negative are left out."""
    keep = (a >= 0) & (b >= 0)
    a, b = a[keep].long(), b[keep].long()
    if len(a) == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    A, B = int(a.max()) + 1, int(b.max()) + 1
    return torch.bincount(a * B + b, minlength=A * B).reshape(A, B).double()


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def nmi(clusters: torch.Tensor, classes: torch.Tensor) -> float:
    """Normalised mutual information, I(U; V) / mean(H(U), H(V)) (arithmetic normalisation)."""
    table = contingency(clusters, classes)
    n = table.sum()
    if n == 0:
        return float("nan")
    pij = table / n
    pi, pj = pij.sum(1, keepdim=True), pij.sum(0, keepdim=True)
    nz = pij > 0
    mi = float((pij[nz] * (pij[nz] / (pi @ pj)[nz]).log()).sum())
    h = (_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2
    if h == 0:
        return 1.0  # both labelings are constant: identical
    return max(0.0, mi / h)


def purity(clusters: torch.Tensor, classes: torch.Tensor) -> float:
    """Fraction of tokens whose cluster's most common class is their class."""
    table = contingency(clusters, classes)
    n = float(table.sum())
    return float(table.max(1).values.sum()) / n if n else float("nan")


_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def token_tags(tokens: TokenTable, source: str, spans: Sequence[tuple[int, int, str]]) -> tuple[torch.Tensor, list[str]]:
    """One tag per token: the first span (by start) that its non-space characters overlap; -1 if none."""
    names = sorted({label for _, _, label in spans})
    code = {name: i for i, name in enumerate(names)}
    return _first_overlap(tokens, source, [(a, b, code[label]) for a, b, label in spans]), names


def word_identity(tokens: TokenTable, source: str) -> tuple[torch.Tensor, list[str]]:
    """One id per token: the lower-cased word (or punctuation mark) of the source it overlaps first; -1 if none."""
    words = [(m.start(), m.end(), m.group(0).lower()) for m in _WORD.finditer(source)]
    names = sorted({w for _, _, w in words})
    code = {name: i for i, name in enumerate(names)}
    return _first_overlap(tokens, source, [(a, b, code[w]) for a, b, w in words]), names


def _first_overlap(tokens: TokenTable, source: str, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """(T,) value of the first span (by start) overlapping each token's non-space characters, -1 if none."""
    T = len(tokens)
    out = torch.full((T,), -1, dtype=torch.long)
    if not spans or not T:
        return out
    spans = sorted(spans)
    none = len(spans)
    rank = [none] * (len(source) + 1)  # per character: rank of the first span covering it
    for r in range(len(spans) - 1, -1, -1):  # later spans first, so the earliest start wins
        a, b, _ = spans[r]
        rank[a:b] = [r] * (b - a)
    for t, (a, b) in enumerate(zip(tokens.starts, tokens.ends)):
        a += len(source[a:b]) - len(source[a:b].lstrip())
        if b > a:
            r = min(rank[a:b])
            if r < none:
                out[t] = spans[r][2]
    return out


@torch.no_grad()
def evaluate_assignments(assignments: dict[str, torch.Tensor], labelings: dict[str, torch.Tensor]) -> dict:
    """{method: {labeling: {"nmi", "purity", "tokens"}}} for each assignment (T,) against each labeling (T,)."""
    out: dict[str, dict] = {}
    for method, assign in assignments.items():
        out[method] = {}
        for name, classes in labelings.items():
            keep = classes >= 0
            out[method][name] = {"nmi": nmi(assign, classes), "purity": purity(assign, classes),
                                 "tokens": int(keep.sum())}
    return out


def evaluate_layer(X: torch.Tensor, found: LayerDiscovery, labelings: dict[str, torch.Tensor], seed: int = 0,
                   device: torch.device | str = "cpu", kmeans_iters: int = 30) -> tuple[dict, dict]:
    """NMI and purity of discovered chunks, k-means and random directions on the same tokens.

    Returns (scores, seconds per baseline)."""
    K, d = found.directions.shape
    X = X.float()
    if found.mean is not None:
        X = X - found.mean
    t0 = time.perf_counter()
    km = kmeans(X, K, seed=seed, iters=kmeans_iters, device=device)
    t1 = time.perf_counter()
    rnd, _ = assign_max_cosine(_normalise(X.to(device)), random_directions(d, K, seed).to(device))
    t2 = time.perf_counter()
    scores = evaluate_assignments({"discovered": found.assign, "kmeans": km, "random": rnd.cpu()}, labelings)
    return scores, {"kmeans": t1 - t0, "random": t2 - t1}


# --------------------------------------------------------------------------- discovery over a corpus


@dataclass
class DiscoveryReport:
    layers: dict[int, dict] = field(default_factory=dict)  # layer -> {"dead_fraction", "seconds", "evaluation", ...}
    tokens: int = 0
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "config": self.config,
                "layers": {str(layer): record for layer, record in sorted(self.layers.items())}}


def discover(hs: HiddenStates, config: DiscoveryConfig, spans: Sequence[tuple[int, int, str]] | None = None,
             evaluate: bool = True, device: torch.device | str = "cpu", card_examples: int = 3,
             progress: ProgressFn = _quiet) -> tuple[list[Chunk], DiscoveryReport]:
    """Discover config.k direction chunks at every layer of hs; evaluate against labels; write cards.

    Dead chunks (that win no token) are reported and left out of the result.
    """
    from chunktui.engine.cards import auto_label, build_cards

    config.check()
    report = DiscoveryReport(tokens=len(hs.tokens), config=config.to_json())
    labelings: dict[str, torch.Tensor] = {}
    if evaluate:
        labelings["word"] = word_identity(hs.tokens, hs.source)[0]
        if spans is not None:
            labelings["pos"] = token_tags(hs.tokens, hs.source, spans)[0]
    digest = hs.digest
    chunks: list[Chunk] = []
    for s, layer in enumerate(hs.layers):
        X = hs.H[:, s].float()
        base = s / len(hs.layers)
        progress("discover", base, f"layer {layer}: fitting {config.k} chunks")
        found = fit_directions(X, config, device,
                               progress=lambda f: progress("discover", base + f / len(hs.layers),
                                                           f"layer {layer}: fitting {config.k} chunks"))
        record = {"dead_fraction": found.dead_fraction, "dead": int(found.dead.sum()), "k": config.k,
                  "reseeded": found.reseeded, "seconds": found.seconds,
                  "mean_best_cosine": float(found.best_cos.mean())}
        if labelings:
            progress("evaluate", base, f"layer {layer}: k-means and random baselines")
            scores, seconds = evaluate_layer(X, found, labelings, seed=config.seed, device=device)
            record["evaluation"] = scores
            record["baseline_seconds"] = seconds
        report.layers[layer] = record
        live = (~found.dead).nonzero().flatten().tolist()
        layer_chunks = []
        for k in live:
            layer_chunks.append(Chunk(
                id=chunk_id(f"u{k:04d}", layer, kind="direction"), label=f"u{k:04d}", layer=layer, kind="direction",
                direction=found.directions[k].clone(), threshold=float(found.threshold[k]),
                typical=float(found.typical[k]), method=METHOD_NAME, criterion=f"quantile {config.threshold_quantile}",
                seed=config.seed, corpus_digest=digest,
                fit={"wins": int(found.wins[k]), "win_rate": float(found.wins[k]) / max(len(hs.tokens), 1),
                     "tokens": len(hs.tokens), "k": config.k, "index": k},
                extra={"centred": config.centre}))
        # cards on the discovery corpus give each chunk its automatic label
        cards = build_cards(layer_chunks, hs, examples=card_examples)
        seen: dict[str, int] = {}
        for chunk, card in zip(layer_chunks, cards):
            label = card.auto_label or auto_label([])
            seen[label] = seen.get(label, 0) + 1
            chunk.extra["card"] = card.to_json()
            chunk.extra["auto_label"] = label
        for chunk in layer_chunks:  # unique labels within a layer: "the" and "the #17"
            label = chunk.extra["auto_label"]
            chunk.label = label if seen[label] == 1 else f"{label} #{chunk.fit['index']}"
        chunks.extend(layer_chunks)
    progress("discover", 1.0, f"{len(chunks)} chunks")
    return chunks, report
