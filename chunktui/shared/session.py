"""What a session of the app holds: traces (streamed or scanned text) and perturbation runs.

A `TokenStep` is one token compacted for display: everything a view needs,
as plain Python values, so the UI process never needs torch (the engine
process makes them, `engine/steps.py`, and sends them over a pipe). A
`Trace` is a growing list of steps plus the packed dictionary's chunk order
(the columns of `score`/`value`/`hit`). A `Session` collects finished traces
and perturbation runs and serialises them to the JSON that `reports` renders.

No UI imports here: the app, the CLI and the benchmarks share this module.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from chunktui.shared.evidence import TokenRule

SESSION_FORMAT = "chunktui.session"
SESSION_VERSION = 1


@dataclass
class ChunkColumns:
    """The pack's chunk order: column c of a step's score/value/hit is chunk c."""

    ids: list[str]
    labels: list[str]
    layers: list[int]
    thresholds: list[float]
    kinds: list[str]
    rule: dict | None = None  # the dictionary's colour rule (shared.evidence.TokenRule as JSON), None: raw colours
    voters: dict[str, int] = field(default_factory=dict)  # label -> chunks that vote on the label's colour

    @staticmethod
    def from_pack(packed) -> "ChunkColumns":
        chunks = packed.chunks if packed is not None else []
        rule = getattr(packed, "rule", None)
        concepts = getattr(packed, "concepts", None) or []
        return ChunkColumns(ids=[c.id for c in chunks], labels=[c.label for c in chunks],
                            layers=[int(c.layer) for c in chunks], thresholds=[float(c.threshold) for c in chunks],
                            kinds=[c.kind for c in chunks], rule=rule.to_json() if rule is not None else None,
                            voters=dict(zip(concepts, getattr(packed, "voters", None) or [])))

    def token_rule(self) -> "TokenRule | None":
        """The colour rule as an object (parsed once)."""
        if self.rule is None:
            return None
        cached = self.__dict__.get("_rule")
        if cached is None or cached[0] is not self.rule:
            from chunktui.shared.evidence import TokenRule

            try:
                parsed = TokenRule.from_json(self.rule)
            except (ValueError, TypeError):
                parsed = None
            self.__dict__["_rule"] = cached = (self.rule, parsed)
        return cached[1]

    def confidence(self, label: str | None, step: "TokenStep") -> str:
        """Beside a coloured token: agreeing layers and the training precision at its evidence."""
        from chunktui.shared.evidence import confidence_text

        if label is None:
            return ""
        return confidence_text(self.token_rule(), label, step.evidence, step.agree, self.voters.get(label))

    @staticmethod
    def empty() -> "ChunkColumns":
        return ChunkColumns([], [], [], [], [])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TokenStep:
    """One token compacted for display: plain Python values only (S = L + 1 layers)."""

    index: int
    token_id: int
    text: str
    generated: bool
    logprob: float | None
    top: list[tuple[str, float]]
    strongest: int  # chunk column of the strongest hit over all layers, -1 if none
    strongest_score: float
    layer_chunk: list[int]  # (S,) best hit per layer, -1 if none
    layer_score: list[float]  # (S,) its score, -inf if none
    norms: list[float]  # (S,) |h| per layer
    hits: tuple[int, ...] = ()  # every chunk column that matched this token (sparse)
    agree: int = 0  # voting layers whose chunk of the shown concept matched (the colour rule), 0 if none
    evidence: float | None = None  # the shown concept's pooled evidence (shared/evidence.py), None if none
    firings: tuple[dict, ...] = ()  # rules that fired on this token (shared.rules.Firing.to_json() records)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 5)


class Trace:
    """A text being streamed or stepped through, token by token."""

    def __init__(self, kind: str, title: str, columns: ChunkColumns, settings: dict | None = None):
        self.kind = kind  # "stream" or "scan"
        self.title = title
        self.columns = columns
        self.settings = dict(settings or {})
        self.steps: list[TokenStep] = []
        self.finished: str | None = None
        self.elapsed = 0.0
        self.trace_id: int | None = None  # the engine's id for it (token detail, chunk scores)
        self._present: tuple | None = None  # ((layer, T), labels seen, T) for present()
        self._generated = (0, 0)  # (steps counted, generated among them): n_generated without a pass per call

    def __len__(self) -> int:
        return len(self.steps)

    def extend(self, steps: Iterable[TokenStep]) -> None:
        self.steps.extend(steps)

    def replace_steps(self, steps: list[TokenStep]) -> None:
        """All steps at once (a relabelled stream): drops cached summaries."""
        self.steps = list(steps)
        self._present = None
        self._generated = (0, 0)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def n_generated(self) -> int:
        """Generated tokens (not the prompt's), counted incrementally: the app and the bench ask per key."""
        counted, generated = self._generated
        if counted > len(self.steps):  # the steps were replaced by a shorter list
            counted, generated = 0, 0
        if counted < len(self.steps):
            generated += sum(s.generated for s in self.steps[counted:])
            self._generated = (len(self.steps), generated)
        return generated

    def chunk_at(self, t: int, layer: int | None = None) -> int:
        """The chunk column that colours token t: strongest overall, or best at `layer`."""
        step = self.steps[t]
        if layer is None:
            return step.strongest
        return step.layer_chunk[layer] if layer < len(step.layer_chunk) else -1

    def label_at(self, t: int, layer: int | None = None) -> str | None:
        c = self.chunk_at(t, layer)
        return self.columns.labels[c] if c >= 0 else None

    def labels(self, layer: int | None = None) -> list[str | None]:
        return [self.label_at(t, layer) for t in range(len(self.steps))]

    @property
    def firings(self) -> list[dict]:
        """Every rule firing in the trace, in token order (shared.rules.Firing.to_json() records)."""
        return [f for s in self.steps for f in s.firings]

    @property
    def stopped_by(self) -> str | None:
        """The rule that ended the stream (finished "rule"), if one did."""
        if self.finished != "rule":
            return None
        stops = [f for f in self.firings if f.get("action") == "stop"]
        return stops[-1]["rule"] if stops else None

    def chunk_hits(self, column: int) -> list[bool]:
        return [column in s.hits for s in self.steps]

    def present(self, layer: int | None = None) -> list[str]:
        """The labels that colour at least one token (at `layer`, or strongest overall); cached per length."""
        key = (layer, len(self.steps))
        if self._present is None or self._present[0] != key:
            start = self._present[2] if self._present is not None and self._present[0][0] == layer else 0
            seen = set(self._present[1]) if start else set()
            for t in range(start, len(self.steps)):
                label = self.label_at(t, layer)
                if label is not None:
                    seen.add(label)
            self._present = (key, seen, len(self.steps))
        return sorted(self._present[1])

    def next_match(self, start: int, label: str, layer: int | None = None, backwards: bool = False) -> int | None:
        """The next token after `start` where a chunk of `label` hits (at `layer`, or any layer)."""
        cols = {c for c, lab in enumerate(self.columns.labels)
                if lab == label and (layer is None or self.columns.layers[c] == layer)}
        if not cols:
            return None
        order = range(start - 1, -1, -1) if backwards else range(start + 1, len(self.steps))
        for t in order:
            if not cols.isdisjoint(self.steps[t].hits):
                return t
        return None

    def to_record(self) -> dict:
        """JSON-ready: tokens, strongest label per token, per-layer best chunk and score."""
        cols = self.columns
        rule = cols.token_rule()
        tokens = []
        for s in self.steps:
            best = s.strongest
            label = cols.labels[best] if best >= 0 else None
            conf = rule.confidence(label, s.evidence) if rule is not None and label is not None else None
            tokens.append({
                "index": s.index, "token_id": s.token_id, "text": s.text, "generated": s.generated,
                "logprob": _finite(s.logprob),
                "strongest": cols.ids[best] if best >= 0 else None,
                "strongest_label": cols.labels[best] if best >= 0 else None,
                "strongest_score": _finite(s.strongest_score),
                "agree": s.agree if label is not None else None,
                "voters": cols.voters.get(label) if label is not None else None,
                "evidence": _finite(s.evidence),
                "precision": None if conf is None else {"value": round(conf[0], 4), "n": conf[1], "on": "training"},
                "layer_chunk": [cols.ids[c] if c >= 0 else None for c in s.layer_chunk],
                "layer_score": [_finite(x) for x in s.layer_score],
                "norms": [round(x, 3) for x in s.norms],
            })
        out = {"kind": self.kind, "title": self.title, "settings": self.settings, "finished": self.finished,
               "rule": rule.describe() if rule is not None else None, "text": self.text, "tokens": tokens}
        firings = self.firings
        if firings or self.settings.get("rules"):
            out["firings"] = [dict(f) for f in firings]
        return out


@dataclass
class Session:
    """Everything worth exporting from one sitting: the model, the dictionary, traces and runs."""

    model: dict = field(default_factory=dict)  # LoadedModel.card()
    dictionary: str | None = None
    labels: list[str] = field(default_factory=list)  # every label of the dictionary (fixes the colours)
    traces: list[Trace] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)  # ComparisonReport.to_json() plus prompt and timestamp
    created: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))

    def add_trace(self, trace: Trace) -> None:
        if trace not in self.traces:
            self.traces.append(trace)

    def add_run(self, run: dict) -> None:
        self.runs.append(run)

    def is_empty(self) -> bool:
        return not self.traces and not self.runs

    def to_json(self) -> dict:
        return {"format": SESSION_FORMAT, "version": SESSION_VERSION, "created": self.created,
                "model": self.model, "dictionary": self.dictionary, "labels": list(self.labels),
                "traces": [t.to_record() for t in self.traces], "runs": list(self.runs)}

