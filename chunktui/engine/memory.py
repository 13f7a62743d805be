"""Device memory: what the weights, the KV cache and the recorded states take, and whether a run fits.

`memory_report(loaded, kv_tokens, state_tokens)` is what the model card and
the status bar show: per device (cuda:N, cpu, disk, mps) the weights placed
there, the KV cache of the tokens read so far, the hidden states kept, and
the device's free and total memory (peak allocation on CUDA).

`ensure_fits(...)` refuses a generation or scan that will not fit before the
first forward pass, from an estimate:

    KV cache   2 x kv_heads x head_dim x bytes, per block, per token, per row (on each block's device);
               the lean LLaMA's buffers counted with their room to grow (`kv_rows`)
    states     (L+1) x d x bytes per token kept (on the input device), when recorded
    logits     V x (bytes + 8) per row, or per token when every position's logits are kept
    prefill    B x T x max(intermediate, 4d) x bytes x 2: the widest activation of one block, twice

It is an estimate, deliberately on the high side for the KV cache (sliding
windows and hybrid caches hold less); a run is refused only when it exceeds
what the device has free, so anything refused would not have fitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from chunktui.engine.devices import module_device
from chunktui.shared.errors import DeviceMemoryError

if TYPE_CHECKING:
    from chunktui.engine.models import LoadedModel



_GiB = 2**30


@dataclass
class DeviceMemory:
    """One device's share of a loaded model and its run, in bytes."""

    device: str
    weights: int = 0
    kv_cache: int = 0
    states: int = 0
    free: int | None = None  # free on the device now (None when unknown; disk is not measured)
    total: int | None = None
    peak: int | None = None  # CUDA: peak allocated by torch since the start (or the last reset)

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.states

    def to_json(self) -> dict:
        return dict(asdict(self), used=self.used)


def _device_name(where) -> str:
    if isinstance(where, int):
        return f"cuda:{where}"
    where = torch.device(where) if not isinstance(where, str) else where
    if isinstance(where, torch.device):
        if where.type == "cuda":
            return f"cuda:{where.index if where.index is not None else torch.cuda.current_device()}"
        return where.type
    return "cuda:0" if where == "cuda" else str(where)


def _mapped(name: str, device_map: dict) -> str:
    """The device_map entry that owns parameter `name` (longest matching module prefix)."""
    best, where = -1, None
    for prefix, target in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, where = len(prefix), target
    return _device_name(where if where is not None else "cpu")


def weight_bytes(loaded: LoadedModel) -> dict[str, int]:
    """Bytes of weights by where they live: cuda:N, cpu, mps, or disk (accelerate's offload)."""
    out: dict[str, int] = {}
    for name, param in loaded.model.named_parameters():
        if loaded.device_map:
            where = _mapped(name, loaded.device_map)
        else:
            where = _device_name(param.device)
        out[where] = out.get(where, 0) + param.numel() * param.element_size()
    return out


def _text_config(loaded: LoadedModel):
    config = loaded.model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_token(loaded: LoadedModel) -> dict[str, int]:
    """KV-cache bytes one token adds on each device (keys and values of every block, model dtype)."""
    config = _text_config(loaded)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or loaded.hidden_size // heads
    per_block = 2 * kv_heads * head_dim * torch.tensor([], dtype=loaded.dtype).element_size()
    out: dict[str, int] = {}
    for block in loaded.layout.blocks:
        where = _device_name(module_device(block, loaded.device))
        out[where] = out.get(where, 0) + per_block
    return out


def kv_rows(loaded: LoadedModel, tokens: int) -> int:
    """Rows the model's KV cache takes for `tokens` cached tokens: for the lean LLaMA, the most its buffers,
    which grow by blocks, can hold then (`lean.KVCache.room_for`: up to 2 x BLOCK - 1 rows more than the tokens,
    511 with blocks of 256); transformers' caches hold the rows themselves."""
    from chunktui.engine.lean import LlamaForCausalLM, KVCache

    tokens = max(int(tokens), 0)
    return KVCache.room_for(tokens) if isinstance(loaded.model, LlamaForCausalLM) else tokens


def state_bytes_per_token(loaded: LoadedModel, n_layers: int | None = None, dtype: torch.dtype | None = None) -> int:
    """Bytes of one token's recorded hidden states (all L+1 layers unless `n_layers`)."""
    n = loaded.layout.n_states if n_layers is None else n_layers
    return n * loaded.hidden_size * torch.tensor([], dtype=dtype or loaded.dtype).element_size()


def device_memory(device: str) -> tuple[int | None, int | None]:
    """(free, total) bytes of a device now; free counts memory torch has cached but not allocated."""
    try:
        if device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            free, total = torch.cuda.mem_get_info(index)
            return free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index), total
        if device == "cpu":
            info = {}
            with open("/proc/meminfo") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    info[key] = int(value.split()[0]) * 1024
            return info.get("MemAvailable"), info.get("MemTotal")
        if device == "mps" and hasattr(torch, "mps"):
            total = int(torch.mps.recommended_max_memory())
            return total - int(torch.mps.current_allocated_memory()), total
    except (OSError, ValueError, RuntimeError, AttributeError):
        pass
    return None, None


def available_bytes(device: str) -> int | None:
    """What a new allocation can use on `device` (None when unknown: then nothing is refused)."""
    return device_memory(device)[0]


