"""Population averaging (docs/method.md section 1): chunks from labelled tokens.

For one concept, all layers and all tolerances are fitted together:

    R      n positives, drawn once with a seeded generator       (n,)
    mu     template, mean of H over R                            (S, d)
    a      max over R of |H - mu|, per neuron                    (S, d)
    M_k    subpopulation at tolerance k: a < tau_k               (K, S, d)
    dev    mean over M_k of (H - mu)^2, every token              (S, T, K)   one bmm
    theta  max over R of dev                                     (S, K)
    match  dev <= theta                                          (S, T, K)

and the tolerance with the best criterion is kept per layer. Tokens are
processed in blocks so memory stays bounded on long corpora.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chunktui.shared.errors import CorpusError

PAPER_TOLERANCES: tuple[float, ...] = tuple(sorted({100.0, 30.0, 20.0, 10.0, 3.0} | {0.8 ** k for k in range(35)},
                                                   reverse=True))
CRITERIA = ("accuracy", "f1", "balanced")


@dataclass
class LayerFit:
    """The chosen chunk of one concept at one layer, and how it scored on the training text."""

    layer: int
    subpopulation: torch.Tensor  # (m,) int64, indices of the subpopulation M
    template: torch.Tensor  # (m,) float32, mu[M]
    threshold: float
    tolerance: float
    stats: dict  # tp, fp, tn, fn, tp_rate, fp_rate, accuracy, f1, balanced
    note: str | None = None  # why this layer has no chunk (empty subpopulation), when it has none


def draw_positives(positives: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of n positives, drawn once with a seeded generator (sorted, so stable to print)."""
    pos = positives.nonzero().flatten()
    if len(pos) == 0:
        raise CorpusError("No positive tokens for this concept.")
    if n < 1:
        raise CorpusError(f"--n must be at least 1, got {n}.")
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(len(pos), generator=g)[: min(n, len(pos))]
    return pos[pick].sort().values


def confusion_scores(tp: torch.Tensor, fp: torch.Tensor, n_pos: int, n_neg: int) -> dict[str, torch.Tensor]:
    """Rates and criteria from counts (any shape); empty classes give rate 0."""
    tp, fp = tp.double(), fp.double()
    fn = n_pos - tp
    tn = n_neg - fp
    total = max(n_pos + n_neg, 1)
    tp_rate = tp / max(n_pos, 1)
    fp_rate = fp / max(n_neg, 1)
    accuracy = (tp + tn) / total
    denom = (2 * tp + fp + fn).clamp(min=1)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "tp_rate": tp_rate, "fp_rate": fp_rate,
            "accuracy": accuracy, "f1": 2 * tp / denom, "balanced": (tp_rate + (1 - fp_rate)) / 2}


def rowwise_deviations64(rows: torch.Tensor, mu64: torch.Tensor, Mf64: torch.Tensor, inv64: torch.Tensor) -> torch.Tensor:
    """Float64 deviations (S, u, K) of rows (u, S, d), one row at a time.

    A batched matmul may round a row differently depending on how many rows
    share the call (kernels are chosen by shape). Thresholds and decisions on
    ties (a token whose state equals a drawn positive's, e.g. a repeated
    sentence) must not depend on batching or on the number of processes, so
    the float64 deviations that decide them always come from the same
    one-row call.
    """
    out = torch.empty(Mf64.shape[0], rows.shape[0], Mf64.shape[2], dtype=torch.float64, device=Mf64.device)
    for r in range(rows.shape[0]):
        d2 = (rows[r].to(Mf64.device, torch.float64) - mu64).square_()  # (S, d)
        out[:, r, :] = torch.bmm(d2[:, None, :], Mf64)[:, 0, :]
    return out * inv64[:, None, :]


@torch.no_grad()
def fit_concept(H: torch.Tensor, positives: torch.Tensor, layers: list[int], n: int = 5, seed: int = 0,
                tolerances: tuple[float, ...] = PAPER_TOLERANCES, criterion: str = "accuracy",
                block: int = 2048) -> tuple[list[LayerFit], torch.Tensor]:
    """Fit one concept at every layer of H (T, S, d). Returns the per-layer fits and the draw R."""
    if criterion not in CRITERIA:
        raise CorpusError(f"Unknown criterion '{criterion}': use one of {', '.join(CRITERIA)}.")
    T, S, d = H.shape
    if positives.shape != (T,):
        raise ValueError(f"positives must have shape ({T},), got {tuple(positives.shape)}")
    R = draw_positives(positives, n, seed)
    taus = torch.tensor(tolerances, dtype=torch.float32)  # (K,)

    X = H[R].float()  # (n, S, d)
    mu = X.mean(0)  # (S, d)
    spread = (X - mu).abs().amax(0)  # (S, d)
    M = (spread[None] < taus[:, None, None])  # (K, S, d)
    count = M.sum(-1).float()  # (K, S)
    Mf = M.permute(1, 2, 0).float()  # (S, d, K) for bmm
    inv_count = torch.where(count > 0, 1.0 / count.clamp(min=1), torch.full_like(count, float("nan"))).T  # (S, K)

    def deviations(rows: torch.Tensor) -> torch.Tensor:
        # rows: (t, S, d) -> dev (S, t, K); NaN where M is empty (never matches)
        d2 = (rows.float() - mu).square_().transpose(0, 1)  # (S, t, d)
        return torch.bmm(d2, Mf) * inv_count[:, None, :]

    mu64, Mf64, inv64 = mu.double(), Mf.double(), inv_count.double()

    def deviations64(rows: torch.Tensor) -> torch.Tensor:
        return rowwise_deviations64(rows, mu64, Mf64, inv64)

    # theta in float64, the precision matching uses, so a drawn positive always matches its own chunk;
    # tokens whose float32 deviation lands within rounding of theta are decided again in float64
    theta = deviations64(X).amax(1)  # (S, K)
    tp = torch.zeros(S, len(taus), dtype=torch.long)
    fp = torch.zeros(S, len(taus), dtype=torch.long)
    for a in range(0, T, block):
        rows = H[a:a + block]
        dev = deviations(rows)  # (S, t, K) float32
        match = dev <= theta[:, None, :]  # NaN compares False
        near = ((dev - theta[:, None, :]).abs() <= 1e-4 * theta[:, None, :] + 1e-12).any(-1).any(0)  # (t,)
        if near.any():
            idx = near.nonzero().flatten()
            match[:, idx, :] = deviations64(rows[idx]) <= theta[:, None, :]
        pos = positives[a:a + block].view(1, -1, 1)
        tp += (match & pos).sum(1)
        fp += (match & ~pos).sum(1)
    n_pos = int(positives.sum())
    scores = confusion_scores(tp, fp, n_pos, T - n_pos)
    crit = scores[criterion].clone()
    crit[(count == 0).T] = -1.0  # an empty subpopulation is never chosen
    best = crit.argmax(1)  # (S,) first maximum: the largest tolerance among ties

    fits = []
    for s, layer in enumerate(layers):
        k = int(best[s])
        neurons = M[k, s].nonzero().flatten()
        stats = {key: float(v[s, k]) for key, v in scores.items()}
        for key in ("tp", "fp", "tn", "fn"):
            stats[key] = int(stats[key])
        fits.append(LayerFit(layer=layer, subpopulation=neurons, template=mu[s, neurons].clone(),
                             threshold=float(theta[s, k]), tolerance=float(taus[k]), stats=stats))
    return fits, R


