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
    journal.run({"intervention": {"mode": "graft"}, "pairs": []})
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
    assert restored.session.runs == [{"intervention": {"mode": "graft"}, "pairs": []}]
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
