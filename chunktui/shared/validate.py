"""One set of checks for every number and range a user types, shared by the CLI and the app.

Each validator takes the value (already a number, or the text the user
typed) and a name for messages, returns the value to use, and raises
`InvalidValue` (a `ChunkError`) with a message that says what is allowed.
The CLI calls them as click callbacks before any model loads; the app calls
the same functions on its form fields.

Rules (also in the README):

- every number is finite (no nan, no inf);
- counts (samples, tokens, batch size, k, steps, seeds, ...) are whole numbers >= 1;
- temperature 0..10 (0 is greedy); top-p in (0, 1]; top-k >= 0 (0 = off);
- seeds 0..2**31-1;
- strength: graft / amplify / mean-ablate 0 < a <= 10; freeze / suppress 0 < b <= 1; a sweep is up to 12 of them;
- layer ranges are written low-high ('2-9', not '9-2'); 'all' is every layer;
- probabilities and quantiles in their interval.
"""

from __future__ import annotations

import math
import re
from typing import Any

from chunktui.shared.errors import ChunkError, CorpusError

SEED_MAX = 2**31 - 1
MAX_NEW_TOKENS = 1 << 16
TEMPERATURE_MAX = 10.0
STRENGTH_MAX = 10.0


class InvalidValue(ChunkError):
    """A number or range a user gave is outside what the option accepts."""


def _number(value: Any, name: str, kind=float):
    """`value` as int or float; text is parsed (so the app can pass what was typed)."""
    if isinstance(value, bool):
        raise InvalidValue(f"{name} must be a number, not {value!r}.")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise InvalidValue(f"{name} must be {what}, not '{value}'.") from None
    if kind is int:
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise InvalidValue(f"{name} must be a whole number, not {value}.")
            value = int(value)
        if not isinstance(value, int):
            raise InvalidValue(f"{name} must be a whole number, not {value!r}.")
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidValue(f"{name} must be a number, not {value!r}.") from None
    if not math.isfinite(value):
        raise InvalidValue(f"{name} must be a finite number, not {value}.")
    return value


def finite(value: Any, name: str = "value") -> float:
    return _number(value, name, float)


def number_in(value: Any, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
              hi_open: bool = False) -> float:
    """A finite float in [lo, hi] (open ends where asked)."""
    v = _number(value, name, float)
    lo_ok = lo is None or (v > lo if lo_open else v >= lo)
    hi_ok = hi is None or (v < hi if hi_open else v <= hi)
    if not (lo_ok and hi_ok):
        left = "" if lo is None else (f"greater than {lo:g}" if lo_open else f"at least {lo:g}")
        right = "" if hi is None else (f"less than {hi:g}" if hi_open else f"at most {hi:g}")
        raise InvalidValue(f"{name} must be {' and '.join(x for x in (left, right) if x)}, not {v:g}.")
    return v


