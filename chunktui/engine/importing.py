"""Importing directions made by other tools as direction chunks.

Formats:

- `.npy`: a plain array, no pickles. `(d,)` is one direction (give the layer);
  `(n, d)` is n directions at one layer when a layer is given, else row i is
  the direction for hidden state H[i].
- `.safetensors`: every 1-D or 2-D float tensor. A 1-D tensor whose name ends
  in an integer (`layer.12`, `direction_12`, `12`) is the direction for H[12]
  unless a layer is given; 2-D tensors are read like `.npy`.
- `.gguf`: a llama.cpp control vector (as written by repeng and by
  llama.cpp's `cvector-generator`): `general.architecture = "controlvector"`,
  `controlvector.model_hint`, `controlvector.layer_count`, and one 1-D float
  tensor `direction.{il}` per layer. llama.cpp adds `direction.{il}` to the
  *output* of block il, which is the stream entering block il + 1: H[il + 1]
  in our notation. So the default GGUF layer offset is 1 (direction.5 -> a
  chunk at layer 6). A direction for the last block's output (il = L - 1)
  would be H[L], which chunktui reads only after the final norm and cannot
  edit: it is skipped, with a note.

A direction becomes a chunk with unit direction u = v / |v|. A control vector
is added to the stream, shifting the projection <h, u> by |v|; the chunk's
`typical` projection (what grafting moves a state's component to) is therefore
the mean projection on a calibration corpus plus |v| when a corpus is given,
and |v| otherwise. The cosine threshold is the (1 - match_rate) quantile of
the calibration corpus's cosines (so the chunk matches that share of its
tokens), or `default_threshold` without a corpus. Which one was used is
recorded in `extra`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from chunktui.engine.dictionary import Chunk, ChunkDictionary, chunk_id
from chunktui.shared.errors import ChunkError, DictionaryError
from chunktui.engine.corpus import HiddenStates
from chunktui.engine.ucd import COSINE_SLACK

FORMATS = {".npy": "npy", ".safetensors": "safetensors", ".gguf": "gguf-control-vector"}
GGUF_ARCH = "controlvector"
DEFAULT_THRESHOLD = 0.25
DEFAULT_MATCH_RATE = 0.05


class DirectionImportError(ChunkError):
    """A direction file cannot be read or does not fit the model."""


@dataclass
class ImportedVector:
    """One direction from a file, placed at hidden-state index `layer` (H[layer])."""

    vector: torch.Tensor  # (d,) float32, as stored (not normalised)
    layer: int | None  # None: the file does not say; a layer must be given
    key: str  # where it came from in the file ("direction.5", "row 3", ...)
    source_layer: int | None = None  # the layer number as written in the file


@dataclass
class ImportResult:
    chunks: list[Chunk] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why
    format: str = ""
    metadata: dict = field(default_factory=dict)


MAX_IMPORT_VALUES = 2**24  # the largest array imported: 16.7M values (64 MiB as float32)
NPY_DTYPES = ("float16", "float32", "float64")


def read_npy(path: Path) -> np.ndarray:
    """A .npy array, its header checked before anything is allocated: no pickles, no archives, a float16/32/64
    dtype, one or two dimensions, at most MAX_IMPORT_VALUES values."""
    from numpy.lib import format as npformat

    with open(path, "rb") as fh:
        head = fh.read(6)
        if head[:4] == b"PK\x03\x04":
            raise DirectionImportError(f"{path.name} is a zip archive (.npz?), not a .npy array; archives are not "
                                       "read: save one array with numpy.save.")
        fh.seek(0)
        try:
            version = npformat.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = npformat.read_array_header_2_0(fh)
        except ValueError as err:
            raise DirectionImportError(f"{path.name} is not a .npy array ({err}).") from None
        if dtype.hasobject:
            raise DirectionImportError(f"{path.name} holds Python objects (a pickle); only plain float arrays are "
                                       "read.")
        if dtype.name not in NPY_DTYPES:
            raise DirectionImportError(f"{path.name}: directions must be floating point (float16, float32 or float64), got "
                                       f"{dtype.name}.")
        if len(shape) not in (1, 2):
            raise DirectionImportError(f"{path.name}: expected a 1-D direction or a 2-D array of directions, got shape "
                                       f"{tuple(shape)}.")
        count = int(np.prod(shape, dtype=object))
        if count > MAX_IMPORT_VALUES:
            raise DirectionImportError(f"{path.name}: shape {tuple(shape)} holds {count:,} values; the largest array "
                                       f"imported is {MAX_IMPORT_VALUES:,} values.")
        expected = count * dtype.itemsize
        left = path.stat().st_size - fh.tell()
        if left < expected:
            raise DirectionImportError(f"{path.name}: the header promises {expected:,} bytes of data and the file "
                                       f"holds {left:,}: it is cut short.")
        array = np.fromfile(fh, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C")


def detect_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".npz", ".zip", ".tar", ".gz", ".pkl", ".pickle", ".pt", ".pth", ".bin"):
        raise DirectionImportError(f"{Path(path).name}: '{suffix}' files are not read (archives and pickles can "
                                   "hold code or many arrays); use one array in .npy, .safetensors or a llama.cpp "
                                   "control-vector .gguf.")
    if suffix not in FORMATS:
        raise DirectionImportError(f"{Path(path).name}: unknown direction format '{suffix}'; use .npy, .safetensors or a "
                           "llama.cpp control-vector .gguf.")
    return FORMATS[suffix]


def _rows(array: torch.Tensor, key: str, layer: int | None) -> list[ImportedVector]:
    if array.dim() == 1:
        return [ImportedVector(array, layer, key)]
    if array.dim() == 2:
        if layer is not None:
            return [ImportedVector(array[i], layer, f"{key}[{i}]") for i in range(array.shape[0])]
        return [ImportedVector(array[i], i, f"{key}[{i}]", i) for i in range(array.shape[0])]
    raise DirectionImportError(f"{key}: expected a 1-D direction or a 2-D array of directions, got shape {tuple(array.shape)}.")


_TRAILING_INT = re.compile(r"(-?\d+)$")


def read_vectors(path: str | Path, layer: int | None = None, layer_offset: int | None = None) -> tuple[list[ImportedVector], dict]:
    """Directions in a file, with the hidden-state index each belongs to. Returns (vectors, file metadata)."""
    from chunktui.shared.texts import check_input_file

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DirectionImportError(f"Direction file not found: {path}")
    check_input_file(path, "direction file", error=DirectionImportError)
    fmt = detect_format(path)
    offset = (1 if fmt == "gguf-control-vector" else 0) if layer_offset is None else layer_offset
    meta: dict = {"format": fmt, "layer_offset": offset}
    try:
        if fmt == "npy":
            array = read_npy(path)
            vectors = _rows(torch.from_numpy(np.ascontiguousarray(array)).float(), path.name, layer)
        elif fmt == "safetensors":
            vectors = _read_safetensors(path, layer)
        else:
            vectors, meta_gguf = _read_gguf(path)
            meta.update(meta_gguf)
            if layer is not None:
                for v in vectors:
                    v.layer = layer
    except (ValueError, OSError) as err:
        if isinstance(err, ChunkError):
            raise
        raise DirectionImportError(f"{path.name} could not be read as {fmt}: {err}") from None
    if not vectors:
        raise DirectionImportError(f"{path.name} holds no directions.")
    if layer is None:
        for v in vectors:
            if v.layer is not None:
                v.layer += offset
    return vectors, meta


def _read_safetensors(path: Path, layer: int | None) -> list[ImportedVector]:
    from safetensors import SafetensorError, safe_open

    try:
        out = []
        with safe_open(str(path), framework="pt") as fh:
            for key in sorted(fh.keys(), key=_natural):
                tensor = fh.get_tensor(key)
                if not tensor.dtype.is_floating_point:
                    continue
                if tensor.numel() > MAX_IMPORT_VALUES:
                    raise DirectionImportError(f"{path.name}: tensor '{key}' holds {tensor.numel():,} values; the "
                                               f"largest array imported is {MAX_IMPORT_VALUES:,} values.")
                if tensor.dim() == 1:
                    m = _TRAILING_INT.search(key)
                    named = int(m.group(1)) if m else None
                    if named is not None and named < 0 and layer is None:
                        raise DirectionImportError(f"{path.name}: tensor '{key}' names layer {named}; layers are "
                                                   "numbered from 0 (give --layer to place it).")
                    out.append(ImportedVector(tensor.float(), layer if layer is not None else named, key, named))
                else:
                    out.extend(_rows(tensor.float(), key, layer))
        return out
    except SafetensorError as err:
        raise DirectionImportError(f"{path.name} is damaged or not a safetensors file ({err}).") from None


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _read_gguf(path: Path) -> tuple[list[ImportedVector], dict]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise DirectionImportError(f"{path.name} is not a readable GGUF file ({err}).") from None

    def field_value(name: str):
        f = reader.get_field(name)
        return None if f is None else f.contents()

    arch = field_value("general.architecture")
    if arch != GGUF_ARCH:
        raise DirectionImportError(f"{path.name} is a GGUF file but not a control vector (general.architecture is {arch!r}, "
                           f"expected '{GGUF_ARCH}').")
    meta = {"model_hint": field_value(f"{GGUF_ARCH}.model_hint"), "layer_count": field_value(f"{GGUF_ARCH}.layer_count")}
    out = []
    for tensor in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if not m:
            continue
        data = np.asarray(tensor.data)
        if sum(int(n) > 1 for n in data.shape) > 1:
            raise DirectionImportError(f"{path.name}: {tensor.name} holds a {tuple(int(n) for n in data.shape)} "
                                       "array; a control vector has one direction (one row) per layer.")
        if data.size > MAX_IMPORT_VALUES:
            raise DirectionImportError(f"{path.name}: {tensor.name} holds {data.size:,} values; the largest array "
                                       f"imported is {MAX_IMPORT_VALUES:,} values.")
        if not np.issubdtype(data.dtype, np.floating):
            raise DirectionImportError(f"{path.name}: {tensor.name} is stored as {tensor.tensor_type.name}; control vectors are "
                               "float32 or float16.")
        il = int(m.group(1))
        out.append(ImportedVector(torch.from_numpy(data.astype(np.float32).reshape(-1).copy()), il, tensor.name, il))
    out.sort(key=lambda v: v.source_layer)
    if isinstance(meta["layer_count"], int) and meta["layer_count"] != len(out):
        meta["layer_count_mismatch"] = f"header says {meta['layer_count']} layers, file has {len(out)} directions"
    return out, meta


@torch.no_grad()
def vectors_to_chunks(vectors: Sequence[ImportedVector], identity: dict, label: str, source: str = "",
                      fmt: str = "", metadata: dict | None = None, calibration: HiddenStates | None = None,
                      match_rate: float = DEFAULT_MATCH_RATE, default_threshold: float = DEFAULT_THRESHOLD) -> ImportResult:
    """Direction chunks for the model with `identity`; vectors that do not fit are skipped with a reason."""
    width, n_layers = identity["hidden_size"], identity["n_layers"]
    if not 0 < match_rate < 1:
        raise DirectionImportError(f"match rate must be between 0 and 1, got {match_rate}.")
    result = ImportResult(format=fmt, metadata=dict(metadata or {}))
    ids = set()
    for v in vectors:
        if v.layer is None:
            result.skipped[v.key] = "the file does not say which layer; give --layer"
            continue
        if v.vector.numel() != width:
            raise DirectionImportError(f"{v.key} has {v.vector.numel()} values; the model {identity.get('name')} has width {width}.")
        if v.layer == n_layers and fmt == "gguf-control-vector":
            result.skipped[v.key] = (f"edits the output of the last block (H[{n_layers}]), which chunktui reads only "
                                     "after the final norm and cannot edit")
            continue
        if not 0 <= v.layer <= n_layers:
            result.skipped[v.key] = f"layer {v.layer} is outside 0..{n_layers}"
            continue
        norm = float(v.vector.norm())
        if not np.isfinite(norm) or norm == 0:
            result.skipped[v.key] = "zero or non-finite vector"
            continue
        u = v.vector / norm
        extra = {"source": source, "format": fmt, "key": v.key, "source_layer": v.source_layer, "norm": norm,
                 "layer_offset": result.metadata.get("layer_offset", 0)}
        if result.metadata.get("model_hint"):
            extra["model_hint"] = result.metadata["model_hint"]
        typical, threshold = norm, float(default_threshold)
        extra["threshold_source"] = f"default {default_threshold}"
        extra["typical_source"] = "vector norm"
        if calibration is not None and v.layer in calibration.layers:
            H = calibration.H[:, calibration.layers.index(v.layer)].float()  # (T, d)
            proj = H @ u
            cos = proj / H.norm(dim=-1).clamp(min=1e-12)
            typical = float(proj.mean()) + norm
            threshold = float(torch.quantile(cos.double(), 1.0 - match_rate)) - COSINE_SLACK
            extra["threshold_source"] = f"calibrated: matches {match_rate:.3g} of {len(cos)} corpus tokens"
            extra["typical_source"] = "corpus mean projection + vector norm"
        cid = chunk_id(label, v.layer, kind="direction")
        if cid in ids:  # several directions at one layer: number them
            cid = chunk_id(f"{label}.{len(ids)}", v.layer, kind="direction")
        ids.add(cid)
        result.chunks.append(Chunk(id=cid, label=label, layer=v.layer, kind="direction", direction=u.float().contiguous(),
                                   threshold=threshold, typical=typical, method=f"imported:{fmt}", extra=extra))
    return result


def import_file(path: str | Path, identity: dict, label: str | None = None, layer: int | None = None,
                layer_offset: int | None = None, calibration: HiddenStates | None = None,
                match_rate: float = DEFAULT_MATCH_RATE, default_threshold: float = DEFAULT_THRESHOLD) -> ImportResult:
    """Read a direction file and turn it into chunks for the model with `identity`."""
    path = Path(path)
    vectors, meta = read_vectors(path, layer, layer_offset)
    result = vectors_to_chunks(vectors, identity, label or path.name.split(".")[0], source=path.name,
                               fmt=meta["format"], metadata=meta, calibration=calibration, match_rate=match_rate,
                               default_threshold=default_threshold)
    if not result.chunks:
        reasons = "; ".join(f"{k}: {v}" for k, v in result.skipped.items())
        raise DirectionImportError(f"{path.name}: no direction could be imported ({reasons}).")
    return result


def merge_chunks(dictionary: ChunkDictionary, chunks: Sequence[Chunk]) -> tuple[int, int]:
    """Add chunks to a dictionary, replacing chunks with the same id. Returns (added, replaced)."""
    new_ids = {c.id for c in chunks}
    if len(new_ids) != len(chunks):
        raise DictionaryError("The new chunks have duplicate ids.")
    before = len(dictionary.chunks)
    dictionary.chunks = [c for c in dictionary.chunks if c.id not in new_ids]
    replaced = before - len(dictionary.chunks)
    dictionary.chunks.extend(chunks)
    return len(chunks) - replaced, replaced


def write_control_vector(path: str | Path, directions: dict[int, torch.Tensor], model_hint: str = "llama") -> Path:
    """Write a llama.cpp control-vector GGUF, exactly as repeng's `ControlVector.export_gguf` does.

    `directions` maps llama.cpp layer il (block il's output, our H[il + 1]) to a (d,) vector.
    """
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH)
    writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(directions))
    for il, vector in sorted(directions.items()):
        writer.add_tensor(f"direction.{il}", vector.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_control_vector(path: str | Path, chunks: Sequence[Chunk], model_hint: str = "llama",
                          scale: str = "norm") -> Path:
    """Direction chunks as a llama.cpp control vector (chunk at H[l] -> direction.{l - 1}).

    scale "norm": the vector's stored norm (imported chunks) else the typical projection; "unit": unit vectors.
    """
    directions = {}
    for c in chunks:
        if c.kind != "direction" or c.layer < 1:
            continue
        magnitude = 1.0 if scale == "unit" else float(c.extra.get("norm") or c.typical or 1.0)
        directions[c.layer - 1] = c.direction.float() / c.direction.float().norm() * magnitude
    if not directions:
        raise DirectionImportError("No direction chunk at layer 1 or above to export.")
    return write_control_vector(path, directions, model_hint)
