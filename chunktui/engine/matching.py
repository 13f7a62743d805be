"""Matching every chunk against hidden states in a few batched tensor operations.

A dictionary is packed once per (device, layer axis). For a PA chunk with
subpopulation M (mask m) and template mu, the summed squared deviation

    sum_j m_j (h_j - mu_j)^2 = [h^2, h] . [m, -2 m mu] + sum_j m_j mu_j^2

is one column of a per-layer matrix, and a direction chunk u is the column
[0, u] (giving h . u, divided by |h| for the cosine). All chunks of all layers
are then one batched matmul over the layers that have chunks:

    X = [H^2, H]            (S_used, T, 2d)    float64
    W                       (S_used, 2d, Cmax) float64, padded per layer
    X @ W                   (S_used, T, Cmax)  -> (T, C)

float64 keeps the expansion exact to ~1e-12 of the magnitudes involved; a
matching rounding tolerance keeps exact matches (dev = theta = 0, e.g. the
same token at layer 0) exact.

Per chunk: deviation (or cosine), threshold, hit, and a score that ranks how
strongly it matched: log(threshold / deviation) for PA chunks and
log(cosine / threshold) for direction chunks, so score >= 0 exactly when hit.
No Python loop over chunks or tokens; long sequences go in token blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from chunktui.engine.dictionary import Chunk

_EPS = 1e-12


@dataclass
class MatchResult:
    """Matches of C chunks over T tokens. Tensors are on the packing device."""

    value: torch.Tensor  # (T, C) deviation (PA) or cosine (direction)
    score: torch.Tensor  # (T, C) >= 0 iff hit
    hit: torch.Tensor  # (T, C) bool
    layer_score: torch.Tensor  # (T, S) best score among hits at each layer axis position, -inf if none
    layer_chunk: torch.Tensor  # (T, S) chunk index of that best hit, -1 if none
    token_chunk: torch.Tensor  # (T,) the chunk whose label colours the token (the rule's decision), -1 if none
    token_score: torch.Tensor  # (T,) that chunk's score
    # with a colour rule (shared/evidence.py): the decided concept's evidence and agreeing layers; None without
    token_evidence: torch.Tensor | None = None  # (T,) float, NaN where no concept is shown
    token_agree: torch.Tensor | None = None  # (T,) long, layers (of the voting ones) whose chunk matched; 0 if none

    def to(self, device) -> "MatchResult":
        return MatchResult(*(None if getattr(self, f) is None else getattr(self, f).to(device)
                             for f in self.__dataclass_fields__))

    def __getitem__(self, index) -> "MatchResult":
        return MatchResult(*(None if getattr(self, f) is None else getattr(self, f)[index]
                             for f in self.__dataclass_fields__))


class PackedDictionary:
    """Chunks packed for matching against states laid out as (T, len(layers), d).

    With a `rule` (a `shared.evidence.TokenRule`, what `ChunkDictionary.token_rule()` gives), the chunk a token
    is coloured by follows the rule: a concept's layers pool their evidence and a concept is shown only when it
    passes its calibrated requirement. Without one, the strongest hit over all layers (the raw view).
    """

    def __init__(self, chunks: Sequence[Chunk], width: int, layers: Sequence[int], device: torch.device | str = "cpu",
                 precision: str = "auto", rule=None):
        self.layers = list(layers)
        self.width = width
        self.device = torch.device(device)
        axis = {layer: s for s, layer in enumerate(self.layers)}
        usable = [c for c in chunks if c.layer in axis]
        # chunks are ordered PA first, then directions; within each, by layer
        pa = sorted((c for c in usable if c.kind == "pa"), key=lambda c: c.layer)
        dirs = sorted((c for c in usable if c.kind == "direction"), key=lambda c: c.layer)
        self.chunks: list[Chunk] = pa + dirs
        self.n_pa = len(pa)
        self.labels = [c.label for c in self.chunks]
        self.chunk_layer = torch.tensor([axis[c.layer] for c in self.chunks], dtype=torch.long)
        self.threshold = torch.tensor([float(c.threshold) for c in self.chunks], dtype=torch.float64)

        # layer groups padded into an (S, Cmax) table of chunk indices (-1 = padding)
        S = len(self.layers)
        counts = torch.bincount(self.chunk_layer, minlength=S) if self.chunks else torch.zeros(S, dtype=torch.long)
        cmax = max(int(counts.max()) if len(counts) else 0, 1)
        table = torch.full((S, cmax), -1, dtype=torch.long)
        fill = [0] * S
        for i, s in enumerate(self.chunk_layer.tolist()):
            table[s, fill[s]] = i
            fill[s] += 1
        self.layer_table = table
        # the matmul form: one padded weight matrix per layer that has chunks
        used = sorted({int(x) for x in self.chunk_layer.tolist()})
        self.used_layers = torch.tensor(used, dtype=torch.long)
        slot = {layer: i for i, layer in enumerate(used)}
        width2 = 2 * width
        W = torch.zeros(max(len(used), 1), width2, cmax, dtype=torch.float64)
        const = torch.zeros(len(self.chunks), dtype=torch.float64)
        size = torch.ones(len(self.chunks), dtype=torch.float64)
        self.column = torch.zeros(len(self.chunks), dtype=torch.long)  # flat index into (S_used * Cmax)
        for s_axis in range(S):
            for col, c in enumerate(table[s_axis].tolist()):
                if c < 0:
                    continue
                chunk, u = self.chunks[c], slot[s_axis]
                if chunk.kind == "pa":
                    idx = chunk.subpopulation.long()
                    mu = chunk.template.double()
                    W[u, idx, col] = 1.0
                    W[u, width + idx, col] = -2.0 * mu
                    const[c] = float((mu * mu).sum())
                    size[c] = float(idx.numel())
                else:
                    d = chunk.direction.double()
                    W[u, width:, col] = d / d.norm()
                self.column[c] = u * cmax + col
        self.is_pa = torch.tensor([c.kind == "pa" for c in self.chunks], dtype=torch.bool)
        self.slot = torch.div(self.column, cmax, rounding_mode="floor")  # (C,) index into used layers
        self.layer_table = self.layer_table.to(self.device)
        self.precision = _choose_precision(precision, self.device)
        # float64 decisions are the reference; the device that computes them (Apple's MPS has no float64: the CPU)
        self.exact_device = torch.device("cpu") if self.device.type == "mps" else self.device
        index = dict(used_layers=self.used_layers, column=self.column, slot=self.slot, is_pa=self.is_pa,
                     all_pa=bool(self.is_pa.all()))
        self._exact = _Tables(W=W, const=const, size=size, threshold=self.threshold, **index).to(
            self.exact_device, torch.float64)
        self._fast = None
        if self.precision == "float32":
            self._fast = _Tables(W=W, const=const, size=size, threshold=self.threshold, **index).to(
                self.device, torch.float32)
        self.rechecked = 0  # tokens the float32 path handed to float64 (near a threshold), since packing
        self._set_rule(rule)

    # ------------------------------------------------------------------ the token-level decision

    def _set_rule(self, rule) -> None:
        """Concept order, which chunks vote, and each concept's requirement, as tensors for `_summarise`."""
        from chunktui.shared.evidence import DEFAULT_CAP

        self.rule = rule
        self.concepts: list[str] = list(dict.fromkeys(self.labels))
        index = {label: k for k, label in enumerate(self.concepts)}
        self.chunk_concept = torch.tensor([index[label] for label in self.labels], dtype=torch.long)
        default = [l for l in self.layers if l != 0] or list(self.layers)
        voting = set(rule.voting(self.layers) if rule is not None else default)
        self.votes = torch.tensor([c.layer in voting for c in self.chunks], dtype=torch.bool)
        self.voting_layers = sorted(voting)
        self.cap = float(rule.cap) if rule is not None else DEFAULT_CAP
        # (C, K): chunk c adds to concept k's evidence when it votes
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        onehot = torch.zeros(len(self.chunks), len(self.concepts), dtype=dtype)
        if len(self.chunks):
            onehot[torch.arange(len(self.chunks)), self.chunk_concept] = self.votes.to(dtype)
        self._onehot = onehot.to(self.device)
        self.voters = onehot.sum(0).long().tolist()  # voting chunks per concept
        calibrated = rule is not None and rule.calibrated
        self.required = None
        if calibrated:  # a concept the rule does not know is never shown
            self.required = torch.tensor([float(rule.required.get(label, float("inf"))) for label in self.concepts],
                                         dtype=dtype, device=self.device)

    def evidence(self, score: torch.Tensor, hit: torch.Tensor | None = None) -> torch.Tensor:
        """(T, C) scores -> (T, K) pooled evidence per concept: the sum over voting layers of the capped score."""
        capped = score.to(self._onehot.dtype).clamp(-self.cap, self.cap)
        capped = torch.nan_to_num(capped, nan=-self.cap)  # an empty subpopulation votes against
        return capped @ self._onehot

    def agreement(self, hit: torch.Tensor) -> torch.Tensor:
        """(T, C) hits -> (T, K) number of voting layers whose chunk of the concept matched."""
        return (hit.to(self._onehot.dtype) @ self._onehot).round().long()

    def _decide(self, score: torch.Tensor, hit: torch.Tensor, hit_score: torch.Tensor):
        """The rule's choice per token: (chunk index or -1, its score, evidence, agreeing layers)."""
        T, K = hit.shape[0], len(self.concepts)
        dev = self.device
        neg_inf = torch.tensor(float("-inf"), device=dev)
        evidence = self.evidence(score)  # (T, K)
        agree = self.agreement(hit)
        voting_hit = torch.where(self.votes.to(dev), hit_score, neg_inf)  # (T, C)
        # the strongest voting hit per concept (which chunk stands for the concept)
        best = torch.full((T, K), float("-inf"), device=dev, dtype=voting_hit.dtype)
        best = best.scatter_reduce(1, self.chunk_concept.to(dev).expand(T, -1), voting_hit, "amax")
        if self.required is not None:
            margin = evidence - self.required
            margin = torch.where(margin >= 0, margin, torch.tensor(float("-inf"), device=dev, dtype=margin.dtype))
        else:  # uncalibrated: any voting hit, the strongest wins (the raw view without layer 0)
            margin = best.to(evidence.dtype)
        margin = torch.where(torch.isfinite(best), margin, torch.tensor(float("-inf"), device=dev, dtype=margin.dtype))
        top, concept = margin.max(-1) if K else (torch.full((T,), float("-inf"), device=dev),
                                                 torch.zeros(T, dtype=torch.long, device=dev))
        shown = torch.isfinite(top)
        mine = self.chunk_concept.to(dev)[None, :] == concept[:, None]  # (T, C)
        chunk_score, chunk = torch.where(mine, voting_hit, neg_inf).max(-1)
        chunk = torch.where(shown, chunk, torch.tensor(-1, device=dev))
        chunk_score = torch.where(shown, chunk_score, neg_inf)
        rows = torch.arange(T, device=dev)
        token_evidence = torch.where(shown, evidence[rows, concept].float(), torch.tensor(float("nan"), device=dev))
        token_agree = torch.where(shown, agree[rows, concept], torch.tensor(0, device=dev))
        return chunk, chunk_score, token_evidence, token_agree

    def __len__(self) -> int:
        return len(self.chunks)

    @torch.no_grad()
    def match(self, H: torch.Tensor, block_elements: int | None = None) -> MatchResult:
        """Match all chunks against H (T, S, d) -> MatchResult. H may live on any device/dtype.

        Tokens go through in blocks of about `block_elements` working elements: on a CPU 2^22 (a block's
        float64 working copy stays near the cache, a third faster than 2^24 on a 2-core machine, the same
        values), elsewhere 2^24 (bigger kernels)."""
        if H.dim() == 2:
            H = H.unsqueeze(0)
        T, S, d = H.shape
        if S != len(self.layers) or d != self.width:
            raise ValueError(f"states have shape (T, {S}, {d}); this pack expects (T, {len(self.layers)}, {self.width})")
        step = self._token_step(block_elements)
        parts = [self._match_block(H[a:a + step]) for a in range(0, T, step)] or [
            (torch.zeros(0, len(self), device=self.device),) * 2 + (torch.zeros(0, len(self), dtype=torch.bool, device=self.device),)]
        value, score, hit = (torch.cat([p[i] for p in parts]) for i in range(3))
        return self._summarise(value, score, hit)

    def _token_step(self, block_elements: int | None) -> int:
        """Tokens per block (see `match`)."""
        if block_elements is None:
            block_elements = 1 << 22 if self.device.type == "cpu" else 1 << 24
        W = self._exact.W
        per_token = max(int(W.shape[0]) * (int(W.shape[1]) + int(W.shape[2])) + 8 * len(self.chunks), 1)
        return max(1, block_elements // per_token)

    @torch.no_grad()
    def pooled_evidence(self, H: torch.Tensor, block_elements: int | None = None) -> torch.Tensor:
        """(T, K) `evidence` of `match(H).score`, without the per-layer and per-token summaries `match` adds."""
        T = H.shape[0]
        step = self._token_step(block_elements)
        if not self.chunks or not T:
            return self.evidence(torch.zeros(T, len(self), device=self.device))
        return torch.cat([self.evidence(self._match_block(H[a:a + step])[1]) for a in range(0, T, step)])

    def _match_block(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = H.shape[0]
        if not self.chunks:
            empty = torch.zeros(T, 0, device=self.device)
            return empty, empty, empty.bool()
        if self._fast is None:
            return tuple(x.to(self.device) for x in _evaluate(self._exact, H.to(self.exact_device), self.width))
        value, score, hit, near = _evaluate(self._fast, H.to(self.device), self.width, screen=True)
        rows = near.nonzero().flatten()
        if len(rows):  # decided in float64, exactly as the reference decides them
            exact = _evaluate(self._exact, H[rows.to(H.device)].to(self.exact_device), self.width)
            value[rows], score[rows], hit[rows] = (x.to(self.device) for x in exact)
            self.rechecked += len(rows)
        return value, score, hit

    def _summarise(self, value: torch.Tensor, score: torch.Tensor, hit: torch.Tensor) -> MatchResult:
        T = value.shape[0]
        neg_inf = torch.tensor(float("-inf"), device=self.device)
        hit_score = torch.where(hit, score, neg_inf)  # (T, C)
        S = len(self.layers)
        if len(self.chunks):
            padded = torch.cat([hit_score, torch.full((T, 1), float("-inf"), device=self.device)], dim=1)
            grid = padded[:, self.layer_table]  # (T, S, Cmax); index -1 hits the -inf column
            layer_score, pos = grid.max(-1)
            layer_chunk = torch.where(torch.isfinite(layer_score), self.layer_table[torch.arange(S, device=self.device), pos],
                                      torch.tensor(-1, device=self.device))
            token_evidence = token_agree = None
            if self.rule is not None:
                token_chunk, token_score, token_evidence, token_agree = self._decide(score, hit, hit_score)
            else:
                token_score, token_chunk = hit_score.max(-1)
                token_chunk = torch.where(torch.isfinite(token_score), token_chunk, torch.tensor(-1, device=self.device))
        else:
            layer_score = torch.full((T, S), float("-inf"), device=self.device)
            layer_chunk = torch.full((T, S), -1, dtype=torch.long, device=self.device)
            token_score = torch.full((T,), float("-inf"), device=self.device)
            token_chunk = torch.full((T,), -1, dtype=torch.long, device=self.device)
            token_evidence = token_agree = None
            if self.rule is not None:
                token_evidence = torch.full((T,), float("nan"), device=self.device)
                token_agree = torch.zeros(T, dtype=torch.long, device=self.device)
        return MatchResult(value=value, score=score, hit=hit, layer_score=layer_score, layer_chunk=layer_chunk,
                           token_chunk=token_chunk, token_score=token_score, token_evidence=token_evidence,
                           token_agree=token_agree)


def pack(chunks: Sequence[Chunk], width: int, n_states: int, device="cpu", layers: Sequence[int] | None = None,
         precision: str = "auto", rule=None) -> PackedDictionary:
    return PackedDictionary(chunks, width, list(range(n_states)) if layers is None else layers, device, precision,
                            rule=rule)


# --------------------------------------------------------------------------- the arithmetic, in either precision


def _choose_precision(precision: str, device: torch.device) -> str:
    """auto: float32 screening on accelerators (float64 is slow on most GPUs, absent on MPS), float64 on CPU."""
    if precision not in ("auto", "float32", "float64"):
        raise ValueError(f"precision must be auto, float32 or float64, not {precision!r}")
    if precision == "auto":
        return "float32" if device.type in ("cuda", "mps") else "float64"
    return precision


@dataclass
class _Tables:
    """The packed weights in one dtype on one device."""

    W: torch.Tensor  # (S_used, 2d, Cmax): rows [:d] the masks m, rows [d:] -2 m mu (PA) or u (direction)
    const: torch.Tensor  # (C,) sum m mu^2
    size: torch.Tensor  # (C,) |M|
    threshold: torch.Tensor  # (C,)
    used_layers: torch.Tensor
    column: torch.Tensor
    slot: torch.Tensor
    is_pa: torch.Tensor
    all_pa: bool = False  # no direction chunk: `_evaluate` computes the PA branch alone

    def to(self, device, dtype) -> "_Tables":
        return _Tables(**{k: (v.to(dtype) if v.is_floating_point() else v).to(device) if torch.is_tensor(v) else v
                          for k, v in self.__dict__.items()})


_BAND_SAFETY = 2.0  # the band is twice the proven bound


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u), u = 2^-24: the classic bound on the relative error of n float32 operations."""
    nu = n * 2.0 ** -24
    return nu / (1.0 - nu)


@contextlib.contextmanager
def _ieee_float32():
    """cuBLAS may use TF32 (10-bit mantissa) for float32 matmuls when allowed; the bound below needs IEEE float32."""
    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        old, key, ieee = matmul.fp32_precision, "fp32_precision", "ieee"
    except (AttributeError, RuntimeError):
        old, key, ieee = matmul.allow_tf32, "allow_tf32", False
    setattr(matmul, key, ieee)
    try:
        yield
    finally:
        setattr(matmul, key, old)


def _evaluate(t: _Tables, H: torch.Tensor, width: int, screen: bool = False):
    """Deviation / cosine, score and hit of every chunk for H (T, S, d), in t's dtype.

    With `screen` (float32), also returns `near` (T,): tokens whose decision for some chunk could differ
    from the float64 reference, which the caller recomputes in float64. The bound, per chunk:

      PA. dev = (A + B + const) / |M| with A = sum m h^2 (d products), B = sum -2 m mu h (d products).
      Any summation order in IEEE float32 gives |fl(x) - x| <= gamma_n * sum |terms| (Higham, Accuracy and
      Stability, 3.1); counting the squaring, the two additions, the rounding of const to float32 and the
      division, n = d + 5, and sum |terms| = A + 2 sum m |h mu| + const <= (sqrt(A) + sqrt(const))^2
      (Cauchy-Schwarz). So |dev32 - dev| <= gamma_{d+5} (sqrt(A) + sqrt(const))^2 / |M|.
      Direction. cos = (h . u) / |h| with |u| = 1: |cos32 - cos| <= 2 gamma_{d+5} (|h . u| <= |h|).
      The float64 reference errs by ~1e-16 of the same magnitudes and shifts dev by its rounding
      tolerance 1e-11 (|h|^2 + const) / |M|; both are added to the band.
    A token is `near` when, for some chunk, |value32 - threshold| <= 2 x that bound (a factor 2 to spare),
    or when anything is not finite (float32 overflows where float64 does not). Outside the band the
    float32 decision provably equals the float64 one.
    """
    T = H.shape[0]
    dtype = t.W.dtype
    if screen:
        Hu = H[:, t.used_layers].to(dtype).transpose(0, 1)  # (S_used, T, d)
        sq = Hu * Hu
    else:
        # X = [h^2 | h] (S_used, T, 2d) filled in place: the values concatenating Hu^2 and Hu gives, without
        # the converted copy, the squares and the concatenation as three tensors of their own
        X = torch.empty(len(t.used_layers), T, 2 * width, dtype=dtype, device=H.device)
        Hu, sq = X[..., width:], X[..., :width]
        Hu.copy_(H.transpose(0, 1) if len(t.used_layers) == H.shape[1] else H[:, t.used_layers].transpose(0, 1))
        torch.mul(Hu, Hu, out=sq)
    with _ieee_float32() if dtype == torch.float32 else contextlib.nullcontext():
        if screen:
            A = torch.bmm(sq, t.W[:, :width]).transpose(0, 1).reshape(T, -1)[:, t.column]  # (T, C) sum m h^2
            B = torch.bmm(Hu, t.W[:, width:]).transpose(0, 1).reshape(T, -1)[:, t.column]  # (T, C)
            raw = A + B
        else:
            raw = torch.bmm(X, t.W).transpose(0, 1).reshape(T, -1)[:, t.column]  # (T, C)
    sq_norms = sq.sum(-1).transpose(0, 1)[:, t.slot]  # (T, C): |h|^2 at the chunk's layer
    # PA: deviation = (raw + sum m mu^2) / |M|. Rounding in the expansion is bounded by a tiny
    # fraction of the magnitudes summed (|h|^2 + sum m mu^2 bounds every term); deviations within
    # that bound of 0 are exact matches (dev = theta = 0 at layer 0).
    shift = (sq_norms + t.const) * 1e-11
    dev = ((raw + t.const - shift) / t.size).clamp(min=0)
    theta = t.threshold
    if t.all_pa:  # no direction: the PA branch alone, the very values the selection below takes from it
        value, hit, score = dev, dev <= theta, torch.log((theta + _EPS) / (dev + _EPS))
    else:
        cos = raw / sq_norms.sqrt().clamp(min=_EPS)  # direction: (h . u) / |h|
        value = torch.where(t.is_pa, dev, cos)
        hit = torch.where(t.is_pa, dev <= theta, cos >= theta)
        score = torch.where(t.is_pa, torch.log((theta + _EPS) / (dev + _EPS)),
                            torch.log(cos.clamp(min=_EPS) / theta.clamp(min=_EPS)))
    # score >= 0 exactly when hit, also where the logarithm rounds to (minus) zero
    score = torch.where(hit, score.clamp(min=0), score.clamp(max=-1e-30))
    if not screen:
        return value.float(), score.float(), hit
    g = _gamma(width + 5)
    A64, const64 = A.clamp(min=0).double() * (1 + 2 * g), t.const.double()
    pa_band = g * (A64.sqrt() + const64.sqrt()) ** 2 / t.size.double() + \
        2e-11 * (sq_norms.double() * (1 + 2 * g) + const64) / t.size.double()
    band = _BAND_SAFETY * torch.where(t.is_pa, pa_band, torch.full_like(pa_band, 2 * g + 1e-12))
    gap = (value.double() - theta.double()).abs()
    # theta in float32 is theta64 rounded: compare against the float64 threshold the reference uses
    near_pair = (gap <= band) | ~torch.isfinite(gap) | ~torch.isfinite(band)
    return value.float(), score.float(), hit, near_pair.any(-1)


def direct_deviation(chunk: Chunk, state: torch.Tensor) -> float:
    """Reference: the deviation of one state (d,) from one PA chunk, computed plainly (for tests)."""
    values = state.float()[chunk.subpopulation.long()]
    return float(((values - chunk.template.float()) ** 2).mean())
