"""Chunk dictionaries: the `NAME.chunks.safetensors` file format.

Tensors live in safetensors (`<index>.subpopulation`, `<index>.template`,
`<index>.direction`); everything else is one JSON document in the
safetensors metadata under the key `chunktui`:

    {"format": "chunktui.chunks", "version": 1,
     "model": {"name", "architecture", "hidden_size", "n_layers", "fingerprint", ...},
     "created": ISO time, "chunks": [{"id", "label", "layer", "kind", ...}, ...]}

Nothing is unpickled. Loading validates every field and refuses, with a
specific message, a damaged file or one made for another model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from chunktui.shared.io import DICTIONARY_METADATA_KEY, atomic_write_bytes
from chunktui.shared.errors import DictionaryError, ExportError, IncompatibleDictionaryError

FORMAT = "chunktui.chunks"
VERSION = 1
METADATA_KEY = DICTIONARY_METADATA_KEY
KINDS = ("pa", "direction")


@dataclass
class Chunk:
    """One recurring population state at one layer, standing for `label`.

    kind "pa": a subpopulation `subpopulation` (neuron indices) with template values `template`; a
    state matches when the mean squared deviation over the subpopulation is at
    most `threshold`.
    kind "direction": a unit vector `direction`; a state matches when its
    cosine with the direction is at least `threshold`; `typical` is the typical
    projection of matching states (used to graft).
    """

    id: str
    label: str
    layer: int
    kind: str = "pa"
    subpopulation: torch.Tensor | None = None  # (m,) int64 neuron indices; stored under the file key 'neurons'
    template: torch.Tensor | None = None  # (m,) float32
    direction: torch.Tensor | None = None  # (d,) float32, unit norm
    threshold: float = 0.0
    tolerance: float | None = None
    typical: float | None = None
    step: int = 0
    method: str = "population-averaging"
    criterion: str | None = None
    seed: int | None = None
    corpus_digest: str | None = None
    fit: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Subpopulation size (PA) or width (direction)."""
        if self.kind == "pa":
            return 0 if self.subpopulation is None else int(self.subpopulation.numel())
        return 0 if self.direction is None else int(self.direction.numel())

    def header(self) -> dict:
        return {"id": self.id, "label": self.label, "layer": self.layer, "kind": self.kind,
                "threshold": self.threshold, "tolerance": self.tolerance, "typical": self.typical,
                "step": self.step, "method": self.method, "criterion": self.criterion, "seed": self.seed,
                "corpus_digest": self.corpus_digest, "size": self.size, "fit": self.fit,
                "evaluation": self.evaluation, "extra": self.extra}


