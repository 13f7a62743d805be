"""The one module that knows model layouts: where an architecture keeps its decoder blocks and final norm."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from chunktui.shared.errors import UnsupportedArchitectureError


@dataclass
class ModelLayout:
    """Where the residual stream can be read and edited.

    `blocks[l]` is decoder block `l`; its forward pre-hook sees H[l] (the
    residual stream entering it). `final_norm`'s output is H[L].
    """

    blocks: nn.ModuleList
    final_norm: nn.Module
    n_layers: int
    hidden_size: int
    architecture: str

    @property
    def n_states(self) -> int:
        """Number of hidden-state indices, L + 1 (embedding output to final norm)."""
        return self.n_layers + 1


# attribute paths of (blocks, final norm), tried in order
_LAYOUTS: list[tuple[str, str, str]] = [
    ("llama-family", "model.layers", "model.norm"),  # LLaMA, Mistral, Qwen2, Gemma, Phi-3
    ("phi", "model.layers", "model.final_layernorm"),  # Phi-1/2
    ("gpt2", "transformer.h", "transformer.ln_f"),
    ("gpt-neox", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
    ("falcon", "transformer.h", "transformer.ln_f"),
]


def _get_path(obj: object, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layout(model: nn.Module) -> ModelLayout:
    """The decoder blocks, final norm, depth and width of a causal LM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    for family, blocks_path, norm_path in _LAYOUTS:
        blocks = _get_path(model, blocks_path)
        norm = _get_path(model, norm_path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and isinstance(norm, nn.Module):
            hidden = _hidden_size(config)
            if hidden is None:
                break
            return ModelLayout(blocks=blocks, final_norm=norm, n_layers=len(blocks),
                               hidden_size=hidden, architecture=f"{model_type} ({family})")
    raise UnsupportedArchitectureError(
        f"chunktui does not know where the decoder blocks of a '{model_type}' model "
        f"({type(model).__name__}) are. Supported: LLaMA-family (LLaMA, Mistral, Qwen2, Gemma, Phi-3), "
        "Phi-1/2, GPT-2, GPT-NeoX, Falcon."
    )


def _hidden_size(config) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    return _hidden_size(text_config) if text_config is not None else None
