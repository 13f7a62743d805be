"""Field-by-field checks for the JSON headers users hand in (dictionary headers first), torch-free.

Each field is declared once: its name, the types it may hold, whether it is
required, and a range check. `check_fields` walks a record and raises the
caller's error class with a message that names the field, the value's type
and what was expected ("chunk 3 (cheese): 'layer' must be a whole number,
not true"). A new optional field (a decision rule block, say) is one more
`Field` in the table; a field not in the table is kept as long as it is JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

INT, NUM, STR, DICT, LIST, NONE = "int", "number", "text", "object", "list", "null"
_NAMES = {INT: "a whole number", NUM: "a number", STR: "text", DICT: "a JSON object", LIST: "a list", NONE: "null"}


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is(value: Any, kind: str) -> bool:
    if kind == NONE:
        return value is None
    if isinstance(value, bool):
        return False  # true is not 1
    if kind == INT:
        return isinstance(value, int)
    if kind == NUM:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind == STR:
        return isinstance(value, str)
    if kind == DICT:
        return isinstance(value, dict)
    if kind == LIST:
        return isinstance(value, list)
    raise ValueError(kind)


@dataclass(frozen=True)
class Field:
    name: str
    kinds: tuple[str, ...]
    required: bool = False
    check: Callable[[Any], str | None] | None = None  # None if fine, else what is wrong ("must be >= 0")

    def problem(self, record: dict) -> str | None:
        if self.name not in record:
            return f"'{self.name}' is missing" if self.required else None
        value = record[self.name]
        if not any(_is(value, k) for k in self.kinds):
            want = " or ".join(_NAMES[k] for k in self.kinds)
            shown = repr(value) if isinstance(value, (bool, int, float)) or value is None else kind_of(value)
            if isinstance(value, str):
                shown = f"the text {value[:40]!r}"
            return f"'{self.name}' must be {want}, not {shown}"
        if self.check is not None and value is not None:
            why = self.check(value)
            if why:
                return f"'{self.name}' {why}"
        return None


def check_fields(record: dict, fields: tuple[Field, ...], where: str, error: type[Exception]) -> dict:
    if not isinstance(record, dict):
        raise error(f"{where} must be a JSON object, not {kind_of(record)}.")
    for f in fields:
        why = f.problem(record)
        if why:
            raise error(f"{where}: {why}.")
    return record


def at_least(lo) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be at least {lo}, not {v}"


def non_empty(v: str) -> str | None:
    return None if v.strip() else "is empty"


def numbers(v: list) -> str | None:
    return None if all(_is(x, NUM) for x in v) else "must hold numbers only"


# --------------------------------------------------------------------------- dictionary header (chunktui.chunks)

DICTIONARY_HEADER = (
    Field("format", (STR,), required=True),
    Field("version", (INT,), required=True),
    Field("model", (DICT,), required=True),
    Field("created", (STR, NONE)),
    Field("notes", (DICT, NONE)),
    Field("chunks", (LIST,), required=True),
    Field("layer_means", (STR, NONE)),
)

DICTIONARY_MODEL = (
    Field("name", (STR, NONE)),
    Field("architecture", (STR, NONE)),
    Field("hidden_size", (INT,), required=True, check=at_least(1)),
    Field("n_layers", (INT,), required=True, check=at_least(1)),
    Field("fingerprint", (LIST, NONE), check=numbers),
    Field("fingerprint_digest", (STR, NONE)),
)

FIT_NUMBERS = ("tp_rate", "fp_rate", "accuracy", "f1", "balanced", "tp", "fp", "tn", "fn", "n", "positives", "tokens")

DICTIONARY_CHUNK = (
    Field("id", (STR,), required=True, check=non_empty),
    Field("label", (STR,), required=True, check=non_empty),
    Field("layer", (INT,), required=True, check=at_least(0)),
    Field("kind", (STR,)),
    Field("threshold", (NUM,), required=True),
    Field("tolerance", (NUM, NONE)),
    Field("typical", (NUM, NONE)),
    Field("step", (INT,), check=at_least(0)),
    Field("method", (STR, NONE)),
    Field("criterion", (STR, NONE)),
    Field("seed", (INT, NONE)),
    Field("corpus_digest", (STR, NONE)),
    Field("size", (INT, NONE), check=at_least(0)),
    Field("fit", (DICT, NONE), check=lambda v: next((f"value '{k}' must be a number" for k in FIT_NUMBERS
                                                      if k in v and v[k] is not None and not _is(v[k], NUM)), None)),
    Field("evaluation", (DICT, NONE)),
    Field("extra", (DICT, NONE)),
    Field("tensors", (DICT, NONE), check=lambda v: None if all(isinstance(x, str) for x in v.values())
          else "must name tensors by text keys"),
)