@dataclass
class ChunkDictionary:
    model: dict  # identity of the model it was made for (LoadedModel.identity())
    chunks: list[Chunk] = field(default_factory=list)
    created: str = ""
    notes: dict = field(default_factory=dict)  # how it was built: command, corpus, context mode...
    path: Path | None = None
    layer_means: torch.Tensor | None = None  # (L+1, d) corpus mean per layer (NaN rows: not collected)

    def __len__(self) -> int:
        return len(self.chunks)

    def labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for c in self.chunks:
            seen.setdefault(c.label, None)
        return list(seen)

    def token_rule(self):
        """The colour rule stored with the dictionary (`shared.evidence.TokenRule`), or the uncalibrated fallback
        (any chunk at layers 1+, said so in its note) for a dictionary made before rules were stored."""
        from chunktui.shared.evidence import TokenRule

        raw = self.notes.get("token_rule") if isinstance(self.notes, dict) else None
        if raw:
            return TokenRule.from_json(raw)  # checked when the file was loaded
        return TokenRule.uncalibrated(self.layers())

    def layers(self) -> list[int]:
        return sorted({c.layer for c in self.chunks})

    def by_id(self, chunk_id: str) -> Chunk:
        for c in self.chunks:
            if c.id == chunk_id:
                return c
        raise KeyError(chunk_id)

    def select(self, names: list[str] | None = None, layers: list[int] | None = None) -> list[Chunk]:
        """Chunks whose id or label is in `names` (all if None), at `layers` (all if None)."""
        out = []
        wanted = None if names is None else set(names)
        for c in self.chunks:
            if wanted is not None and c.id not in wanted and c.label not in wanted:
                continue
            if layers is not None and c.layer not in layers:
                continue
            out.append(c)
        return out

    # ------------------------------------------------------------------ checks

    def compatibility_problem(self, identity: dict) -> str | None:
        """None if this dictionary fits the model with `identity`, else why not (one sentence)."""
        from chunktui.engine.identity import fingerprints_match

        mine = self.model
        if mine.get("hidden_size") != identity.get("hidden_size") or mine.get("n_layers") != identity.get("n_layers"):
            return (f"made for {mine.get('name')} (width {mine.get('hidden_size')}, {mine.get('n_layers')} layers); "
                    f"the loaded model {identity.get('name')} has width {identity.get('hidden_size')} and "
                    f"{identity.get('n_layers')} layers")
        if not fingerprints_match(mine.get("fingerprint") or [], identity.get("fingerprint") or []):
            # name each side once: equal names or equal (coarse) digests are not repeated
            theirs = "the loaded model" if identity.get("name") == mine.get("name") else \
                f"the loaded model {identity.get('name')}"
            if identity.get("fingerprint_digest") and identity.get("fingerprint_digest") != mine.get("fingerprint_digest"):
                weights = f"different weights ({identity.get('fingerprint_digest')})"
            else:
                weights = "weights that differ by more than the 2% fingerprint tolerance"
            return (f"made for {mine.get('name')} (weights {mine.get('fingerprint_digest')}); {theirs} has the "
                    f"same shape but {weights}")
        return None

    def check_compatible(self, identity: dict) -> None:
        problem = self.compatibility_problem(identity)
        if problem:
            where = f"{self.path.name} was " if self.path else "This dictionary was "
            raise IncompatibleDictionaryError(where + problem + ". Build a dictionary for this model with `chunktui build`.")

    # ------------------------------------------------------------------ io

    def save(self, path) -> Path:
        """Write atomically (temp file in the same folder, then rename).

        `path` is a path (replaced if it exists) or an `shared.outputs.OutputTarget`
        (checked and locked before the work; never replaces a file it was not allowed to).
        """
        from safetensors.torch import save

        from chunktui.shared.outputs import OutputTarget

        target = path if isinstance(path, OutputTarget) else None
        path = target.path if target is not None else Path(path)
        if not path.name.endswith(".safetensors"):
            raise DictionaryError(f"Dictionary files end in .chunks.safetensors; got '{path.name}'.")
        tensors: dict[str, torch.Tensor] = {}
        records = []
        ids = set()
        for i, chunk in enumerate(self.chunks):
            _validate_chunk(chunk, self.model.get("hidden_size"), self.model.get("n_layers"), where=f"chunk {chunk.id}")
            if chunk.id in ids:
                raise DictionaryError(f"Duplicate chunk id '{chunk.id}'.")
            ids.add(chunk.id)
            record = chunk.header()
            record["tensors"] = {}
            for name, attr in (("neurons", "subpopulation"), ("template", "template"), ("direction", "direction")):
                value = getattr(chunk, attr)  # the file's key 'neurons' is kept: older readers know it
                if value is not None:
                    key = f"{i:05d}.{name}"
                    value = value.detach().to("cpu")
                    if name == "neurons" and int(self.model.get("hidden_size") or 0) < 2**15:
                        value = value.to(torch.int16)  # indices fit; keeps shipped dictionaries small
                    tensors[key] = value.contiguous()
                    record["tensors"][name] = key
            records.append(record)
        self.created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {"format": FORMAT, "version": VERSION, "model": self.model, "created": self.created,
                "notes": self.notes, "chunks": records}
        text = json.dumps(meta, allow_nan=False, default=_json_default)
        if self.layer_means is not None:
            tensors["layer_means"] = self.layer_means.detach().to("cpu", torch.float32).contiguous()
            meta["layer_means"] = "layer_means"
            text = json.dumps(meta, allow_nan=False, default=_json_default)
        if not tensors:  # safetensors needs at least one entry to carry metadata reliably
            tensors["_empty"] = torch.zeros(1)
        if target is not None:
            target.write_bytes(save(tensors, metadata={METADATA_KEY: text}))
            self.path = path
            return path
        try:
            atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: text}))
        except ExportError as err:
            raise DictionaryError(f"{err} Nothing was changed.") from err
        self.path = path
        return path


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _validate_chunk(chunk: Chunk, width, n_layers, where: str) -> None:
    def bad(msg: str):
        raise DictionaryError(f"{where}: {msg}")

    if chunk.kind not in KINDS:
        bad(f"unknown kind '{chunk.kind}' (expected one of {', '.join(KINDS)})")
    if isinstance(chunk.layer, bool) or not isinstance(chunk.layer, int) or not (0 <= chunk.layer <= (n_layers if isinstance(n_layers, int) else 10**6)):
        bad(f"layer {chunk.layer!r} is outside 0..{n_layers}")
    if isinstance(chunk.threshold, bool) or not isinstance(chunk.threshold, (int, float)) or \
            not math.isfinite(chunk.threshold):
        bad(f"threshold {chunk.threshold!r} is not a finite number")
    if isinstance(chunk.step, bool) or not isinstance(chunk.step, int) or chunk.step < 0:
        bad(f"step {chunk.step!r} must be a whole number >= 0")
    if chunk.kind == "pa":
        if chunk.subpopulation is None or chunk.template is None:
            bad("a population-averaging chunk needs neurons and template tensors")
        if chunk.subpopulation.dim() != 1 or chunk.template.dim() != 1 or chunk.subpopulation.numel() != chunk.template.numel():
            bad(f"neurons {tuple(chunk.subpopulation.shape)} and template {tuple(chunk.template.shape)} must be 1-D of one length")
        if chunk.subpopulation.dtype not in (torch.int64, torch.int32, torch.int16):
            bad(f"neurons must be integers, got {chunk.subpopulation.dtype}")
        if chunk.subpopulation.numel() == 0:
            bad("empty subpopulation (it could never match)")
        indices = chunk.subpopulation.tolist()  # a few hundred ints: Python is faster than 3 tensor ops per chunk
        if isinstance(width, int) and (min(indices) < 0 or max(indices) >= width):
            bad(f"neuron indices must lie in 0..{width - 1}")
        if not torch.isfinite(chunk.template).all():
            bad("template has non-finite values")
        if chunk.threshold < 0:
            bad("threshold must be >= 0")
        if len(set(indices)) != len(indices):
            bad(f"the subpopulation names a neuron more than once ({len(indices)} indices, "
                f"{len(set(indices))} distinct)")
    else:
        if chunk.direction is None or chunk.direction.dim() != 1:
            bad("a direction chunk needs a 1-D direction tensor")
        if isinstance(width, int) and chunk.direction.numel() != width:
            bad(f"direction has {chunk.direction.numel()} values, the model width is {width}")
        # in float32, as matching and grafting compute it: a direction of 1e38s overflows to inf there
        norm = float(chunk.direction.float().norm()) if torch.isfinite(chunk.direction).all() else float("nan")
        if not math.isfinite(norm) or norm == 0:
            bad("direction must be finite and non-zero")
        if not -1.0 <= chunk.threshold <= 1.0:
            bad(f"a direction chunk's threshold is a cosine, so it must lie in -1..1, not {chunk.threshold:g} "
                "(it could never match)")
        if chunk.typical is not None and (isinstance(chunk.typical, bool) or not math.isfinite(chunk.typical)):
            bad("typical must be a finite number")


