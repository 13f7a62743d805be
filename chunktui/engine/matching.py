"""Matching every chunk against hidden states in a few batched tensor operations.

A dictionary is packed once per (device, layer axis) into flat index form:

    PA chunks: every (chunk, neuron) pair of every subpopulation becomes one
    entry of `flat_index` (position in the flattened (S * d) state), with its
    template value and owning chunk. For T tokens:

        diff2 = (H_flat[:, flat_index] - template_flat) ** 2     (T, N)
        dev   = index_add over owners / |M|                      (T, C_pa)

    Direction chunks: cos = <H[:, layer], u> / |H[:, layer]|      (T, C_dir)

Per chunk: deviation (or cosine), threshold, hit, and a score that ranks how
strongly it matched: log(threshold / deviation) for PA chunks and
log(cosine / threshold) for direction chunks, so score >= 0 exactly when hit.
No Python loop over chunks or tokens; long sequences go in token blocks.
"""

from __future__ import annotations

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
    token_chunk: torch.Tensor  # (T,) strongest hit over all layers, -1 if none
    token_score: torch.Tensor  # (T,)

    def to(self, device) -> "MatchResult":
        return MatchResult(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __getitem__(self, index) -> "MatchResult":
        return MatchResult(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


class PackedDictionary:
    """Chunks packed for matching against states laid out as (T, len(layers), d)."""

    def __init__(self, chunks: Sequence[Chunk], width: int, layers: Sequence[int], device: torch.device | str = "cpu"):
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
        self.threshold = torch.tensor([float(c.threshold) for c in self.chunks], dtype=torch.float32)

        if pa:
            sizes = torch.tensor([c.neurons.numel() for c in pa])
            self.flat_index = torch.cat([axis[c.layer] * width + c.neurons.long() for c in pa])
            self.flat_template = torch.cat([c.template.float() for c in pa])
            self.owner = torch.repeat_interleave(torch.arange(len(pa)), sizes)
            self.inv_size = 1.0 / sizes.float()
        else:
            self.flat_index = torch.zeros(0, dtype=torch.long)
            self.flat_template = torch.zeros(0)
            self.owner = torch.zeros(0, dtype=torch.long)
            self.inv_size = torch.zeros(0)
        if dirs:
            self.directions = torch.stack([c.direction.float() / c.direction.float().norm() for c in dirs])  # (Cd, d)
            self.dir_layer = torch.tensor([axis[c.layer] for c in dirs], dtype=torch.long)
        else:
            self.directions = torch.zeros(0, width)
            self.dir_layer = torch.zeros(0, dtype=torch.long)

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
        for name in ("chunk_layer", "threshold", "flat_index", "flat_template", "owner", "inv_size", "directions",
                     "dir_layer", "layer_table"):
            setattr(self, name, getattr(self, name).to(self.device))

    def __len__(self) -> int:
        return len(self.chunks)

    @torch.no_grad()
    def match(self, H: torch.Tensor, block_elements: int = 1 << 24) -> MatchResult:
        """Match all chunks against H (T, S, d) -> MatchResult. H may live on any device/dtype."""
        if H.dim() == 2:
            H = H.unsqueeze(0)
        T, S, d = H.shape
        if S != len(self.layers) or d != self.width:
            raise ValueError(f"states have shape (T, {S}, {d}); this pack expects (T, {len(self.layers)}, {self.width})")
        per_token = max(int(self.flat_index.numel()) + len(self.chunks) * 4, 1)
        step = max(1, block_elements // per_token)
        parts = [self._match_block(H[a:a + step].to(self.device, torch.float32)) for a in range(0, T, step)]
        value = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, len(self))
        score = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, len(self))
        return self._summarise(value, score)

    def _match_block(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = H.shape[0]
        value = torch.empty(T, len(self.chunks), device=self.device)
        score = torch.empty_like(value)
        if self.n_pa:
            flat = H.reshape(T, -1)
            diff2 = (flat[:, self.flat_index] - self.flat_template).square_()  # (T, N)
            dev = torch.zeros(T, self.n_pa, device=self.device).index_add_(1, self.owner, diff2) * self.inv_size
            theta = self.threshold[: self.n_pa]
            value[:, : self.n_pa] = dev
            score[:, : self.n_pa] = torch.log((theta + _EPS) / (dev + _EPS))
        if len(self.chunks) > self.n_pa:
            states = H[:, self.dir_layer, :]  # (T, Cd, d)
            cos = (states * self.directions).sum(-1) / states.norm(dim=-1).clamp(min=_EPS)
            theta = self.threshold[self.n_pa:]
            value[:, self.n_pa:] = cos
            score[:, self.n_pa:] = torch.log(cos.clamp(min=_EPS) / theta.clamp(min=_EPS))
        return value, score

    def _summarise(self, value: torch.Tensor, score: torch.Tensor) -> MatchResult:
        T = value.shape[0]
        thr = self.threshold
        hit = torch.empty_like(value, dtype=torch.bool)
        hit[:, : self.n_pa] = value[:, : self.n_pa] <= thr[: self.n_pa]
        hit[:, self.n_pa:] = value[:, self.n_pa:] >= thr[self.n_pa:]
        neg_inf = torch.tensor(float("-inf"), device=self.device)
        hit_score = torch.where(hit, score, neg_inf)  # (T, C)
        S = len(self.layers)
        if len(self.chunks):
            padded = torch.cat([hit_score, torch.full((T, 1), float("-inf"), device=self.device)], dim=1)
            grid = padded[:, self.layer_table]  # (T, S, Cmax); index -1 hits the -inf column
            layer_score, pos = grid.max(-1)
            layer_chunk = torch.where(torch.isfinite(layer_score), self.layer_table[torch.arange(S, device=self.device), pos],
                                      torch.tensor(-1, device=self.device))
            token_score, token_chunk = hit_score.max(-1)
            token_chunk = torch.where(torch.isfinite(token_score), token_chunk, torch.tensor(-1, device=self.device))
        else:
            layer_score = torch.full((T, S), float("-inf"), device=self.device)
            layer_chunk = torch.full((T, S), -1, dtype=torch.long, device=self.device)
            token_score = torch.full((T,), float("-inf"), device=self.device)
            token_chunk = torch.full((T,), -1, dtype=torch.long, device=self.device)
        return MatchResult(value=value, score=score, hit=hit, layer_score=layer_score, layer_chunk=layer_chunk,
                           token_chunk=token_chunk, token_score=token_score)


def pack(chunks: Sequence[Chunk], width: int, n_states: int, device="cpu", layers: Sequence[int] | None = None) -> PackedDictionary:
    return PackedDictionary(chunks, width, list(range(n_states)) if layers is None else layers, device)


def direct_deviation(chunk: Chunk, state: torch.Tensor) -> float:
    """Reference: the deviation of one state (d,) from one PA chunk, computed plainly (for tests)."""
    values = state.float()[chunk.neurons.long()]
    return float(((values - chunk.template.float()) ** 2).mean())
