"""What a session of the app holds: traces (streamed or scanned text) and perturbation runs.

A `TokenStep` is one token compacted for display: everything a view needs,
already on the CPU, so the UI thread never touches the model's tensors. A
`Trace` is a growing list of steps plus the packed dictionary's chunk order
(the columns of `score`/`value`/`hit`). A `Session` collects finished traces
and perturbation runs and serialises them to the JSON that `reports` renders.

No UI imports here: the app, the CLI and the benchmarks share this module.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

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

    @staticmethod
    def from_pack(packed) -> "ChunkColumns":
        chunks = packed.chunks if packed is not None else []
        return ChunkColumns(ids=[c.id for c in chunks], labels=[c.label for c in chunks],
                            layers=[int(c.layer) for c in chunks], thresholds=[float(c.threshold) for c in chunks],
                            kinds=[c.kind for c in chunks])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TokenStep:
    """One token, compacted on the worker thread (all CPU; S = L + 1 layers, C = chunks)."""

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
    value: torch.Tensor  # (C,) deviation (PA) or cosine (direction)
    score: torch.Tensor  # (C,) >= 0 iff hit
    hit: torch.Tensor  # (C,) bool


def _steps(indices, ids, texts, generated, logprobs, tops, hidden: torch.Tensor, matches) -> list[TokenStep]:
    """Compact T tokens at once. hidden: (T, S, d); matches: MatchResult over T tokens, or None."""
    norms = hidden.float().norm(dim=-1).cpu()  # (T, S)
    T, S = norms.shape
    if matches is not None:
        m = matches.to("cpu")
        value, score, hit = m.value.float(), m.score.float(), m.hit
        layer_chunk, layer_score = m.layer_chunk.tolist(), m.layer_score.tolist()
        token_chunk, token_score = m.token_chunk.tolist(), m.token_score.tolist()
    else:
        value = score = torch.zeros(T, 0)
        hit = torch.zeros(T, 0, dtype=torch.bool)
        layer_chunk, layer_score = [[-1] * S] * T, [[float("-inf")] * S] * T
        token_chunk, token_score = [-1] * T, [float("-inf")] * T
    norm_rows = norms.tolist()
    return [TokenStep(index=indices[t], token_id=int(ids[t]), text=texts[t], generated=generated[t],
                      logprob=logprobs[t], top=tops[t], strongest=int(token_chunk[t]),
                      strongest_score=float(token_score[t]), layer_chunk=[int(x) for x in layer_chunk[t]],
                      layer_score=[float(x) for x in layer_score[t]], norms=norm_rows[t],
                      value=value[t].clone(), score=score[t].clone(), hit=hit[t].clone()) for t in range(T)]


def step_from_event(event) -> TokenStep:
    """A streaming.TokenEvent -> TokenStep (call on the worker thread)."""
    return _steps([event.index], [event.token_id], [event.text], [event.generated], [event.logprob], [event.top],
                  event.hidden[None], event.matches)[0]


def steps_from_scan(result) -> list[TokenStep]:
    """A streaming.ScanResult -> TokenSteps (teacher-forced, none generated)."""
    T = len(result.ids)
    return _steps(list(range(T)), result.ids, result.texts, [False] * T, result.logprobs, [[] for _ in range(T)],
                  result.hidden, result.matches)


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
        self._score_cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def extend(self, steps: Iterable[TokenStep]) -> None:
        self.steps.extend(steps)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def n_generated(self) -> int:
        return sum(s.generated for s in self.steps)

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

    def scores(self) -> torch.Tensor:
        """(T, C) score of every chunk at every token (cached until the trace grows)."""
        if self._score_cache is None or self._score_cache[0] != len(self.steps):
            mat = torch.stack([s.score for s in self.steps]) if self.steps else torch.zeros(0, len(self.columns))
            self._score_cache = (len(self.steps), mat)
        return self._score_cache[1]

    def chunk_hits(self, column: int) -> list[bool]:
        return [bool(s.hit[column]) if column < len(s.hit) else False for s in self.steps]

    def next_match(self, start: int, label: str, layer: int | None = None, backwards: bool = False) -> int | None:
        """The next token after `start` where a chunk of `label` hits (at `layer`, or any layer)."""
        cols = [c for c, lab in enumerate(self.columns.labels)
                if lab == label and (layer is None or self.columns.layers[c] == layer)]
        if not cols:
            return None
        order = range(start - 1, -1, -1) if backwards else range(start + 1, len(self.steps))
        for t in order:
            if bool(self.steps[t].hit[cols].any()):
                return t
        return None

    def to_record(self) -> dict:
        """JSON-ready: tokens, strongest label per token, per-layer best chunk and score."""
        cols = self.columns
        tokens = []
        for s in self.steps:
            best = s.strongest
            tokens.append({
                "index": s.index, "token_id": s.token_id, "text": s.text, "generated": s.generated,
                "logprob": _finite(s.logprob),
                "strongest": cols.ids[best] if best >= 0 else None,
                "strongest_label": cols.labels[best] if best >= 0 else None,
                "strongest_score": _finite(s.strongest_score),
                "layer_chunk": [cols.ids[c] if c >= 0 else None for c in s.layer_chunk],
                "layer_score": [_finite(x) for x in s.layer_score],
                "norms": [round(x, 3) for x in s.norms],
            })
        return {"kind": self.kind, "title": self.title, "settings": self.settings, "finished": self.finished,
                "text": self.text, "tokens": tokens}


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

