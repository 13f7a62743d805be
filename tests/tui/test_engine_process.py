"""The engine process for real: spawned interpreter, socket pair, protocol events, cancel, death and restart."""

from __future__ import annotations

import queue
import time

import pytest

from chunktui.shared import protocol as p
from chunktui.tui.engine_client import EngineClient
from chunktui.tui.token_buffer import TokenBuffer
from tests.tui.conftest import settle


class Recorder:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.died: queue.Queue = queue.Queue()

    def wait_for(self, kind, timeout: float = 120.0):
        """Events up to and including the first of type `kind`."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(event)
            if isinstance(event, kind):
                return seen
        raise AssertionError(f"no {kind.__name__} within {timeout} s; saw {[type(e).__name__ for e in seen]}")


@pytest.fixture()
def engine(tiny_dict):
    rec, buffer = Recorder(), TokenBuffer()
    client = EngineClient(rec.events.put, rec.died.put, buffer, mode="process", threads=1)
    client.start()
    _, dict_path = tiny_dict
    client.send(p.Load("random:llama-tiny", "cpu", dict_path=str(dict_path), candidates=[str(dict_path)]))
    seen = rec.wait_for(p.DictionariesListed)
    yield client, rec, buffer, seen
    client.stop()


def test_the_engine_loads_streams_and_answers_detail_in_another_process(engine):
    client, rec, buffer, seen = engine
    ready = next(e for e in seen if isinstance(e, p.Ready))
    assert ready.pid == client.pid and ready.threads == 1
    loaded = next(e for e in seen if isinstance(e, p.Loaded))
    assert loaded.kind == "lm" and loaded.can_perturb and loaded.n_states == loaded.card["layers"] + 1
    in_use = next(e for e in seen if isinstance(e, p.DictionaryInUse))
    assert "cheese" in in_use.labels and len(in_use.columns) == len(in_use.chunks)

    client.send(p.Generate(1, "The dog ate the cheese by the river", p.Sampling(max_new_tokens=8), chat=False))
    done = rec.wait_for(p.TraceDone)[-1]
    steps = buffer.drain()[1]
    assert done.reason == "length" and sum(s.generated for s in steps) == 8
    assert [s.index for s in steps] == list(range(len(steps)))
    # per token only what the UI draws: plain values, sparse hits, one entry per layer
    cheese = next(s for s in steps if s.text.strip() == "cheese")
    assert cheese.hits and all(isinstance(c, int) for c in cheese.hits)
    assert len(cheese.layer_chunk) == len(cheese.norms) == loaded.n_states
    assert in_use.columns.labels[cheese.strongest] == "cheese"

    # the full deviations stayed in the engine; detail is asked for
    client.send(p.TokenDetail(1, cheese.index, None))
    detail = rec.wait_for(p.Detail)[-1]
    assert detail.available and detail.total_hits == len(cheese.hits)
    assert {r.column for r in detail.rows} <= set(cheese.hits) and all(r.hit for r in detail.rows)
    client.send(p.ChunkScores(1, cheese.strongest))
    scores = rec.wait_for(p.Scores)[-1]
    assert len(scores.scores) == len(steps) and scores.scores[cheese.index] >= 0


def test_cancel_stops_within_a_token_and_a_killed_engine_is_reported(engine):
    client, rec, buffer, _ = engine
    client.send(p.Generate(2, "The dog", p.Sampling(max_new_tokens=480, stop_at_eos=False), chat=False))
    deadline = time.monotonic() + 60
    while buffer.arrived < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    client.send(p.Cancel())
    done = rec.wait_for(p.TraceDone)[-1]
    produced = sum(s.generated for s in buffer.drain()[2])
    assert done.reason == "cancelled" and 20 <= produced < 480
    client.kill()
    code = rec.died.get(timeout=30)
    assert code is not None and code < 0  # killed by a signal, as the app reports it
    assert not client.alive and not client.send(p.Cancel())


@pytest.mark.anyio
async def test_the_app_keeps_its_session_when_the_engine_dies_and_restarts_it(make_test_app):
    from chunktui.tui.screens import RestartEngine

    app = make_test_app(engine_mode="process")
    async with app.run_test(size=(100, 34)) as pilot:
        await settle(app, pilot, timeout=120)
        assert app.model is not None and app.engine.pid is not None
        app.query_one("#prompt").value = "The dog ate the cheese"
        app.query_one("#stream-tokens").value = "6"
        app.action_generate()
        await settle(app, pilot, timeout=120)
        trace = app.stream_trace
        assert trace.finished == "length" and app.session.traces == [trace]
        first_pid = app.engine.pid
        app.engine.kill()
        for _ in range(200):
            await pilot.pause(0.05)
            # pushed is not yet drawn: a click before the dialog's layout lands where its button is not yet
            if isinstance(app.screen, RestartEngine) and any(b.region.area for b in app.screen.query("#restart-yes")):
                break
        assert isinstance(app.screen, RestartEngine)
        assert app.model is None and app.session.traces == [trace]  # the session on screen stays
        assert "engine process stopped (killed by signal 9" in app.screen.text  # said, with the restart offer
        await pilot.click("#restart-yes")
        # the click's callback (restart, then load) may run after a first idle check on a busy machine: wait for
        # the model itself, not only for an idle engine
        deadline = time.monotonic() + 120
        while app.model is None and time.monotonic() < deadline:
            await settle(app, pilot, timeout=5)
        assert app.model is not None and app.engine.pid != first_pid
        app.action_generate()
        await settle(app, pilot, timeout=120)
        assert app.stream_trace.finished == "length" and len(app.session.traces) == 2
