"""A model's identity: a small weight fingerprint that a dictionary records and checks.

Two loads of one model (fp32 on CPU, bf16 on GPU) agree within a few tenths of a
percent; different models differ by far more, so fingerprints are compared with
a relative tolerance, never hashed bit-for-bit.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from chunktui.engine.layout import ModelLayout


@torch.no_grad()
def model_fingerprint(model: nn.Module, layout: ModelLayout) -> list[float]:
    """A small vector that identifies a model's weights, robust to dtype and device.

    Norms of fixed rows of the input embedding and of the first and last
    block's parameters, in float32. Two loads of one model (fp32 on CPU, bf16
    on GPU) agree within a few tenths of a percent; different models differ by
    far more. Compared with a relative tolerance, never hashed bit-for-bit.
    """
    values: list[float] = []
    emb = _weight_value(model.get_input_embeddings(), "weight")
    rows = torch.linspace(0, emb.shape[0] - 1, 8).long().to(emb.device)
    values += emb[rows].float().norm(dim=-1).tolist()
    for block in (layout.blocks[0], layout.blocks[-1]):
        names = [n for n, p in block.named_parameters() if p.dim() == 2][:2]
        for name in names:
            owner, _, attr = name.rpartition(".")
            values.append(_weight_value(block.get_submodule(owner) if owner else block, attr).float().norm().item())
    return [round(v, 6) for v in values]


def _weight_value(module: nn.Module, attr: str) -> torch.Tensor:
    """A parameter's values, read back from accelerate's CPU or disk offload when it sits on the meta device."""
    param = getattr(module, attr)
    if param.device.type != "meta":
        return param.detach()
    from accelerate.utils import align_module_device

    with align_module_device(module, torch.device("cpu")):
        return getattr(module, attr).detach().clone()


def fingerprint_digest(values: list[float]) -> str:
    text = ",".join(f"{v:.2g}" for v in values)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprints_match(a: list[float], b: list[float], rtol: float = 0.02) -> bool:
    if len(a) != len(b) or not a:
        return False
    return all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-6) for x, y in zip(a, b))
