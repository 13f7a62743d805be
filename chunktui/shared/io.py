"""Atomic file writing: a reader never sees half a file, and a failure changes nothing."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from chunktui.shared.errors import ExportError

# The safetensors metadata entry that holds a chunk dictionary's JSON header (engine.dictionary writes it).
DICTIONARY_METADATA_KEY = "chunktui"


def _umask_mode() -> int:
    """The mode a normal open() would give a new file (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_temp_beside(path: Path, data: bytes) -> str:
    """`data` in a synced temporary file next to `path`, with a normal file's mode: ready to rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give a file name.")
    tmp = None
    try:
        tmp = write_temp_beside(path, data)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise ExportError(f"Could not write {path}: {err.strerror or err}. Nothing was written; "
                          "choose another path.") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=_default) + "\n")


def _default(value):
    import math

    tolist = getattr(value, "tolist", None)  # torch tensors and numpy arrays, without importing either
    if callable(tolist) and not isinstance(value, (str, bytes)):
        return tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def safetensors_metadata(path: str | Path, limit: int = 100 * 2**20) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its JSON header without torch or safetensors.

    The format: 8 bytes little-endian header length, then that many bytes of JSON whose optional
    "__metadata__" entry maps strings to strings. Anything else is a ValueError.
    """
    import struct

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("too short for a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > limit:
            raise ValueError(f"header of {size} bytes is larger than {limit}")
        doc = json.loads(fh.read(size).decode("utf-8"))
    meta = doc.get("__metadata__", {}) if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata object")
    return meta
