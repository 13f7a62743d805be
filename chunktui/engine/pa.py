"""Population averaging (METHOD.md section 1): chunks from labelled tokens.

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

from dataclasses import dataclass

import torch

from chunktui.engine.errors import CorpusError

PAPER_TOLERANCES: tuple[float, ...] = tuple(sorted({100.0, 30.0, 20.0, 10.0, 3.0} | {0.8 ** k for k in range(35)},
                                                   reverse=True))
CRITERIA = ("accuracy", "f1", "balanced")


@dataclass
class LayerFit:
    """The chosen chunk of one concept at one layer, and how it scored on the training text."""

    layer: int
    neurons: torch.Tensor  # (m,) int64, indices of the subpopulation M
    template: torch.Tensor  # (m,) float32, mu[M]
    threshold: float
    tolerance: float
    stats: dict  # tp, fp, tn, fn, tp_rate, fp_rate, accuracy, f1, balanced


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
        d2 = (rows.double() - mu64).square_().transpose(0, 1)
        return torch.bmm(d2, Mf64) * inv64[:, None, :]

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
        fits.append(LayerFit(layer=layer, neurons=neurons, template=mu[s, neurons].clone(),
                             threshold=float(theta[s, k]), tolerance=float(taus[k]), stats=stats))
    return fits, R