# --------------------------------------------------------------------------- streaming (two passes)
#
# The in-memory `fit_concept` above needs every token's state at once. The
# streaming fit below gives the same chunks without holding the corpus:
#
#   pass 1  the states of the drawn positives R only  -> mu, spread, M_k, theta
#   pass 2  every token once, in batches             -> TP/FP counts per (layer, tolerance)
#
# and, for the calibrated criterion, the k smallest negative deviations per
# (layer, tolerance), an exact order statistic that merges across processes.


@dataclass(frozen=True)
class Criterion:
    """How a tolerance (and, for fp-budget, the threshold) is chosen."""

    name: str  # accuracy | f1 | balanced | fp-budget
    budget: float | None = None  # fp-budget: the largest FP rate allowed on the training negatives

    def __str__(self) -> str:
        return self.name if self.budget is None else f"fp-budget:{self.budget:g}"

    @property
    def calibrated(self) -> bool:
        return self.name == "fp-budget"


def parse_criterion(spec: str) -> Criterion:
    """'accuracy', 'f1', 'balanced' (the paper's threshold) or 'fp-budget:B' (calibrated threshold)."""
    text = str(spec).strip().lower()
    if text in CRITERIA:
        return Criterion(text)
    if text.startswith("fp-budget"):
        _, _, value = text.partition(":")
        try:
            budget = float(value)
        except ValueError:
            raise CorpusError(f"Bad criterion '{spec}': give the FP budget as a number, e.g. fp-budget:0.001.") from None
        if not 0.0 <= budget < 1.0:  # NaN fails this too
            raise CorpusError(f"The FP budget must be at least 0 and below 1, got {value}.")
        return Criterion("fp-budget", budget)
    raise CorpusError(f"Unknown criterion '{spec}': use accuracy, f1, balanced or fp-budget:B (e.g. fp-budget:0.001).")


# a threshold sits this far (relative) below the first negative it must exclude, so the float64
# expansion used for matching (rounding ~1e-11 relative) never admits that negative
CALIBRATION_MARGIN = 1e-6