def memory_report(loaded: LoadedModel, kv_tokens: int = 0, state_tokens: int = 0, batch: int = 1,
                  state_device: str | torch.device | None = None,
                  state_dtype: torch.dtype | None = None) -> list[DeviceMemory]:
    """Per device: weights, KV cache of `kv_tokens` tokens (x batch rows), `state_tokens` tokens of recorded
    states (kept on `state_device`, by default the input device), free/total and peak memory."""
    rows: dict[str, DeviceMemory] = {}

    def row(name: str) -> DeviceMemory:
        if name not in rows:
            rows[name] = DeviceMemory(device=name)
        return rows[name]

    for where, size in weight_bytes(loaded).items():
        row(where).weights += size
    rows_kv = kv_rows(loaded, kv_tokens)
    for where, size in kv_bytes_per_token(loaded).items():
        row(where).kv_cache += size * rows_kv * batch
    if state_tokens:
        where = _device_name(state_device if state_device is not None else loaded.device)
        row(where).states += state_bytes_per_token(loaded, dtype=state_dtype) * state_tokens
    for name, entry in rows.items():
        if name != "disk":
            entry.free, entry.total = device_memory(name)
        if name.startswith("cuda") and torch.cuda.is_available():
            entry.peak = int(torch.cuda.max_memory_allocated(torch.device(name)))
    return list(rows.values())


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= _GiB:
        return f"{n / _GiB:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def describe_weights(loaded: LoadedModel) -> str:
    """'cuda:0 7.5 GiB, cuda:1 7.4 GiB, cpu 1.2 GiB' for a status line."""
    return ", ".join(f"{where} {_size(size)}" for where, size in weight_bytes(loaded).items())


def describe_report(rows: list[DeviceMemory]) -> str:
    """One line per device for the CLI or a status bar."""
    lines = []
    for r in rows:
        parts = [f"weights {_size(r.weights)}", f"KV cache {_size(r.kv_cache)}", f"states {_size(r.states)}"]
        if r.free is not None:
            parts.append(f"free {_size(r.free)} of {_size(r.total)}")
        if r.peak is not None:
            parts.append(f"peak {_size(r.peak)}")
        lines.append(f"{r.device}: " + ", ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------- refusing what will not fit


def estimate_run(loaded: LoadedModel, prompt_tokens: int, new_tokens: int, batch: int = 1, record: bool = True,
                 full_logits: bool = False, kept_states: int | None = None,
                 cached: bool = True) -> dict[str, dict[str, int]]:
    """Bytes a run adds on each device, by kind: {device: {"kv_cache": .., "states": .., "logits": .., ...}}.

    `kept_states`: tokens whose states stay on the input device (default: every token when recording).
    `cached`: False for a forward pass without a KV cache (`use_cache=False`: a scan, a corpus pass).
    """
    tokens = max(prompt_tokens, 0) + max(new_tokens, 0)
    out: dict[str, dict[str, int]] = {}

    def add(where: str, kind: str, size: int) -> None:
        out.setdefault(where, {}).setdefault(kind, 0)
        out[where][kind] += int(size)

    rows_kv = kv_rows(loaded, tokens) if cached else 0
    for where, size in kv_bytes_per_token(loaded).items():
        add(where, "kv_cache", size * rows_kv * batch)
    elem = torch.tensor([], dtype=loaded.dtype).element_size()
    home = _device_name(loaded.device)
    if record:
        keep = tokens if kept_states is None else kept_states
        add(home, "states", state_bytes_per_token(loaded) * keep * batch)
    vocab = int(getattr(_text_config(loaded), "vocab_size", 0) or 0)
    add(home, "logits", vocab * (elem + 8) * batch * (prompt_tokens if full_logits else 1))
    config = _text_config(loaded)
    widest = max(int(getattr(config, "intermediate_size", 0) or 0), 4 * loaded.hidden_size)
    for where in {_device_name(module_device(b, loaded.device)) for b in loaded.layout.blocks}:
        add(where, "activations", 2 * batch * max(prompt_tokens, 1) * widest * elem)
    return out


def ensure_fits(loaded: LoadedModel, what: str, prompt_tokens: int, new_tokens: int = 0, batch: int = 1,
                record: bool = True, full_logits: bool = False, kept_states: int | None = None,
                cached: bool = True) -> None:
    """Raise DeviceMemoryError, before any work, when the run's estimate exceeds a device's free memory."""
    need = estimate_run(loaded, prompt_tokens, new_tokens, batch, record, full_logits, kept_states, cached)
    for where, parts in need.items():
        if where == "disk":
            continue
        free = available_bytes(where)
        total = sum(parts.values())
        if free is None or total <= free:
            continue
        names = {"kv_cache": "KV cache"}
        detail = ", ".join(f"{names.get(kind, kind)} {_size(size)}" for kind, size in parts.items() if size)
        tokens = prompt_tokens + new_tokens
        raise DeviceMemoryError(
            f"Not started: {what} {tokens} tokens{f' x {batch} rows' if batch > 1 else ''} needs about "
            f"{_size(total)} on {where} ({detail}), and {where} has {_size(free)} free. Nothing was lost. "
            "Generate fewer tokens, use a shorter text or a smaller batch, or spread the model with "
            "--device-map auto (and --max-memory / --offload-folder).")


def ensure_host_fits(nbytes: int, what: str) -> None:
    """Refuse, before any work, to keep more in host memory than is available (states stored on the CPU)."""
    free = available_bytes("cpu")
    if free is not None and nbytes > free:
        raise DeviceMemoryError(
            f"Not started: {what} would keep about {_size(nbytes)} in host memory, and {_size(free)} is available. "
            "Nothing was lost. Use fewer layers (--layers), float16 storage (--store-dtype float16) or a "
            "shorter corpus.")
