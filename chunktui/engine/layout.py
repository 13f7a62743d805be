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

    def attention_norm(self, index: int) -> nn.Module:
        """Block `index`'s attention-side norm: its input is what attention reads (before the norm).

        `input_layernorm` in the LLaMA family, Phi and GPT-NeoX, `ln_1` in GPT-2, `ln_attn` (new decoder
        architecture) or `input_layernorm` in Falcon. A forward pre-hook on it edits what attention reads and
        leaves the residual stream as it was. In Phi-1/2 and parallel-attention Falcon the same norm also feeds
        the MLP, so there the edit reaches the MLP as well.
        """
        block = self.blocks[index]
        for name in _ATTENTION_NORMS:
            norm = getattr(block, name, None)
            if isinstance(norm, nn.Module):
                return norm
        raise UnsupportedArchitectureError(
            f"chunktui does not know the attention-side norm of a {self.architecture} block "
            f"({type(block).__name__}); use --site residual.")

    def edit_module(self, index: int, site: str) -> nn.Module:
        """The module whose forward pre-hook edits block `index` at `site` (residual: the block itself)."""
        if site == "residual":
            return self.blocks[index]
        if site == "attention":
            return self.attention_norm(index)
        raise ValueError(f"unknown site {site!r}")


# attribute names of a block's attention-side norm, tried in order
_ATTENTION_NORMS = ("ln_attn", "input_layernorm", "ln_1")


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