def integer_in(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    v = _number(value, name, int)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise InvalidValue(f"{name} must be at least {lo}, not {v}.")
        if lo is None:
            raise InvalidValue(f"{name} must be at most {hi}, not {v}.")
        raise InvalidValue(f"{name} must be between {lo} and {hi}, not {v}.")
    return v


def count(value: Any, name: str = "count", lo: int = 1, hi: int | None = None) -> int:
    """A whole number >= 1 (or >= lo)."""
    return integer_in(value, name, lo, hi)


def non_negative_int(value: Any, name: str = "value", hi: int | None = None) -> int:
    return integer_in(value, name, 0, hi)


def temperature(value: Any, name: str = "temperature") -> float:
    return number_in(value, name, 0.0, TEMPERATURE_MAX)


def top_p(value: Any, name: str = "top-p") -> float:
    return number_in(value, name, 0.0, 1.0, lo_open=True)


def top_k(value: Any, name: str = "top-k") -> int:
    return non_negative_int(value, name)


def seed(value: Any, name: str = "seed") -> int:
    return integer_in(value, name, 0, SEED_MAX)


def max_new_tokens(value: Any, name: str = "max new tokens") -> int:
    return count(value, name, 1, MAX_NEW_TOKENS)


MAX_STEPS = 100_000  # optimisation steps per layer (discover); each is a pass over the cached states


def steps(value: Any, name: str = "steps") -> int:
    return count(value, name, 1, MAX_STEPS)


def samples(value: Any, name: str = "samples") -> int:
    return count(value, name, 1, 10_000)


def probability(value: Any, name: str, open_low: bool = False, open_high: bool = False) -> float:
    return number_in(value, name, 0.0, 1.0, lo_open=open_low, hi_open=open_high)


STRENGTH_RULES = {
    "graft": (0.0, STRENGTH_MAX, "a = 1 writes the template, 0 < a < 1 moves part way, a > 1 past it"),
    "amplify": (0.0, STRENGTH_MAX, "a > 1 pushes past the template"),
    "mean-ablate": (0.0, STRENGTH_MAX, "b = 1 writes the corpus mean"),
    "freeze": (0.0, 1.0, "b = 1 zeroes the subpopulation; more would flip its sign"),
    "suppress": (0.0, 1.0, "b = 1 zeroes the subpopulation; more would flip its sign"),
}


def strength(value: Any, mode: str, name: str = "strength") -> float | None:
    """None keeps the mode's default; else a finite strength in the mode's range (0 is refused: it edits nothing)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if mode not in STRENGTH_RULES:
        raise InvalidValue(f"Unknown mode '{mode}': use one of {', '.join(STRENGTH_RULES)}.")
    lo, hi, why = STRENGTH_RULES[mode]
    v = _number(value, name, float)
    if not lo < v <= hi:
        raise InvalidValue(f"{name} for {mode} must be greater than {lo:g} and at most {hi:g} ({why}), not {v:g}.")
    return v


_PART = re.compile(r"^\s*(-?\d+)\s*(?:(?:-|\.\.)\s*(-?\d+)\s*)?$")


def strengths(spec: Any, mode: str, name: str = "sweep") -> list[float] | None:
    """A strength sweep: comma-separated strengths, each in the mode's range, at most SWEEP_MAX, no repeats.

    Blank (or None) means no sweep."""
    from chunktui.shared.settings import SWEEP_MAX

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    parts = [x.strip() for x in str(spec).split(",")] if not isinstance(spec, (list, tuple)) else list(spec)
    if any(isinstance(x, str) and not x for x in parts):
        raise InvalidValue(f"{name}: write strengths separated by commas, e.g. 0.05,0.1,0.2 (not '{spec}').")
    values = [strength(x, mode, f"{name} strength") for x in parts]
    if len(values) > SWEEP_MAX:
        raise InvalidValue(f"{name}: at most {SWEEP_MAX} strengths in one sweep, not {len(values)}.")
    if len(set(values)) != len(values):
        raise InvalidValue(f"{name}: each strength once ({spec}).")
    return values


def layer_spec(spec: Any, name: str = "layers") -> str:
    """Syntax of a layer spec before a model is known: 'all', '5', '2-9', '0,4,8-10', '-1' (last).

    Ranges are written low-high; a reversed range ('9-2') is refused rather than silently flipped.
    """
    if spec is None:
        return "all"
    text = str(spec).strip()
    if text.lower() == "all":
        return "all"
    if not text:
        raise InvalidValue(f"{name} is empty: give 'all', '5', '2-9' or '0,4,8-10'.")
    for part in text.split(","):
        m = _PART.match(part)
        if not m:
            raise InvalidValue(f"Bad layer spec '{text}' for {name}: use 'all', '5', '2-9' or '0,4,8-10' "
                               "(-1 is the last layer).")
        a, b = m.group(1), m.group(2)
        if b is not None:
            ia, ib = int(a), int(b)
            if (ia >= 0) == (ib >= 0) and ia > ib:
                raise InvalidValue(f"Bad layer spec '{text}' for {name}: write ranges low-high "
                                   f"('{ib}-{ia}', not '{ia}-{ib}').")
    return text


def layers_in_model(layers: list[int], n_states: int, name: str = "layers") -> list[int]:
    bad = sorted(l for l in layers if not 0 <= l < n_states)
    if bad:
        raise InvalidValue(f"{name} {bad} out of range: this model has hidden states 0..{n_states - 1}.")
    return layers


def editable_layers(layers: list[int], n_layers: int, name: str = "layers") -> list[int]:
    """Interventions edit the stream entering blocks 0..L-1; H[L] (after the final norm) cannot be edited."""
    bad = sorted(l for l in layers if not 0 <= l < n_layers)
    if bad:
        raise InvalidValue(f"{name} {bad}: interventions edit the stream entering blocks 0..{n_layers - 1}; "
                           f"{n_layers} is the output of the final norm and cannot be edited.")
    return layers


def prompt_text(value: Any, name: str = "prompt") -> str:
    if value is None or not str(value).strip():
        raise InvalidValue(f"The {name} is empty: type something to continue.")
    return str(value)


def chunk_names(value: Any, name: str = "chunks") -> list[str]:
    """'cheese, cake' -> ['cheese', 'cake']; at least one name."""
    names = [n.strip() for n in str(value or "").split(",") if n.strip()]
    if not names:
        raise InvalidValue(f"Name at least one chunk in {name} (a label such as cheese, or a chunk id).")
    return names


def sampling(max_new: Any, temp: Any, p: Any, seed_value: Any, k: Any = 0):
    """A checked `Sampling` from raw values (what the app's Stream and Perturb panes collect)."""
    from chunktui.shared.settings import Sampling

    return Sampling(max_new_tokens=max_new_tokens(max_new), temperature=temperature(temp), top_p=top_p(p),
                    top_k=top_k(k), seed=seed(seed_value))


def parse_layers(spec: str | None, n_states: int) -> list[int]:
    """'all', '3', '2-9', '0,5,10-12' or negative indices ('-1' = last) -> sorted layer list.

    Ranges are written low-high: '9-2' is refused, not flipped (see `layer_spec`).
    """
    spec = layer_spec(spec)
    if spec == "all":
        return list(range(n_states))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:(?:-|\.\.)\s*(-?\d+)\s*)?", part)
        for given in (m.group(1), m.group(2)):  # say what was typed, not what a negative index became
            if given is not None and not -n_states <= int(given) < n_states:
                raise InvalidValue(f"Layers [{int(given)}] out of range: this model has hidden states "
                                   f"0..{n_states - 1} (-1 .. -{n_states} count from the last).")
        a = int(m.group(1))
        a = a + n_states if a < 0 else a
        if m.group(2) is None:
            out.add(a)
            continue
        b = int(m.group(2))
        b = b + n_states if b < 0 else b
        if a > b:
            raise CorpusError(f"Bad layer spec '{spec}': write ranges low-high ({part.strip()} runs from {a} down "
                              f"to {b} in this model of hidden states 0..{n_states - 1}).")
        out.update(range(a, b + 1))
    layers_in_model(sorted(out), n_states, "Layers")
    return sorted(out)


def colour_budget(value: Any, name: str = "colour budget") -> float:
    """The colour rule's budget: the share of non-concept tokens allowed a colour, in [0, 1)."""
    return number_in(value, name, 0.0, 1.0, hi_open=True)
