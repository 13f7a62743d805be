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
            "h": list(s.hits), **({"ag": s.agree, "ev": _finite(s.evidence, 5)} if s.evidence is not None else {}),
            **({"f": [dict(f) for f in s.firings]} if s.firings else {})}


class Damaged(ValueError):
    """A journal record that cannot be restored; the message says why (counted, the record is skipped)."""


def _int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise Damaged(f"{what} is not a whole number")
    return x


def _num(x, what: str) -> float | None:
    """A stored display number: a JSON number, null, or the strings 'inf' / '-inf' (never another string)."""
    if x is None or x in ("inf", "-inf"):
        return _number(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise Damaged(f"{what} is not a number")
    return float(x)


def _str(x, what: str) -> str:
    if not isinstance(x, str):
        raise Damaged(f"{what} is not text")
    return x


def _list(x, what: str) -> list:
    if not isinstance(x, list):
        raise Damaged(f"{what} is not a list")
    return x


def step_from_dict(d: dict, n_columns: int | None = None) -> TokenStep:
    """A step back from its record; with `n_columns`, every chunk column it names must exist."""
    if not isinstance(d, dict):
        raise Damaged("a token is not an object")
    try:
        lc = [_int(c, "a layer's chunk column") for c in _list(d["lc"], "'lc'")]
        ls = [_num(x, "a layer score") for x in _list(d["ls"], "'ls'")]
        norms = [_num(x, "a norm") for x in _list(d["n"], "'n'")]
        hits = tuple(_int(c, "a hit column") for c in _list(d.get("h", []), "'h'"))
        top = []
        for item in _list(d.get("top", []), "'top'"):
            if not isinstance(item, list) or len(item) != 2:
                raise Damaged("a top-k entry is not a [text, probability] pair")
            top.append((_str(item[0], "a top-k token"), _num(item[1], "a top-k probability") or 0.0))
        step = TokenStep(index=_int(d["i"], "'i'"), token_id=_int(d["id"], "'id'"), text=_str(d["t"], "'t'"),
                         generated=bool(d["g"]), logprob=_num(d.get("lp"), "'lp'"), top=top,
                         strongest=_int(d["s"], "'s'"), strongest_score=_num(d.get("ss"), "'ss'") or float("-inf"),
                         layer_chunk=lc, layer_score=ls, norms=norms, hits=hits,
                         agree=_int(d.get("ag", 0), "'ag'"), evidence=_num(d.get("ev"), "'ev'"),
                         firings=tuple(dict(f) for f in _list(d.get("f", []), "'f'") if isinstance(f, dict)))
    except KeyError as err:
        raise Damaged(f"a token lacks {err}") from None
    if not len(lc) == len(ls) == len(norms):
        raise Damaged("a token's per-layer lists differ in length")
    if n_columns is not None:
        bad = [c for c in (*lc, step.strongest) if not -1 <= c < n_columns] + \
            [c for c in hits if not 0 <= c < n_columns]
        if bad:
            raise Damaged(f"a token points at chunk column {bad[0]}, and the trace has {n_columns}")
    return step


def columns_to_dict(c: ChunkColumns) -> dict:
    return {"ids": c.ids, "labels": c.labels, "layers": c.layers, "thresholds": [_finite(x) for x in c.thresholds],
            "kinds": c.kinds, **({"rule": c.rule, "voters": c.voters} if c.rule is not None else {})}


def columns_from_dict(d: dict) -> ChunkColumns:
    if not isinstance(d, dict):
        raise Damaged("the chunk columns are not an object")
    try:
        cols = ChunkColumns(ids=[_str(x, "a chunk id") for x in _list(d["ids"], "'ids'")],
                            labels=[_str(x, "a chunk label") for x in _list(d["labels"], "'labels'")],
                            layers=[_int(x, "a chunk layer") for x in _list(d["layers"], "'layers'")],
                            thresholds=[_num(x, "a threshold") for x in _list(d["thresholds"], "'thresholds'")],
                            kinds=[_str(x, "a chunk kind") for x in _list(d["kinds"], "'kinds'")],
                            rule=d.get("rule") if isinstance(d.get("rule"), dict) else None,
                            voters={_str(k, "a voter label"): _int(v, "a voter count")
                                    for k, v in (d.get("voters") or {}).items()} if isinstance(d.get("voters") or {}, dict)
                            else {})
    except KeyError as err:
        raise Damaged(f"the chunk columns lack {err}") from None
    if not len(cols.ids) == len(cols.labels) == len(cols.layers) == len(cols.thresholds) == len(cols.kinds):
        raise Damaged("chunk columns of different lengths")
    return cols


RUN_NUMBERS = ("control_rate", "perturbed_rate", "delta_rate", "logprob_control", "logprob_perturbed",
               "delta_logprob")


def check_run(run) -> dict:
    """A perturbation run (what `perturb --json` and the app record) checked field by field before anything
    formats it; raises Damaged naming the first field that is missing or of the wrong type."""
    if not isinstance(run, dict):
        raise Damaged("a perturbation run is not an object")
    iv = run.get("intervention")
    if not isinstance(iv, dict):
        raise Damaged("a perturbation run lacks 'intervention'" if iv is None else
                      "a perturbation run's 'intervention' is not an object")
    mode = _str(iv.get("mode"), "the intervention's 'mode'")
    if mode == "rules":  # `perturb --rules`: a guarded run; its intervention is the rules themselves
        for rule in _list(iv.get("rules"), "the intervention's 'rules'"):
            if not isinstance(rule, dict):
                raise Damaged("a rule of the intervention is not an object")
            for key in ("name", "when", "then"):
                _str(rule.get(key), f"a rule's '{key}'")
    else:
        if _num(iv.get("strength"), "the intervention's 'strength'") is None:
            raise Damaged("the intervention's 'strength' is missing")
        [_str(x, "an intervention label") for x in _list(iv.get("labels"), "the intervention's 'labels'")]
        [_int(x, "an intervention layer") for x in _list(iv.get("layers"), "the intervention's 'layers'")]
        _str(iv.get("positions"), "the intervention's 'positions'")
    concepts = run.get("concepts")
    if not isinstance(concepts, dict):
        raise Damaged("a perturbation run lacks 'concepts'" if concepts is None else "'concepts' is not an object")
    for label, c in concepts.items():
        if not isinstance(c, dict):
            raise Damaged(f"concept {label!r} is not an object")
        for key in RUN_NUMBERS:
            if key not in c:
                raise Damaged(f"concept {label!r} lacks '{key}'")
            if _num(c[key], f"concept {label!r}'s '{key}'") is None:
                raise Damaged(f"concept {label!r}'s '{key}' is empty")
    for pair in _list(run.get("pairs", []), "'pairs'"):
        if not isinstance(pair, dict):
            raise Damaged("a pair is not an object")
        for key in ("control", "perturbed"):
            _str(pair.get(key), f"a pair's '{key}'")
        if pair.get("prompt") is not None:
            _str(pair["prompt"], "a pair's 'prompt'")
        for op in _list(pair.get("diff") or [], "a pair's 'diff'"):
            if not isinstance(op, dict):
                raise Damaged("a diff entry is not an object")
            _str(op.get("op"), "a diff entry's 'op'")
            _str(op.get("control"), "a diff entry's 'control'")
            _str(op.get("perturbed"), "a diff entry's 'perturbed'")
    return run


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

    def close(self, clean: bool = True) -> None:
        """End the journal. Only a clean quit (`clean=True`) writes the "closed" record; an app that ends any
        other way (an exception, a signal) leaves the session open, so the next start offers it back."""
        if self._fh is not None:
            if clean:
                self.write({"type": "closed"})
            try:
                os.fsync(self._fh.fileno())
            finally:
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
    reasons: dict[str, int] = field(default_factory=dict)  # why records were skipped -> how many

    def skipped_note(self) -> str:
        """'3 damaged records were left out (2 not valid JSON; 1 a token points at chunk column 7, ...)', or ''."""
        if not self.skipped:
            return ""
        why = "; ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])[:4])
        more = "" if len(self.reasons) <= 4 else "; ..."
        return f"{self.skipped} damaged record{'s were' if self.skipped != 1 else ' was'} left out ({why}{more})"

    @property
    def empty(self) -> bool:
        return self.session.is_empty()


def read_journal(path: str | Path) -> Restored:
    """A journal back into a Session; a torn or damaged record is skipped (counted, with why), never fatal.

    Every record is checked by type and range before it is kept: a token that
    names a chunk column its trace lacks, a perturbation run missing a field or
    holding a number as a string, a line that is not JSON: each is left out and
    counted under its reason, and the rest of the session is restored.
    """
    from chunktui.shared.texts import MAX_LINE_BYTES, loads_json

    path = Path(path)
    try:
        body = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise ChunkError(f"Could not read the session journal {path}: {err.strerror or err}.") from None
    session, closed, exported, skipped = Session(), False, False, 0
    reasons: dict[str, int] = {}
    traces: dict[int, Trace] = {}
    first = True

    def skip(reason: str) -> None:
        nonlocal skipped
        skipped += 1
        reasons[reason] = reasons.get(reason, 0) + 1

    for line in body.splitlines():
        if not line.strip():
            continue
        if first:
            try:
                head = loads_json(line)
            except ValueError:
                head = None
            if not isinstance(head, dict) or head.get("type") != "journal" or head.get("format") != JOURNAL_FORMAT:
                raise ChunkError(f"{path} is not a chunktui session journal.")
            first = False
            continue
        if len(line) > MAX_LINE_BYTES:
            skip(f"longer than {MAX_LINE_BYTES // 2**20} MiB")
            continue
        try:
            rec = loads_json(line)
        except ValueError as err:
            skip("nested too deeply" if "nested too deeply" in str(err) else "not valid JSON (torn or edited)")
            continue
        try:
            if not isinstance(rec, dict):
                raise Damaged("not an object")
            kind = rec.get("type")
            if kind == "session":
                model = rec.get("model") or {}
                if not isinstance(model, dict):
                    raise Damaged("the session's 'model' is not an object")
                dictionary = rec.get("dictionary")
                if dictionary is not None:
                    _str(dictionary, "the session's 'dictionary'")
                session.labels = [_str(x, "a label") for x in _list(rec.get("labels") or [], "'labels'")]
                session.model, session.dictionary = dict(model), dictionary
            elif kind == "trace":
                settings = rec.get("settings") or {}
                if not isinstance(settings, dict):
                    raise Damaged("a trace's 'settings' is not an object")
                trace = Trace(_str(rec.get("kind"), "a trace's 'kind'"), _str(rec.get("title"), "a trace's 'title'"),
                              columns_from_dict(rec.get("columns")), settings=dict(settings))
                trace.trace_id = _int(rec.get("id"), "a trace's 'id'")
                traces[trace.trace_id] = trace
            elif kind in ("steps", "replace", "finished"):
                trace = traces.get(rec.get("id")) if isinstance(rec.get("id"), int) else None
                if trace is None:
                    raise Damaged(f"'{kind}' for a trace that was not restored")
                if kind == "steps":
                    trace.extend([step_from_dict(d, len(trace.columns)) for d in _list(rec.get("steps"), "'steps'")])
                elif kind == "replace":
                    columns = columns_from_dict(rec.get("columns"))
                    steps = [step_from_dict(d, len(columns)) for d in _list(rec.get("steps"), "'steps'")]
                    trace.columns = columns
                    trace.replace_steps(steps)
                else:
                    reason = rec.get("reason")
                    if reason is not None:
                        _str(reason, "a trace's end 'reason'")
                    trace.finished, trace.elapsed = reason, _num(rec.get("elapsed") or 0.0, "'elapsed'") or 0.0
            elif kind == "run":
                session.add_run(dict(check_run(rec.get("run"))))
            elif kind == "exported":
                exported = True
            elif kind == "closed":
                closed = True
            elif kind == "journal":
                pass
            else:
                raise Damaged(f"unknown record type {str(kind)[:40]!r}")
        except Damaged as err:
            skip(str(err))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            skip(f"malformed ({type(err).__name__})")
    if first:
        raise ChunkError(f"{path} is empty: no session to restore.")
    for trace in traces.values():
        if len(trace):
            if trace.finished is None:
                trace.finished = "interrupted"  # the app stopped while it streamed
            session.add_trace(trace)
    return Restored(path, session, closed, exported, skipped, traces, reasons)


def journals(folder: Path | None = None) -> list[Path]:
    """Session journals, newest first."""
    folder = folder or sessions_dir()
    if not folder.is_dir():
        return []
    return sorted(folder.glob("session-*.jsonl"), key=lambda p: p.name, reverse=True)  # names carry the time


def latest_unfinished(folder: Path | None = None, exclude: Path | None = None) -> Restored | None:
    """The newest journal whose app did not end normally and holds something worth offering back.

    Sittings that quit normally (or whose session was discarded) are passed over, so a crashed session is
    still offered after later sittings that ended well; the newest 20 journals are kept (`prune`)."""
    for path in journals(folder):
        if exclude is not None and path == exclude:
            continue
        try:
            restored = read_journal(path)
        except ChunkError:
            continue
        if restored.closed:
            continue  # ended normally (or discarded): an older sitting that did not may still be waiting
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
