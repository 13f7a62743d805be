"""The session journal: what the app writes as it goes comes back after a crash, whatever state the file is in."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunktui.shared.errors import ChunkError
from chunktui.shared.journal import Journal, journals, latest_unfinished, read_journal
from chunktui.shared.session import ChunkColumns, Session, TokenStep, Trace


def _step(i: int, text: str, hits=(), generated=True) -> TokenStep:
    return TokenStep(index=i, token_id=100 + i, text=text, generated=generated, logprob=None if i == 0 else -0.5 * i,
                     top=[(" a", 0.25), ("b", 0.125)], strongest=hits[0] if hits else -1,
                     strongest_score=1.5 if hits else float("-inf"), layer_chunk=[hits[0] if hits else -1, -1],
                     layer_score=[1.5 if hits else float("-inf"), float("-inf")], norms=[1.0, 2.5],
                     hits=tuple(hits))


COLUMNS = ChunkColumns(ids=["cheese@0", "cake@1"], labels=["cheese", "cake"], layers=[0, 1], thresholds=[0.5, 1e-9],
                       kinds=["pa", "pa"])


RUN = {"intervention": {"mode": "graft", "strength": 1.0, "labels": ["cheese"], "layers": [1, 2], "positions": "prompt"},
       "concepts": {"cheese": {"control_rate": 0.1, "perturbed_rate": 0.5, "delta_rate": 0.4, "logprob_control": -3.0,
                               "logprob_perturbed": -1.0, "delta_logprob": 2.0}},
       "pairs": [{"prompt": "Q", "seed": 0, "control": "a b", "perturbed": "a c",
                  "diff": [{"op": "equal", "control": "a ", "perturbed": "a "},
                           {"op": "replace", "control": "b", "perturbed": "c"}]}]}


def _write_session(folder, close: bool) -> tuple[Journal, Trace]:
    journal = Journal.new(folder)
    journal.session(Session(model={"name": "tiny"}, dictionary="d.chunks.safetensors", labels=["cake", "cheese"]))
    trace = Trace("stream", "The dog", COLUMNS, settings={"seed": 0})
    trace.trace_id = 1
    journal.trace(trace)
    steps = [_step(0, "The", generated=False), _step(1, " cheese", hits=(0,)), _step(2, "\n", hits=(0, 1))]
    trace.extend(steps)
    journal.steps(trace, steps[:2])
    journal.steps(trace, steps[2:])
    trace.finished = "cancelled"
    journal.finished(trace)
    journal.run(RUN)
    if close:
        journal.close()
    return journal, trace


def test_a_journal_reads_back_as_the_session_it_recorded(tmp_path):
    journal, trace = _write_session(tmp_path, close=False)
    restored = read_journal(journal.path)
    assert not restored.closed and restored.skipped == 0
    (back,) = restored.session.traces
    assert back.steps == trace.steps and back.finished == "cancelled" and back.title == "The dog"
    assert back.columns == COLUMNS and back.settings == {"seed": 0}
    assert restored.session.model == {"name": "tiny"} and restored.session.labels == ["cake", "cheese"]
    assert restored.session.runs == [RUN]
    assert latest_unfinished(tmp_path).path == journal.path  # cut short: offered back


def test_a_closed_journal_is_not_offered_and_a_killed_stream_is_marked(tmp_path):
    _write_session(tmp_path, close=True)
    assert latest_unfinished(tmp_path) is None
    journal = Journal.new(tmp_path)  # a later sitting, killed while streaming
    trace = Trace("stream", "x", COLUMNS)
    trace.trace_id = 7
    journal.trace(trace)
    journal.steps(trace, [_step(0, "x", generated=False)])
    found = latest_unfinished(tmp_path)
    assert found.path == journal.path and found.session.traces[0].finished == "interrupted"
    assert len(journals(tmp_path)) == 2


def test_not_a_journal_is_refused_with_a_message(tmp_path):
    other = tmp_path / "session-x.jsonl"
    other.write_text('{"format": "something else"}\n')
    with pytest.raises(ChunkError, match="not a chunktui session journal"):
        read_journal(other)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ChunkError, match="empty"):
        read_journal(tmp_path / "empty.jsonl")


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), garbage=st.binary(max_size=40))
def test_a_torn_or_damaged_journal_restores_its_intact_prefix(tmp_path_factory, cut, garbage):
    folder = tmp_path_factory.mktemp("j")
    journal, trace = _write_session(folder, close=False)
    body = journal.path.read_bytes()
    header_end = body.index(b"\n") + 1
    cut = header_end + cut % (len(body) - header_end + 1)
    journal.path.write_bytes(body[:cut] + garbage)
    restored = read_journal(journal.path)  # never raises on a torn tail
    kept = [s for t in restored.session.traces for s in t.steps]
    assert kept == trace.steps[:len(kept)]  # what comes back is exactly a prefix of what was written
    complete = body[:cut].decode().split("\n")[1:-1]  # records whose newline was written before the cut
    written_steps = sum(len(r["steps"]) for r in map(json.loads, complete) if r["type"] == "steps")
    assert len(kept) >= written_steps  # nothing that was fully written is lost


# --------------------------------------------------------------------------- damaged records (issue 21)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rewrite(path, records, extra_lines=()):
    path.write_text("\n".join([json.dumps(r) for r in records] + list(extra_lines)) + "\n")


def test_damaged_records_are_skipped_with_reasons_and_the_rest_restored(tmp_path):
    journal, trace = _write_session(tmp_path, close=False)
    records = _lines(journal.path)
    steps_rec = next(r for r in records if r["type"] == "steps")
    bad_column = json.loads(json.dumps(steps_rec))
    bad_column["steps"][0]["lc"][0] = 7  # a chunk column the trace does not have (it has 2)
    no_intervention = {"type": "run", "run": {k: v for k, v in RUN.items() if k != "intervention"}}
    string_number = {"type": "run", "run": json.loads(json.dumps(RUN))}
    string_number["run"]["intervention"]["strength"] = "1"
    string_rate = {"type": "run", "run": json.loads(json.dumps(RUN))}
    string_rate["run"]["concepts"]["cheese"]["delta_logprob"] = "2.0"
    missing_key = json.loads(json.dumps(steps_rec))
    del missing_key["steps"][0]["lc"]
    wrong_type = {"type": "trace", "id": "one", "kind": "stream", "title": 5, "columns": []}
    _rewrite(journal.path, records + [bad_column, no_intervention, string_number, string_rate, missing_key,
                                      wrong_type], extra_lines=['{"type": "steps", "id": 1, "ste', "[[[["])
    restored = read_journal(journal.path)
    (back,) = restored.session.traces
    assert back.steps == trace.steps  # everything intact came back
    assert restored.session.runs == [RUN]
    assert restored.skipped == 8
    note = restored.skipped_note()
    assert note.startswith("8 damaged records were left out")
    assert "chunk column 7" in note and "lacks 'intervention'" in note and "not a number" in note
    assert "not valid JSON" in note


def test_a_restored_session_never_holds_a_column_out_of_range(tmp_path):
    journal, _ = _write_session(tmp_path, close=False)
    records = _lines(journal.path)
    for r in records:
        if r["type"] == "steps":
            r["steps"][-1]["h"] = [0, 5]
    _rewrite(journal.path, records)
    restored = read_journal(journal.path)
    for t in restored.session.traces:
        for s in t.steps:
            assert all(-1 <= c < len(t.columns) for c in (*s.layer_chunk, s.strongest, *s.hits))
    assert restored.reasons and restored.skipped == 2  # both steps records held a bad column


def test_only_a_clean_close_marks_the_session_closed(tmp_path):
    journal, _ = _write_session(tmp_path, close=False)
    journal.close(clean=False)  # the app ended by an exception or a signal
    assert not read_journal(journal.path).closed
    assert latest_unfinished(tmp_path).path == journal.path
    again = Journal.new(tmp_path)
    again.close()  # a clean quit of an empty sitting
    assert read_journal(again.path).closed


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False) |
                     st.text(max_size=5), lambda kids: st.lists(kids, max_size=3) |
                     st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["trace", "steps", "replace", "finished", "run", "session"]), field=st.text(max_size=8),
       value=_JSON, data=st.data())
def test_fuzz_any_field_of_any_record(tmp_path_factory, kind, field, value, data):
    """Arbitrary JSON in place of any field of any record: a ChunkError never; a restored session always valid."""
    from chunktui.shared.journal import check_run

    folder = tmp_path_factory.mktemp("f")
    journal, trace = _write_session(folder, close=False)
    if kind == "replace":
        journal.replace(trace)
    records = _lines(journal.path)
    targets = [r for r in records if r["type"] == kind]
    rec = targets[0]
    # replace a field at the top, one level down, or inside the first step
    where = data.draw(st.sampled_from(["top", "inner", "step"]))
    keys = list(rec)
    if where == "inner" and isinstance(rec.get(kind if kind == "run" else "columns"), dict):
        inner = rec[kind if kind == "run" else "columns"]
        inner[data.draw(st.sampled_from(list(inner) + [field]))] = value
    elif where == "step" and kind in ("steps", "replace") and rec["steps"]:
        step = rec["steps"][0]
        step[data.draw(st.sampled_from(list(step)))] = value
    else:
        rec[data.draw(st.sampled_from(keys + [field]))] = value
    _rewrite(journal.path, records)
    restored = read_journal(journal.path)  # never raises: the header is intact
    for t in restored.session.traces:
        assert isinstance(t.title, str) and isinstance(t.kind, str)
        for s in t.steps:
            assert isinstance(s.text, str)
            assert all(-1 <= c < len(t.columns) for c in (*s.layer_chunk, s.strongest, *s.hits))
            assert len(s.layer_chunk) == len(s.layer_score) == len(s.norms)
    for run in restored.session.runs:
        check_run(run)