class ConceptTemplate:
    """One concept's template, spread and subpopulations at every layer and tolerance (pass 1).

    X  (n, S, d)  states of the positives R the template is made from.
    """

    def __init__(self, label: str, R: torch.Tensor, X: torch.Tensor, taus: torch.Tensor, device):
        self.label = label
        self.R = R
        X = X.to(device, torch.float32)
        self.taus = taus.to(device)
        self.mu = X.mean(0)  # (S, d)
        spread = (X - self.mu).abs().amax(0)  # (S, d)
        self.M = spread[None] < self.taus[:, None, None]  # (K, S, d)
        self.count = self.M.sum(-1, dtype=torch.int32).float()  # (K, S)
        self.inv = torch.where(self.count > 0, 1.0 / self.count.clamp(min=1),
                               torch.full_like(self.count, float("nan"))).T  # (S, K)
        # the float32 masks, the padded columns and the float64 masks (`Mf`, `Mu`, `Mf64`) are made only where
        # asked for: on the CPU pass 2 needs none of them but for rare ties, and each is megabytes per concept
        self.mu64, self.inv64 = self.mu.double(), self.inv.double()
        self._Mf = self._Mu = self._Mf64 = None
        self.X = X  # (n, S, d) float32: a tie whose state has a drawn positive's bits reads that positive's deviation
        # devR from a float64 copy of the masks made for it and let go (megabytes per concept): the streaming
        # build's pass 2 needs them again only for the rare ties no drawn positive's bits decide, and then
        # `Mf64` makes them again (the same values, so the same deviations)
        self.devR = rowwise_deviations64(X, self.mu64, self.M.permute(1, 2, 0).double(), self.inv64)  # (S, n, K)
        self.theta = self.devR.amax(1)  # (S, K) the paper's threshold: the largest deviation among R
        self._share_columns()

    def _share_columns(self) -> None:
        """The distinct subpopulations per layer, for the float32 screen of pass 2.

        The M_k are nested (M_k = {spread < tau_k}), so two tolerances with the
        same count have the same subpopulation, and an empty one needs no sum.
        With a few positives most of the K tolerances repeat a neighbour or are
        empty (SmolLM2-135M, n=5: 15-33 distinct non-empty sets at the widest
        layer of 40 tolerances, about 8-24 on average), so the screen's matmul
        runs over each layer's distinct sets only and every tolerance reads its
        set's column. On the CPU each layer is its own matmul of its own width;
        elsewhere one batched matmul over all layers, padded to the widest.
        """
        count = self.count.T.cpu().long()  # (S, K)
        S, K = count.shape
        column = torch.zeros(S, K, dtype=torch.long)
        widths, firsts = [], []
        for s in range(S):
            values, first = [], {}
            for k, c in enumerate(count[s].tolist()):
                if c == 0:
                    continue  # empty: inv is NaN, so whichever column it reads, the deviation is NaN
                if c not in first:
                    first[c] = len(values)
                    values.append(k)
                column[s, k] = first[c]
            widths.append(len(values))
            firsts.append(values)
        device = self.mu.device
        M = self.M  # (K, S, d): M_k at layer s
        self.layer_columns = [M[ks, s].T.float().contiguous() if ks else None
                              for s, ks in enumerate(firsts)]  # (d, K'_s) per layer, 0/1
        self.layer_index = [column[s].to(device) for s in range(S)]
        self._widest = max(widths, default=0) or 1
        self.column = column.to(device)  # (S, K) which distinct column each tolerance reads
        self.per_layer = device.type == "cpu"
        if not self.per_layer:
            self.Mu  # the batched screen's padded columns, made now rather than in the first batch
        # how far (relative) a float32 deviation may sit from the exact one: a sum of m <= d non-negative
        # terms is off by at most (m - 1) units of rounding, the square and the scaling a few more; the
        # screen re-decides in float64 everything within twice that (and never less than 1e-4)
        self.band = max(1e-4, 2.0 * (self.M.shape[-1] + 8) * 2.0 ** -24)
        # the screen compares sums (not means) with theta * |M|: below `low` a match, above `high` none, between
        # the two the float64 deviation decides; NaN (an empty M) compares False everywhere
        limit = self.theta * self.count.T.to(self.theta.dtype)  # (S, K) float64
        slack = self.band * limit + 1e-12 * self.count.T.to(self.theta.dtype)
        self.sum_limit = limit.float()
        self.sum_low, self.sum_high = (limit - slack).float(), (limit + slack).float()

    @property
    def Mf64(self) -> torch.Tensor:
        """(S, d, K) float64 0/1: the masks `deviations64` reads, made on first use and kept."""
        if self._Mf64 is None:
            self._Mf64 = self.M.permute(1, 2, 0).double()
        return self._Mf64

    @property
    def Mf(self) -> torch.Tensor:
        """(S, d, K) float32 0/1: column k of layer s is M_k there."""
        if self._Mf is None:
            self._Mf = self.M.permute(1, 2, 0).float()
        return self._Mf

    @property
    def Mu(self) -> torch.Tensor:
        """(S, d, K') each layer's distinct columns, zero padded to the widest layer (the batched screen's)."""
        if self._Mu is None:
            S, d = self.mu.shape
            shared = torch.zeros(S, d, self._widest, dtype=torch.float32, device=self.mu.device)
            for s, cols in enumerate(self.layer_columns):
                if cols is not None:
                    shared[s, :, :cols.shape[1]] = cols
            self._Mu = shared
        return self._Mu

    def sums(self, states_t: torch.Tensor) -> torch.Tensor:
        """states_t (S, t, d) float32, layers first -> (S, t, K) float32 sums over each M_k of (h - mu)^2.

        Where M_k is empty the sum is 0 (and the threshold NaN, so it never matches).
        """
        S, t, _ = states_t.shape
        if not self.per_layer:
            d2 = torch.sub(states_t, self.mu[:, None, :]).square_()  # (S, t, d)
            sums = torch.bmm(d2, self.Mu)  # (S, t, K') one column per distinct subpopulation
            return sums.gather(2, self.column[:, None, :].expand(-1, t, -1))
        out = torch.zeros(S, t, self.column.shape[1], dtype=torch.float32, device=states_t.device)
        for s in range(S):  # one layer at a time: its (t, d) squares stay in cache for its matmul
            columns = self.layer_columns[s]
            if columns is None:
                continue
            d2 = torch.sub(states_t[s], self.mu[s]).square_()  # (t, d)
            torch.index_select(d2 @ columns, 1, self.layer_index[s], out=out[s])
        return out

    def screen(self, states: torch.Tensor, states_t: torch.Tensor) -> torch.Tensor:
        """match (S, t, K) bool: dev <= theta, decided as in float64 (`deviations64`) for every token."""
        sums = self.sums(states_t)
        match = sums <= self.sum_limit[:, None, :]
        near = ((sums >= self.sum_low[:, None, :]) & (sums <= self.sum_high[:, None, :])).any(-1).any(0)  # (t,)
        if near.any():
            idx = near.nonzero().flatten()
            match[:, idx, :] = self.deviations64(states[idx]) <= self.theta[:, None, :]
        return match

    def deviations(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (t, S, d) -> (S, t, K) float32; NaN where M is empty (never matches).

        A screen: within `band` (relative) of the float64 `deviations64`; decisions that close
        to a threshold are taken again in float64, so the float32 rounding never decides anything.
        """
        return self.sums(rows.float().transpose(0, 1)) * self.inv[:, None, :]

    def deviations64(self, rows: torch.Tensor) -> torch.Tensor:
        """The same in float64, one row at a time: the precision thresholds and decisions are taken in."""
        return rowwise_deviations64(rows, self.mu64, self.Mf64, self.inv64)


class ConceptScreen:
    """Pass 2's screen for many concepts at once: per layer, two plain matmuls over every concept's subpopulations.

    For a concept's subpopulation M (a 0/1 column m) and a token's state h at a layer, the sum it compares
    with theta x |M| is expanded:

        sum_M (h - mu)^2 = (h * h) . m  -  2 h . (mu * m)  +  sum_M mu^2        = A - 2B + c

    so per layer the batch's (t, d) states meet ALL concepts' distinct columns, concatenated (d, N), in two
    float32 matmuls, with no (concepts, t, d) tensor. The expansion cancels, so its rounding is bounded by
    the magnitudes summed, not by the result: in IEEE float32, any summation order gives
    |fl(x) - x| <= gamma_n sum |terms| (Higham, Accuracy and Stability, 3.1), the terms here are h_i^2 and
    |h_i mu_i| <= (h_i^2 + mu_i^2) / 2: A is off by gamma_{d+1} A, the d products of B and A's addition
    to them (one addmm, d + 1 terms) by gamma_{d+1} (2A + c), the rounding of c and the last two additions by
    a few units more; so |approx - exact| <= gamma_{3d+8} (A + c), and the screen uses twice that (`rel`). A
    decision is taken in float32 only where approx +- bound lies strictly on one side of the threshold,
    widened by the float64 reference's own tolerance (1e-9 relative and 1e-12 per neuron; the reference
    rounds ~1e-13 relative). Tokens left undecided at a layer (within the bound, or anything not finite) go
    through the same expansion in float64 (`rel64`, a bound 2^29 times smaller), and a (concept, token) still
    undecided there (a tie: a token whose state is a drawn positive's, e.g. a repeated sentence) is decided
    by the concept's float64 `deviations64`, one row at a time, which is how the reference decides every
    token. The same decisions, so the same counts, so the same dictionaries.

    `counts` folds the bound into the matmuls: P = fl(c + A) (the bias inside the matmul) and
    U = fl(beta P - 2B) with beta = fl(1 + rel). With S = A + c exact and 2|B| <= S: P = S (1 + t),
    |t| <= gamma_{d+3} (the squares, d + 1 non-negative terms, c's rounding), and U's own rounding is at
    most gamma_{d+2} (beta P + S); so U - exact >= S (rel - 3.02 gamma_{d+3} - 1.01 u) > 0, and
    exact - fl(U - 2 rel P) >= S (rel - 3.03 gamma_{d+3} - 3 u) > 0, since rel = 2 gamma_{3d+8} (about
    (6d + 16) u) exceeds 3.03 gamma_{d+3} + 3 u (about (3.03d + 12.1) u) nearly twice over: U bounds the exact
    sum from above and U - 2 rel P from below, with about twice the room needed.
    Where U is not finite (an overflow past the float32 range although P is finite), nothing is decided.
    `counts` lays every layer's columns side by side, tokens last, and decides all layers in one pass; the
    (column, token) cells it leaves undecided get their float64 sum directly, sum_M (h - mu)^2 (non-negative
    terms: a bound relative to the sum itself, `rel_direct64`, rather than to A + c), and only the cells, not
    their whole rows, go to float64.

    Tolerances sharing a subpopulation share a column; a column's float32 decision compares with the lowest
    and highest limits of the tolerances reading it, so it holds for each of them. Matches are laid out
    (layers, concepts, tolerances, tokens), and TP/FP are counted from them without a float copy.
    """

    cell_chunk = 1 << 21  # `counts` sums its undecided cells in float64 this many numbers (cells x width) at a time

    def __init__(self, templates: list[ConceptTemplate]):
        self.templates = templates
        first = templates[0]
        S, K = first.column.shape
        C = len(templates)
        self.S, self.K = S, K
        device = first.mu.device
        d = first.mu.shape[1]
        # 2 gamma_{3d+8} (float32) and its float64 counterpart: the bound on (A + c), twice the proven one
        self.rel = 2.0 * (3 * d + 8) * 2.0 ** -24 / (1 - (3 * d + 8) * 2.0 ** -24)
        self.rel64 = 2.0 * (3 * d + 8) * 2.0 ** -53 / (1 - (3 * d + 8) * 2.0 ** -53)
        self.columns, self.weighted, self.const, self.index, self.low, self.high = [], [], [], [], [], []
        self.const64, self.low64, self.high64, self.full = [], [], [], []
        self.near_tokens = 0  # (concept, token) pairs decided again in float64, for the benchmark's report
        self.screened = 0  # (concept, token) pairs screened
        self.float64_rows = 0  # (layer, token) pairs screened again in float64 (some of their columns, in `counts`)
        self.ties_reused = 0  # tied (concept, token) pairs decided from a drawn positive with the same bits
        self.ties_computed = 0  # tied (concept, token) pairs the float64 reference was run for
        for s in range(S):
            parts, weighted, consts, index, offset = [], [], [], [], 0
            for tpl in templates:
                cols = tpl.layer_columns[s]  # (d, K'_s) distinct non-empty subpopulations, or None
                if cols is not None:
                    parts.append(cols)
                    weighted.append(cols * tpl.mu[s][:, None])  # mu * m: exact (m is 0/1)
                    consts.append(tpl.mu64[s].square() @ cols.double())  # sum_M mu^2, float64
                    index.append(tpl.layer_index[s] + offset)
                    offset += cols.shape[1]
                else:
                    index.append(torch.zeros(K, dtype=torch.long, device=device))
            if not parts:
                for out in (self.columns, self.weighted, self.const, self.index, self.low, self.high, self.const64,
                            self.low64, self.high64, self.full):
                    out.append(None)  # no concept has a non-empty subpopulation here: nothing matches
                continue
            self.columns.append(torch.cat(parts, 1).contiguous())  # (d, N_s)
            self.weighted.append(torch.cat(weighted, 1).contiguous())  # (d, N_s)
            self.const.append(torch.cat(consts).float())  # (N_s,)
            self.index.append(torch.cat(index))  # (C*K,) the column each (concept, tolerance) reads
            # the sum whose float64 mean is theta: theta / inv64 (the reference scales by inv64, 1/|M| rounded
            # to float32, so theta x |M| would be off by up to 6e-8 relative)
            limit = torch.stack([tpl.theta[s] / tpl.inv64[s] for tpl in templates])  # (C, K) float64
            count = torch.stack([tpl.count[:, s].to(torch.float64) for tpl in templates])
            slack = 1e-9 * limit + 1e-12 * count  # the float64 reference's own rounding is ~1e-13 relative
            empty = (count == 0) | limit.isnan()  # never matches (the float64 deviation is NaN)
            low64 = torch.where(empty, float("-inf"), limit - slack)
            high64 = torch.where(empty, float("-inf"), limit + slack)
            down = torch.tensor(float("-inf"), dtype=torch.float32, device=device)
            self.low64.append(low64.reshape(-1))
            self.high64.append(high64.reshape(-1))
            # float32 limits per distinct column (tolerances sharing a subpopulation share theta, up to the
            # float64 rounding): the lowest `low` and the highest `high` of the tolerances reading it, so a
            # column's decision holds for each of them; empty tolerances read no column and never match
            low = torch.nextafter(low64.float(), down).reshape(-1)  # float32, at or below the float64 value
            high = torch.nextafter(high64.float(), -down).reshape(-1)
            index_s, full = self.index[-1], ~empty.reshape(-1)
            n_cols = self.columns[-1].shape[1]
            low_col = torch.full((n_cols,), float("inf"), device=device)
            high_col = torch.full((n_cols,), float("-inf"), device=device)
            low_col.scatter_reduce_(0, index_s[full], low[full], "amin")
            high_col.scatter_reduce_(0, index_s[full], high[full], "amax")
            self.low.append(low_col)
            self.high.append(high_col)
            self.full.append(full)
            self.const64.append(torch.cat(consts))
        self.C = C
        self._buffers: dict[str, torch.Tensor] = {}  # `counts`'s batch-sized buffers, kept between batches
        self._drawn_cache = None  # `_drawn`, made at the first tie
        self._lay_out_columns()

    def _lay_out_columns(self) -> None:
        """Every layer's columns side by side, tokens last, for `counts`: (N, t) buffers filled layer by layer by
        the matmuls and decided in one pass each; and per column what its float64 sum needs."""
        S, C, K = self.S, self.C, self.K
        active = [s for s in range(S) if self.columns[s] is not None]
        device = self.templates[0].mu.device
        self.active = active
        self.offsets = [0] * (S + 1)
        for s in range(S):
            self.offsets[s + 1] = self.offsets[s] + (self.columns[s].shape[1] if self.columns[s] is not None else 0)
        self.n_columns = self.offsets[S]
        # each layer's (N_s, d) columns transposed, so that its block of the (N, t) buffer is one contiguous matmul
        self.columns_t = [c.t().contiguous() if c is not None else None for c in self.columns]
        self.weighted_t = [w.t().contiguous() if w is not None else None for w in self.weighted]
        gidx = torch.zeros(S, C * K, dtype=torch.long, device=device)
        full = torch.zeros(S, C * K, dtype=torch.bool, device=device)
        low64 = torch.full((S, C * K), float("-inf"), dtype=torch.float64, device=device)
        high64 = torch.full((S, C * K), float("-inf"), dtype=torch.float64, device=device)
        for s in active:
            gidx[s] = self.index[s] + self.offsets[s]
            full[s] = self.full[s]
            low64[s], high64[s] = self.low64[s], self.high64[s]
        self.gidx, self.full_flat = gidx.reshape(-1), full.reshape(-1)  # (S*C*K,) the column each reads
        self.low64_flat, self.high64_flat = low64.reshape(-1), high64.reshape(-1)
        if not active:
            return
        self.low_all = torch.cat([self.low[s] for s in active])[:, None]  # (N, 1)
        self.high_all = torch.cat([self.high[s] for s in active])[:, None]
        # who reads each column: the (layer, concept, tolerance) rows, grouped by column
        flat = self.full_flat.nonzero().flatten()
        col = self.gidx[flat]
        order = torch.argsort(col, stable=True)
        self.readers = flat[order]
        self.reader_count = torch.bincount(col, minlength=self.n_columns)
        self.reader_start = torch.cumsum(self.reader_count, 0) - self.reader_count
        # per column: its layer, its concept's float64 template at that layer, its subpopulation
        layer_of, concept_of, masks = [], [], []
        for s in active:
            for c, tpl in enumerate(self.templates):
                cols = tpl.layer_columns[s]
                if cols is not None:
                    layer_of.append(torch.full((cols.shape[1],), s, dtype=torch.long, device=device))
                    concept_of.append(torch.full((cols.shape[1],), c, dtype=torch.long, device=device))
                    masks.append(cols.t().bool())
        self.col_layer = torch.cat(layer_of)
        self.col_template = self.col_layer * C + torch.cat(concept_of)  # a row of mu64_all
        self.col_mask = torch.cat(masks)  # (N, d) bool
        self.mu64_all = torch.stack([torch.stack([tpl.mu64[s] for tpl in self.templates]) for s in range(S)])
        self.mu64_all = self.mu64_all.reshape(S * C, -1)  # (S*C, d)
        d = self.mu64_all.shape[1]
        # a float64 sum of m <= d non-negative terms (h - mu)^2, each with three rounding factors (the difference,
        # and the square of the rounded difference): within gamma_{d+2} of the exact sum (Higham 3.1), so within
        # twice gamma_{d+3} of the computed one, with room for the rounding of sum +- bound
        self.rel_direct64 = 2.0 * (d + 3) * 2.0 ** -53 / (1 - (d + 3) * 2.0 ** -53)

    def _buffer(self, name: str, shape: tuple, dtype, device) -> torch.Tensor:
        """A contiguous tensor of `shape` on the storage kept under `name`, grown when a batch needs more."""
        n = math.prod(shape)
        flat = self._buffers.get(name)
        if flat is None or flat.numel() < n or flat.dtype != dtype or flat.device != torch.device(device):
            flat = self._buffers[name] = torch.empty(max(n, 1), dtype=dtype, device=device)
        return flat[:n].view(shape)

    def _drawn(self):
        """Every concept's drawn positives (C, n, S, d) float32, their deviations (C, S, n, K) float64 and the
        thresholds (C, S, K), padded with NaN to the most positives drawn (NaN equals no state): for the ties."""
        if self._drawn_cache is None:
            n = max(len(tpl.X) for tpl in self.templates)
            first = self.templates[0]
            S, d = first.mu.shape
            X_all = torch.full((self.C, n, S, d), float("nan"), device=first.mu.device)
            devR_all = torch.full((self.C, S, n, self.K), float("nan"), dtype=torch.float64, device=first.mu.device)
            for c, tpl in enumerate(self.templates):
                n_c = len(tpl.X)
                X_all[c, :n_c] = tpl.X.float()
                tpl.X = X_all[c, :n_c]  # a view: the drawn states are held once
                devR_all[c, :, :n_c] = tpl.devR
            self._drawn_cache = (X_all, devR_all, torch.stack([tpl.theta for tpl in self.templates]))
        return self._drawn_cache

    def screen(self, states: torch.Tensor, states_t: torch.Tensor | None = None) -> torch.Tensor:
        """states (t, S, d) float32 -> match (C, S, t, K) bool, as `ConceptTemplate.screen` (`states_t` is unused)."""
        return self.decide(states).permute(1, 0, 3, 2)

    def decide(self, states: torch.Tensor) -> torch.Tensor:
        """states (t, S, d) float32 -> match (S, C, K, t) bool: dev <= theta, as `deviations64` decides it.

        Tokens last: picking each tolerance's column is a row selection there, several times faster than
        selecting columns of a (t, N) bool tensor."""
        C, S, K = self.C, self.S, self.K
        t = states.shape[0]
        from chunktui.engine.matching import _ieee_float32

        states = states.float()
        match = torch.zeros(S, C, K, t, dtype=torch.bool, device=states.device)
        near = torch.zeros(t, C, dtype=torch.bool, device=states.device)
        with _ieee_float32():  # the bound holds for IEEE float32 products, not TF32's
            for s in range(S):
                cols = self.columns[s]
                if cols is None:
                    continue
                h = states[:, s, :]  # (t, d), rows S x d apart: the matmuls read it in place
                A = torch.mm(h * h, cols)  # (t, N) sum_M h^2
                approx = torch.addmm(A, h, self.weighted[s], alpha=-2.0).add_(self.const[s])  # A - 2B + c
                bound = A.add_(self.const[s]).mul_(self.rel)  # (A + c) x 2 gamma, in place of A
                yes = (approx + bound) < self.low[s]  # (t, N) surely below every threshold on it: a match
                no = (approx - bound) > self.high[s]  # surely above every threshold on it
                # each (concept, tolerance) reads its column; an empty subpopulation never matches
                torch.logical_and(yes.t().contiguous().index_select(0, self.index[s]), self.full[s][:, None],
                                  out=match[s].view(C * K, t))
                rows = (~(yes | no)).any(1).nonzero().flatten()  # within the bound of a threshold, or not finite
                if len(rows):
                    # the same expansion in float64 for those tokens only: a bound 2^29 times smaller
                    self.float64_rows += len(rows)
                    h64 = h[rows].double()
                    A64 = torch.mm(h64 * h64, cols.double())
                    approx64 = torch.addmm(A64, h64, self.weighted[s].double(), alpha=-2.0).add_(self.const64[s])
                    bound64 = A64.add_(self.const64[s]).mul_(self.rel64)
                    approx64 = approx64.index_select(1, self.index[s])
                    bound64 = bound64.index_select(1, self.index[s])
                    yes64 = (approx64 + bound64) < self.low64[s]
                    no64 = (approx64 - bound64) > self.high64[s]
                    match[s].view(C * K, t)[:, rows] = yes64.t()
                    near[rows] |= (~(yes64 | no64)).view(len(rows), C, K).any(-1)
        self.screened += C * t
        todo = near.t().contiguous()  # (C, t): on a threshold within float64's rounding (a tie), or not finite
        for c in todo.any(1).nonzero().flatten().tolist():
            tpl = self.templates[c]
            idx = todo[c].nonzero().flatten()
            self.near_tokens += len(idx)
            match[:, c, :, idx] = (tpl.deviations64(states[idx]) <= tpl.theta[:, None, :]).transpose(1, 2)  # the reference
        return match

    def counts(self, states: torch.Tensor, pos: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """TP and FP counts (C, S, K, 2) int64 of one batch: states (t, S, d); pos, own (C, t) bool, the
        concepts' positives and their drawn ones (whose deviations pass 1 counted).

        The same decisions as `decide`, counted without laying them out per (concept, tolerance, token): every
        layer's float32 bounds go into one (N, t) buffer (its columns side by side, tokens last), decided in a
        few passes over all layers at once; the sure matches are summed per column and each (layer, concept,
        tolerance) reads its column's count. The (column, token) cells the bound leaves undecided get their
        sum in float64 directly, sum_M (h - mu)^2 (a float64 sum of non-negative terms: within 2 gamma_{d+3}
        of itself, `rel_direct64`), and each (concept, tolerance) reading the column decides on it; the batch's
        positives are kept per (layer, concept, tolerance) to tell TP from FP, and the ties, decided by the
        float64 reference row by row at the end, replace what was counted for them."""
        C, S, K = self.C, self.S, self.K
        t = states.shape[0]
        from chunktui.engine.matching import _ieee_float32

        states = states.float()
        device = states.device
        SCK = S * C * K
        q = pos.any(0).nonzero().flatten()  # the batch's positive tokens, of any concept: a few
        nq = len(q)
        self.screened += C * t
        N = self.n_columns
        if N == 0 or t == 0:  # no concept has a subpopulation anywhere: nothing matches
            return torch.zeros(C, S, K, 2, dtype=torch.long, device=device)
        # the batch-sized buffers are kept between batches: a new one each time would take fresh pages from the
        # system (page faults) for every batch
        P = self._buffer("P", (N, t), torch.float32, device)
        U = self._buffer("U", (N, t), torch.float32, device)
        squares = torch.square(states, out=self._buffer("squares", tuple(states.shape), torch.float32, device))
        with _ieee_float32():  # the bound holds for IEEE float32 products, not TF32's
            for s in self.active:
                a, b = self.offsets[s], self.offsets[s + 1]
                h = states[:, s, :]  # (t, d), rows S x d apart: the matmuls read it in place, transposed
                # the bound folded into the matmuls: P = A + c, U = (1 + rel) P - 2B = approx + bound, and below
                # U - 2 rel P = approx - bound; see the class notes for why U is at or above the exact sum and
                # U - 2 rel P at or below it
                torch.addmm(self.const[s][:, None], self.columns_t[s], squares[:, s, :].t(), out=P[a:b])
                torch.addmm(P[a:b], self.weighted_t[s], h.t(), beta=1.0 + self.rel, alpha=-2.0, out=U[a:b])
        # P is finite and at most 1e37 everywhere (NaN fails the test): then so are (1 + rel) P, 2B (2|B| <= P up
        # to rounding) and U; otherwise a U past the float32 range bounds nothing and decides nothing
        finite = None if bool(P.max() <= 1e37) else U.isfinite()
        yes = torch.lt(U, self.low_all, out=self._buffer("yes", (N, t), torch.bool, device))  # surely below every
        # threshold reading the column, and surely above every one:
        no = torch.gt(U.add_(P, alpha=-2.0 * self.rel), self.high_all, out=self._buffer("no", (N, t), torch.bool, device))
        if finite is not None:
            yes &= finite
            no &= finite
        und = torch.logical_or(yes, no, out=no).logical_not_()  # within the bound of a threshold, or not finite
        total = yes.sum(1, dtype=torch.int32).index_select(0, self.gidx).long() * self.full_flat  # (S*C*K,)
        at_q = yes.index_select(1, q).index_select(0, self.gidx) & self.full_flat[:, None]  # (S*C*K, q)
        near_at = torch.zeros(S, t, C, dtype=torch.bool, device=device)  # ties, per layer
        cell_col, cell_row = und.nonzero(as_tuple=True)  # the undecided (column, token) cells
        pair_key = pair_yes = None
        if len(cell_col):
            layer = self.col_layer[cell_col]
            self.float64_rows += int(torch.unique(layer * t + cell_row).numel())
            # the cell's sum in float64, straight from its definition (h in float32 converts exactly), a bounded
            # number of cells at a time (a state that is not finite leaves every column of its layer undecided)
            sums = torch.full((len(cell_col),), float("nan"), dtype=torch.float64, device=device)
            if finite is None:  # every state is finite (P is): every cell is computed
                todo = torch.arange(len(cell_col), device=device)
            else:  # a state with a NaN or an infinity has a NaN sum, as the reference has (NaN x 0 is NaN)
                todo = states.isfinite().all(-1)[cell_row, layer].nonzero().flatten()
            step = max(1, self.cell_chunk // max(self.mu64_all.shape[1], 1))  # float64 numbers per tensor
            for a in range(0, len(todo), step):
                part = todo[a:a + step]
                col, where = cell_col[part], layer[part]
                d2 = (states[cell_row[part], where].double() - self.mu64_all[self.col_template[col]]).square_()
                sums[part] = d2.mul_(self.col_mask[col]).sum(1)
            bound = sums * self.rel_direct64
            # every (layer, concept, tolerance) reading the cell's column decides on it
            count = self.reader_count[cell_col]
            cell = torch.repeat_interleave(torch.arange(len(cell_col), device=device), count)
            within = torch.arange(len(cell), device=device) - torch.repeat_interleave(torch.cumsum(count, 0) - count,
                                                                                      count)
            sck = self.readers[self.reader_start[cell_col][cell] + within]
            v, b, row = sums[cell], bound[cell], cell_row[cell]
            yes64 = (v + b) < self.low64_flat[sck]
            no64 = (v - b) > self.high64_flat[sck]
            total += torch.bincount(sck[yes64], minlength=SCK)  # undecided cells counted nothing above
            if nq:
                in_q = torch.isin(row, q)
                if in_q.any():
                    at_q[sck[in_q], torch.searchsorted(q, row[in_q])] = yes64[in_q]
            tied = ~(yes64 | no64)
            if tied.any():
                near_at[sck[tied] // (C * K), row[tied], (sck[tied] // K) % C] = True
            # for the ties below: what was counted for a (token, layer, concept, tolerance) decided here
            pair_key, order = torch.sort(row * SCK + sck)
            pair_yes = yes64[order]
        # ties: decided by the concept's float64 reference one row at a time, at every layer, in place of the above
        tok, con = near_at.any(0).nonzero(as_tuple=True)  # (P,) the tied (token, concept) pairs, by token
        if len(tok):
            self.near_tokens += len(tok)
            reference = torch.zeros(S, len(tok), K, dtype=torch.bool, device=device)
            # the layers whose decision is taken from `reference`; elsewhere the one counted above stands (it
            # was proven there: a pair is tied only at the layers where its float64 sum could not decide)
            taken = torch.ones(S, len(tok), dtype=torch.bool, device=device)
            layers = torch.arange(S, device=device)
            got = states[tok]  # (P, S, d)
            # at a layer where the state has the very bits of a drawn positive's, the reference (a function of that
            # layer's row alone, see rowwise_deviations64) gives that positive's deviation, devR
            X_all, devR_all, theta_all = self._drawn()
            same = torch.zeros(len(tok), X_all.shape[1], S, dtype=torch.bool, device=device)  # (P, n, S)
            for a in range(0, len(tok), 256):  # P x S x d at a time
                for r in range(X_all.shape[1]):
                    same[a:a + 256, r] = (got[a:a + 256] == X_all[con[a:a + 256], r]).all(-1)
            need = near_at[:, tok, con].t()  # (P, S) where the pair is tied
            run = (need & ~same.any(1)).any(1)  # (P,) tied somewhere no drawn positive shares its bits
            for c in con[run].unique().tolist():
                idx = (run & (con == c)).nonzero().flatten()
                tpl = self.templates[c]
                reference[:, idx] = tpl.deviations64(got[idx]) <= tpl.theta[:, None, :]  # (S, m, K)
            self.ties_computed += int(run.sum())
            keep = (~run).nonzero().flatten()
            if len(keep):
                member = same[keep].to(torch.uint8).argmax(1)  # (m', S) the first positive with those bits
                c_keep = con[keep][:, None]
                dev = devR_all[c_keep, layers[None, :], member]  # (m', S, K)
                reference[:, keep] = (dev <= theta_all[c_keep, layers[None, :]]).transpose(0, 1)
                taken[:, keep] = need[keep].t()
                self.ties_reused += len(keep)
            # what was counted above for each (layer, pair, tolerance): the float32 decision, or the float64 one
            # where the cell was undecided
            ks = torch.arange(K, device=device)
            flat = (layers[:, None, None] * C + con[None, :, None]) * K + ks  # (S, P, K)
            col = self.gidx[flat]
            tokens = tok[None, :, None].expand_as(flat)
            counted = self.full_flat[flat]
            was = yes[col, tokens] & counted
            redo = und[col, tokens] & counted
            if redo.any():
                key = tokens[redo] * SCK + flat[redo]
                was[redo] = pair_yes[torch.searchsorted(pair_key, key)]
            now = torch.where(taken[:, :, None], reference, was)
            total.index_add_(0, flat.reshape(-1), now.reshape(-1).long() - was.reshape(-1).long())
            if nq:
                in_q = torch.isin(tok, q)
                if in_q.any():
                    slots = torch.searchsorted(q, tok[in_q])
                    at_q[flat[:, in_q].reshape(-1), slots[None, :, None].expand(S, -1, K).reshape(-1)] = \
                        now[:, in_q].reshape(-1)
        out = torch.zeros(C, S, K, 2, dtype=torch.long, device=device)
        out[..., 1] = total.view(S, C, K).permute(1, 0, 2)
        if nq:
            w = torch.stack([pos & ~own, pos], 2)[:, q].float()  # (C, q, 2)
            on_pos = torch.einsum("sckq,cqj->cskj", at_q.view(S, C, K, nq).float(), w).round_().long()  # exact
            out[..., 0] = on_pos[..., 0]
            out[..., 1] -= on_pos[..., 1]  # FP: every match minus those on a positive
        return out


class StreamingFit:
    """Accumulates pass 2 for every concept; `finish` picks the chunk per layer.

    masks   label -> (T,) bool positives over the whole corpus (labels need no model)
    draws   label -> (n,) token indices of the positives R the template is made from
    """

    batched = True  # the paper's criteria screen every concept at once (`ConceptScreen`); False: one at a time

    def __init__(self, masks: dict[str, torch.Tensor], draws: dict[str, torch.Tensor], layers: list[int],
                 tolerances: tuple[float, ...], criterion: Criterion, device="cpu"):
        self.labels = list(masks)
        self.masks = masks
        self.draws = draws
        self.criterion = criterion
        self.device = torch.device(device)
        self.taus = torch.tensor(tolerances, dtype=torch.float32)
        self.T = len(next(iter(masks.values())))
        self.layers = list(layers)
        S, K = len(self.layers), len(tolerances)
        self.S, self.K = S, K
        self.templates: dict[str, ConceptTemplate] = {}
        self.drawn = {}
        for label in self.labels:
            m = torch.zeros(self.T, dtype=torch.bool)
            m[draws[label]] = True
            self.drawn[label] = m
        # pass-2 accumulators (int64 counts, float64 order statistics), on the CPU between batches
        self.tp = {label: torch.zeros(S, K, dtype=torch.long) for label in self.labels}
        self.fp = {label: torch.zeros(S, K, dtype=torch.long) for label in self.labels}
        self.keep = {}
        self.posdev = {}
        self.pos_index = {label: masks[label].nonzero().flatten() for label in self.labels}
        if criterion.calibrated:
            for label in self.labels:
                n_neg = self.T - len(self.pos_index[label])
                k = min(self.allowed_fp(n_neg) + 1, max(n_neg, 1))
                self.keep[label] = torch.full((S, k, K), float("inf"), dtype=torch.float64)
                self.posdev[label] = torch.zeros(S, len(self.pos_index[label]), K, dtype=torch.float64)

    def allowed_fp(self, n_neg: int) -> int:
        """The most training negatives a calibrated chunk may match: floor(B * negatives)."""
        return int(math.floor(self.criterion.budget * n_neg + 1e-9))

    def needed_tokens(self) -> torch.Tensor:
        """Token indices whose states pass 1 needs (every concept's R), sorted."""
        return torch.cat([self.draws[label] for label in self.labels]).unique()

    def set_positives(self, index: torch.Tensor, X: torch.Tensor) -> None:
        """Pass 1: the states X (P, S, d) of tokens `index` (sorted, covering every R)."""
        for label in self.labels:
            R = self.draws[label]
            rows = torch.searchsorted(index, R)
            self.templates[label] = ConceptTemplate(label, R, X[rows], self.taus, self.device)
        self.shared = None
        if self.batched and not self.criterion.calibrated and self.labels:
            self.shared = ConceptScreen([self.templates[label] for label in self.labels])
            # positives (not drawn) and negatives per concept, to weigh the matches with (C, T) each
            self._pos = torch.stack([self.masks[label] for label in self.labels])
            self._own = torch.stack([self.drawn[label] for label in self.labels])

    @torch.no_grad()
    def update(self, index: torch.Tensor, states: torch.Tensor) -> None:
        """Pass 2: one batch, token indices (t,) and states (t, S, d) on the device."""
        if getattr(self, "shared", None) is not None:
            self._update_shared(index, states)
            return
        states_t = None
        for label in self.labels:
            tpl = self.templates[label]
            pos = self.masks[label][index]
            own = self.drawn[label][index]  # R's deviations come from pass 1, where theta was taken
            if self.criterion.calibrated:
                self._update_calibrated(label, tpl, index, states, pos, own)
                continue
            if states_t is None:  # layers first, once for every concept
                states_t = states.float().transpose(0, 1).contiguous()  # (S, t, d)
            match = tpl.screen(states, states_t)  # (S, t, K)
            # TP and FP counts in one matmul: the columns weigh positives (not drawn) and negatives
            weights = torch.stack([pos & ~own, ~pos], 1).to(match.device, torch.float32)  # (t, 2)
            counts = torch.matmul(match.transpose(1, 2).float(), weights).round_().long().cpu()  # (S, K, 2), exact
            self.tp[label] += counts[..., 0]
            self.fp[label] += counts[..., 1]

    def _update_shared(self, index: torch.Tensor, states: torch.Tensor) -> None:
        """`update` for every concept at once (`ConceptScreen`): the same matches, so the same counts."""
        pos, own = self._pos[:, index], self._own[:, index]  # (C, t)
        counts = self.shared.counts(states, pos.to(states.device), own.to(states.device)).cpu()  # (C, S, K, 2)
        for c, label in enumerate(self.labels):
            self.tp[label] += counts[c, ..., 0]
            self.fp[label] += counts[c, ..., 1]

    def _update_calibrated(self, label, tpl, index, states, pos, own) -> None:
        keep = self.keep[label]
        neg_rows = (~pos).nonzero().flatten()
        if len(neg_rows):
            # only negatives that can enter the k smallest need their exact float64 deviation
            dev = tpl.deviations(states[neg_rows.to(states.device)])  # (S, u, K) float32
            kth = keep[:, -1, :].to(dev.device, torch.float32)  # (S, K) the current k-th smallest
            cand = (dev <= kth[:, None, :] * (1 + tpl.band) + 1e-12).any(-1).any(0)
            rows = neg_rows[cand.cpu()]
            if len(rows):
                d64 = tpl.deviations64(states[rows.to(states.device)]).cpu()  # (S, u, K)
                d64 = torch.nan_to_num(d64, nan=float("inf"))
                merged = torch.cat([keep, d64], dim=1)
                self.keep[label] = merged.topk(keep.shape[1], dim=1, largest=False, sorted=True).values
        pos_rows = (pos & ~own).nonzero().flatten()
        if len(pos_rows):
            d64 = tpl.deviations64(states[pos_rows.to(states.device)]).cpu()
            slots = torch.searchsorted(self.pos_index[label], index[pos_rows])
            self.posdev[label][:, slots, :] = d64

    # ---- checkpoints and merging across processes

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, label in enumerate(self.labels):
            out[f"{i}.tp"], out[f"{i}.fp"] = self.tp[label], self.fp[label]
            if self.criterion.calibrated:
                out[f"{i}.keep"], out[f"{i}.posdev"] = self.keep[label], self.posdev[label]
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, label in enumerate(self.labels):
            self.tp[label], self.fp[label] = tensors[f"{i}.tp"].long(), tensors[f"{i}.fp"].long()
            if self.criterion.calibrated:
                self.keep[label], self.posdev[label] = tensors[f"{i}.keep"].double(), tensors[f"{i}.posdev"].double()

    def merge(self, group) -> None:
        """Sum counts and merge order statistics over all processes (a no-op in one process)."""
        for label in self.labels:
            self.tp[label] = group.all_sum(self.tp[label])
            self.fp[label] = group.all_sum(self.fp[label])
            if self.criterion.calibrated:
                self.posdev[label] = group.all_sum(self.posdev[label])  # each positive was filled by one process
                keep = self.keep[label]
                gathered = group.all_cat(keep, dim=1)
                self.keep[label] = gathered.topk(keep.shape[1], dim=1, largest=False, sorted=True).values

    # ---- the chosen chunks

    def finish(self) -> dict[str, list[LayerFit]]:
        out = {}
        for label in self.labels:
            tpl = self.templates[label]
            mask = self.masks[label]
            n_pos = int(mask.sum())
            n_neg = self.T - n_pos
            count = tpl.count.cpu()
            devR = tpl.devR.cpu()  # (S, n, K)
            if self.criterion.calibrated:
                theta, tp, fp = self._calibrate(label, devR, n_neg)
                name = "accuracy"  # the tolerance with the best accuracy at FP <= B (TP decides)
            else:
                theta = tpl.theta.cpu()
                tp = self.tp[label] + (devR <= theta[:, None, :]).sum(1)
                fp = self.fp[label]
                name = self.criterion.name
            scores = confusion_scores(tp, fp, n_pos, n_neg)
            crit = scores[name].clone()
            empty = (count == 0).T  # (S, K)
            crit[empty] = -1.0  # an empty subpopulation is never chosen
            infeasible = torch.zeros_like(empty)
            if self.criterion.calibrated:
                # no threshold >= 0 keeps the FP count within the budget (negatives on the template itself)
                infeasible = (theta < 0) & ~empty
                crit[infeasible] = -1.0
            best = crit.argmax(1)  # (S,) first maximum: the largest tolerance among ties
            fits = []
            M = tpl.M.cpu()
            mu = tpl.mu.cpu()
            for s in range(self.S):
                k = int(best[s])
                stats = {key: float(v[s, k]) for key, v in scores.items()}
                for key in ("tp", "fp", "tn", "fn"):
                    stats[key] = int(stats[key])
                if crit[s, k] < 0:  # nothing at this layer can be a valid chunk
                    nothing = torch.zeros(0, dtype=torch.long)
                    note = ("no stable subpopulation at any tolerance" if not infeasible[s].any() else
                            f"no threshold keeps the training false positives within {self.criterion}: more than "
                            f"{self.allowed_fp(n_neg)} negative token(s) have the template's exact state on every "
                            "candidate subpopulation (deviation 0; e.g. the same token as a positive at the "
                            "embedding layer)")
                    fits.append(LayerFit(layer=self.layers[s], subpopulation=nothing, template=torch.zeros(0),
                                         threshold=0.0, tolerance=float(self.taus[k]), stats=stats, note=note))
                    continue
                neurons = M[k, s].nonzero().flatten()
                fits.append(LayerFit(layer=self.layers[s], subpopulation=neurons, template=mu[s, neurons].clone(),
                                     threshold=float(theta[s, k]), tolerance=float(self.taus[k]), stats=stats))
            out[label] = fits
        return out

    def _calibrate(self, label: str, devR: torch.Tensor, n_neg: int):
        """theta just below the (m+1)-th smallest negative deviation, m = floor(B * negatives)."""
        keep = self.keep[label]  # (S, k, K) sorted ascending
        m = self.allowed_fp(n_neg)
        if m >= keep.shape[1]:  # the budget allows every negative
            first_out = torch.full(keep.shape[::2], float("inf"), dtype=torch.float64)
        else:
            first_out = keep[:, m, :]
        posdev = self.posdev[label].clone()
        slots = torch.searchsorted(self.pos_index[label], self.draws[label])
        posdev[:, slots, :] = devR
        posdev = torch.nan_to_num(posdev, nan=float("inf"))
        # a negative on the template (v = 0, e.g. the same token at the embedding layer, or constant states):
        # no threshold >= 0 excludes it, so this (layer, tolerance) is marked -1 and never chosen (see finish)
        theta = torch.where(first_out > 0, first_out * (1 - CALIBRATION_MARGIN), torch.full_like(first_out, -1.0))
        # no negative to exclude (none in the corpus): the smallest threshold that keeps every positive,
        # which is the paper's theta over all positives (0 when no positive has a finite deviation)
        finite = torch.where(torch.isfinite(posdev), posdev, torch.zeros_like(posdev))
        all_pos = finite.amax(1) if posdev.shape[1] else torch.zeros_like(first_out)
        theta = torch.where(torch.isinf(first_out), all_pos, theta)
        tp = (posdev <= theta[:, None, :]).sum(1)
        fp = (keep <= theta[:, None, :]).sum(1)
        return theta, tp, fp