def load_dictionary(path: str | Path, identity: dict | None = None) -> ChunkDictionary:
    """Load and validate a dictionary; with `identity`, also refuse one made for another model."""
    from safetensors import SafetensorError, safe_open

    from chunktui.shared.schema import DICTIONARY_CHUNK, check_fields
    from chunktui.shared.texts import check_input_file

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DictionaryError(f"Dictionary not found: {path}")
    path = check_input_file(path, "chunk dictionary (.chunks.safetensors)", error=DictionaryError)
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            doc, model = _read_header(fh, path)
            records = doc["chunks"]
            chunks = []
            for i, rec in enumerate(records):
                where = f"{path.name}: chunk {i}"
                if not isinstance(rec, dict):
                    raise DictionaryError(f"{where} is not an object")
                label = rec.get("label")
                check_fields(rec, DICTIONARY_CHUNK, f"{where} ({label})" if isinstance(label, str) else where,
                             DictionaryError)
                tensors = {}
                for name, key in (rec.get("tensors") or {}).items():
                    if key not in keys:
                        raise DictionaryError(f"{where} ({rec.get('label')}): tensor '{key}' is missing from the file.")
                    tensors[name] = fh.get_tensor(key)
                raw = tensors.get("neurons")
                if raw is not None and (raw.dtype.is_floating_point or raw.dtype == torch.bool):
                    raise DictionaryError(f"{where} ({rec.get('label')}): neuron indices must be integers, got {raw.dtype}.")
                try:
                    chunk = Chunk(
                        id=rec["id"], label=rec["label"], layer=rec["layer"], kind=rec.get("kind", "pa"),
                        subpopulation=None if "neurons" not in tensors else tensors["neurons"].long(), template=tensors.get("template"),
                        direction=tensors.get("direction"), threshold=rec["threshold"], tolerance=rec.get("tolerance"),
                        typical=rec.get("typical"), step=rec.get("step", 0), method=rec.get("method") or "",
                        criterion=rec.get("criterion"), seed=rec.get("seed"), corpus_digest=rec.get("corpus_digest"),
                        fit=rec.get("fit") or {}, evaluation=rec.get("evaluation") or {}, extra=rec.get("extra") or {})
                except (KeyError, TypeError, ValueError) as err:
                    raise DictionaryError(f"{where}: missing or malformed field {err}.") from None
                _validate_chunk(chunk, model["hidden_size"], model["n_layers"], where=f"{where} ({chunk.label})")
                chunks.append(chunk)
            layer_means = None
            if doc.get("layer_means"):
                if doc["layer_means"] not in keys:
                    raise DictionaryError(f"{path.name}: tensor 'layer_means' is missing from the file.")
                layer_means = fh.get_tensor(doc["layer_means"])
                if tuple(layer_means.shape) != (model["n_layers"] + 1, model["hidden_size"]):
                    raise DictionaryError(f"{path.name}: layer_means has shape {tuple(layer_means.shape)}, expected "
                                          f"({model['n_layers'] + 1}, {model['hidden_size']}).")
    except SafetensorError as err:
        raise DictionaryError(f"{path.name} is damaged or not a safetensors file ({err}).") from None
    except (OSError, ValueError) as err:
        if isinstance(err, DictionaryError):
            raise
        raise DictionaryError(f"{path.name} could not be read: {err}") from None
    except (TypeError, KeyError, AttributeError, IndexError, RuntimeError, OverflowError) as err:
        # a header whose fields have the wrong types (a list where a name belongs, ...): damaged, whatever the field
        raise DictionaryError(f"{path.name}: the dictionary header is malformed ({type(err).__name__}: {err}).") from None
    ids = [c.id for c in chunks]
    if len(set(ids)) != len(ids):
        raise DictionaryError(f"{path.name}: duplicate chunk ids.")
    notes = doc.get("notes") or {}
    if not isinstance(notes, dict):
        raise DictionaryError(f"{path.name}: the header's notes are not a JSON object.")
    if notes.get("token_rule"):
        from chunktui.shared.evidence import TokenRule

        try:
            TokenRule.from_json(notes["token_rule"])
        except (ValueError, TypeError) as err:
            raise DictionaryError(f"{path.name}: the stored colour rule is malformed ({err}); recalibrate it with "
                                  "`chunktui calibrate`.") from None
    dictionary = ChunkDictionary(model=model, chunks=chunks, created=str(doc.get("created") or ""),
                                 notes=notes, path=path, layer_means=layer_means)
    if identity is not None:
        dictionary.check_compatible(identity)
    return dictionary


