"""The app's session journal: an append-only JSONL file, flushed as events arrive, that a restart reads back.

One file per sitting, in `<state folder>/sessions/`. Records (one JSON object
per line, each with "type"):

    session   the model card, dictionary path and labels (written again when they change)
    trace     a new trace: id, kind, title, settings, its chunk columns
    steps     tokens appended to a trace (one record per trace per frame)
    replace   a trace's steps all replaced (the RNN's full parse at the end of a stream)
    finished  a trace ended: reason (length, eos, stop, cancelled, failed, scanned), seconds
    run       a perturbation run (the comparison report)
    exported  the session was written to a file
    closed    the app ended normally (a journal without it was cut short: offer it back)

Every record is flushed to the operating system when written, so killing the
app (even `kill -9`) loses nothing already drawn: at most the frame in flight,
a twentieth of a second. The file is synced to disk at most once a second.
Reading tolerates a torn last line and skips damaged lines, counting them.
No torch and no UI imports.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from chunktui.shared.errors import ChunkError
from chunktui.shared.session import ChunkColumns, Session, TokenStep, Trace

JOURNAL_FORMAT = "chunktui.journal"
KEEP = 20  # journals kept in the sessions folder (oldest removed first)


def sessions_dir(state: Path | None = None) -> Path:
    from chunktui.paths import state_dir

    return (state or state_dir()) / "sessions"


def _finite(x, digits: int | None = None):
    """JSON has no inf or nan: they travel as strings (or null). Display values round to `digits`."""
    if x is None:
        return None
    x = float(x)
    if x != x:
        return None
    if abs(x) == float("inf"):
        return "inf" if x > 0 else "-inf"
    return x if digits is None else round(x, digits)


def _number(x) -> float | None:
    if x is None:
        return None
    if x == "inf":
        return float("inf")
    if x == "-inf":
        return float("-inf")
    return float(x)


def step_to_dict(s: TokenStep) -> dict:
    # display values (log p, probabilities, scores, norms) to 5 decimals: a quarter of the size, nothing visible lost
    return {"i": s.index, "id": s.token_id, "t": s.text, "g": s.generated, "lp": _finite(s.logprob, 5),
            "top": [[p, _finite(q, 5)] for p, q in s.top], "s": s.strongest, "ss": _finite(s.strongest_score, 5),
            "lc": s.layer_chunk, "ls": [_finite(x, 5) for x in s.layer_score], "n": [_finite(x, 5) for x in s.norms],
            "h": list(s.hits), **({"f": [dict(f) for f in s.firings]} if s.firings else {})}


def step_from_dict(d: dict) -> TokenStep:
    return TokenStep(index=int(d["i"]), token_id=int(d["id"]), text=str(d["t"]), generated=bool(d["g"]),
                     logprob=_number(d.get("lp")), top=[(str(p), _number(q) or 0.0) for p, q in d.get("top", [])],
                     strongest=int(d["s"]), strongest_score=_number(d.get("ss")) or float("-inf"),
                     layer_chunk=[int(c) for c in d["lc"]], layer_score=[_number(x) for x in d["ls"]],
                     norms=[_number(x) for x in d["n"]], hits=tuple(int(c) for c in d.get("h", [])),
                     firings=tuple(dict(f) for f in d.get("f", []) if isinstance(f, dict)))


def columns_to_dict(c: ChunkColumns) -> dict:
    return {"ids": c.ids, "labels": c.labels, "layers": c.layers, "thresholds": [_finite(x) for x in c.thresholds],
            "kinds": c.kinds}


def columns_from_dict(d: dict) -> ChunkColumns:
    cols = ChunkColumns(ids=[str(x) for x in d["ids"]], labels=[str(x) for x in d["labels"]],
                        layers=[int(x) for x in d["layers"]], thresholds=[_number(x) for x in d["thresholds"]],
                        kinds=[str(x) for x in d["kinds"]])
    if not len(cols.ids) == len(cols.labels) == len(cols.layers) == len(cols.thresholds) == len(cols.kinds):
        raise ValueError("chunk columns of different lengths")
    return cols


class Journal:
    """Appends records to one session's file; each write is flushed, a sync happens at most once a second."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._synced = time.monotonic()
        self.write({"type": "journal", "format": JOURNAL_FORMAT, "version": 1, "pid": os.getpid(),
                    "started": _dt.datetime.now().isoformat(timespec="seconds")})

    @classmethod
    def new(cls, folder: Path | None = None) -> "Journal":
        folder = folder or sessions_dir()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")  # sorts by time; unique per sitting
        journal = cls(folder / f"session-{stamp}-{os.getpid()}.jsonl")
        prune(folder, keep=KEEP, spare=journal.path)
        return journal

    def write(self, record: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._fh.flush()  # in the OS's hands now: a killed app loses nothing written
        now = time.monotonic()
        if now - self._synced >= 1.0:
            os.fsync(self._fh.fileno())
            self._synced = now

    # what the app records
    def session(self, session: Session) -> None:
        self.write({"type": "session", "model": session.model, "dictionary": session.dictionary,
                    "labels": list(session.labels)})

    def trace(self, trace: Trace) -> None:
        self.write({"type": "trace", "id": trace.trace_id, "kind": trace.kind, "title": trace.title,
                    "settings": trace.settings, "columns": columns_to_dict(trace.columns)})

    def steps(self, trace: Trace, steps: list[TokenStep]) -> None:
        if steps:
            self.write({"type": "steps", "id": trace.trace_id, "steps": [step_to_dict(s) for s in steps]})

    def replace(self, trace: Trace) -> None:
        self.write({"type": "replace", "id": trace.trace_id, "columns": columns_to_dict(trace.columns),
                    "steps": [step_to_dict(s) for s in trace.steps]})

    def finished(self, trace: Trace) -> None:
        self.write({"type": "finished", "id": trace.trace_id, "reason": trace.finished, "elapsed": trace.elapsed})

    def run(self, run: dict) -> None:
        self.write({"type": "run", "run": run})

    def exported(self, path: str) -> None:
        self.write({"type": "exported", "path": str(path)})

    def close(self) -> None:
        if self._fh is not None:
            self.write({"type": "closed"})
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


@dataclass
class Restored:
    path: Path
    session: Session
    closed: bool
    exported: bool
    skipped: int = 0  # damaged lines that were left out
    traces_by_id: dict[int, Trace] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.session.is_empty()


def read_journal(path: str | Path) -> Restored:
    """A journal back into a Session; a torn or damaged line is skipped (counted), never fatal."""
    path = Path(path)
    try:
        body = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise ChunkError(f"Could not read the session journal {path}: {err.strerror or err}.") from None
    session, closed, exported, skipped = Session(), False, False, 0
    traces: dict[int, Trace] = {}
    first = True
    for line in body.splitlines():
        if not line.strip():
            continue
        if first:
            try:
                head = json.loads(line)
            except ValueError:
                head = None
            if not isinstance(head, dict) or head.get("type") != "journal" or head.get("format") != JOURNAL_FORMAT:
                raise ChunkError(f"{path} is not a chunktui session journal.")
            first = False
            continue
        try:
            rec = json.loads(line)
            kind = rec["type"]
            if kind == "session":
                session.model = dict(rec.get("model") or {})
                session.dictionary = rec.get("dictionary")
                session.labels = [str(x) for x in rec.get("labels") or []]
            elif kind == "trace":
                trace = Trace(str(rec["kind"]), str(rec["title"]), columns_from_dict(rec["columns"]),
                              settings=dict(rec.get("settings") or {}))
                trace.trace_id = int(rec["id"])
                traces[trace.trace_id] = trace
            elif kind == "steps":
                traces[int(rec["id"])].extend([step_from_dict(d) for d in rec["steps"]])
            elif kind == "replace":
                trace = traces[int(rec["id"])]
                trace.columns = columns_from_dict(rec["columns"])
                trace.replace_steps([step_from_dict(d) for d in rec["steps"]])
            elif kind == "finished":
                trace = traces[int(rec["id"])]
                trace.finished, trace.elapsed = rec.get("reason"), float(rec.get("elapsed") or 0.0)
            elif kind == "run":
                session.add_run(dict(rec["run"]))
            elif kind == "exported":
                exported = True
            elif kind == "closed":
                closed = True
        except ChunkError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            skipped += 1  # a torn last line (the app was killed mid-write) or a damaged one
    if first:
        raise ChunkError(f"{path} is empty: no session to restore.")
    for trace in traces.values():
        if len(trace):
            if trace.finished is None:
                trace.finished = "interrupted"  # the app stopped while it streamed
            session.add_trace(trace)
    return Restored(path, session, closed, exported, skipped, traces)


def journals(folder: Path | None = None) -> list[Path]:
    """Session journals, newest first."""
    folder = folder or sessions_dir()
    if not folder.is_dir():
        return []
    return sorted(folder.glob("session-*.jsonl"), key=lambda p: p.name, reverse=True)  # names carry the time


def latest_unfinished(folder: Path | None = None, exclude: Path | None = None) -> Restored | None:
    """The newest journal whose app did not end normally and holds something worth offering back."""
    for path in journals(folder):
        if exclude is not None and path == exclude:
            continue
        try:
            restored = read_journal(path)
        except ChunkError:
            continue
        if restored.closed:
            return None  # the newest sitting ended normally: nothing to offer
        if not restored.empty:
            return restored
    return None


def prune(folder: Path, keep: int = KEEP, spare: Path | None = None) -> None:
    for path in journals(folder)[keep:]:
        if path != spare:
            try:
                path.unlink()
            except OSError:
                pass