def chunk_id(label: str, layer: int, step: int = 0, kind: str = "pa") -> str:
    base = f"{label}@{layer}"
    if step:
        base += f"+s{step}"
    if kind != "pa":
        base = f"{kind[:3]}:{base}"
    return base


def _read_header(fh, path: Path) -> tuple[dict, dict]:
    """The dictionary's JSON header, checked: (the document, its model identity). No tensor is read."""
    from chunktui.shared.schema import DICTIONARY_HEADER, DICTIONARY_MODEL, check_fields
    from chunktui.shared.texts import loads_json

    meta = fh.metadata() or {}
    if METADATA_KEY not in meta:
        raise DictionaryError(f"{path.name} is a safetensors file but not a chunk dictionary (no '{METADATA_KEY}' header).")
    try:
        doc = loads_json(meta[METADATA_KEY], surrogates="replace")
    except ValueError as err:
        raise DictionaryError(f"{path.name}: the dictionary header is damaged ({err}).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DictionaryError(f"{path.name}: not a chunktui dictionary (format {doc.get('format') if isinstance(doc, dict) else '?'!r}).")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise DictionaryError(f"{path.name}: the format version must be a whole number, not {version!r}.")
    if version > VERSION:
        raise DictionaryError(f"{path.name}: format version {version} is newer than this chunktui understands "
                              f"({VERSION}); upgrade chunktui.")
    if version < 1:
        raise DictionaryError(f"{path.name}: format version {version} is not a version chunktui ever wrote "
                              f"(this chunktui reads 1..{VERSION}).")
    if not isinstance(doc.get("model"), dict):
        raise DictionaryError(f"{path.name}: the header does not say which model it was made for.")
    if not isinstance(doc.get("chunks"), list):
        raise DictionaryError(f"{path.name}: the header has no chunk list.")
    check_fields(doc, DICTIONARY_HEADER, f"{path.name}: the header", DictionaryError)
    model = check_fields(doc["model"], DICTIONARY_MODEL, f"{path.name}: the header's model", DictionaryError)
    return doc, model


def peek_dictionary(path: str | Path) -> tuple[dict, list[str], int]:
    """(the model identity it was made for, its labels, its chunk count) from the header alone: fast, for listing
    dictionaries; `load_dictionary` reads and validates the tensors when one is used."""
    from safetensors import safe_open

    from chunktui.shared.texts import check_input_file

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DictionaryError(f"Dictionary not found: {path}")
    path = check_input_file(path, "chunk dictionary (.chunks.safetensors)", error=DictionaryError)
    with safe_open(str(path), framework="pt") as fh:
        doc, model = _read_header(fh, path)
    labels = list(dict.fromkeys(str(r.get("label")) for r in doc["chunks"] if isinstance(r, dict)))
    return model, labels, len(doc["chunks"])


@dataclass
class DictionaryHeader:
    """What a dictionary's header says (`peek_dictionary`): enough to list it; `load_dictionary` to use it."""

    path: Path
    model: dict
    label_list: list[str]
    n_chunks: int

    def labels(self) -> list[str]:
        return list(self.label_list)

    @property
    def chunks(self) -> range:  # len() of it is the chunk count, as a ChunkDictionary's
        return range(self.n_chunks)
