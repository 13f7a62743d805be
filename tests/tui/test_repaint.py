"""Frames repaint what changed: the layer map's rows, and the engine process started before the app."""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult
from textual.geometry import Region

from chunktui.shared.session import ChunkColumns, TokenStep, Trace
from chunktui.tui.widgets.layer_map import LayerMap

pytestmark = pytest.mark.anyio

S = 4
COLOURS = {"a": "red"}  # one dict, as the app passes its own


def _trace(n: int) -> Trace:
    trace = Trace("stream", "t", ChunkColumns(["a@1"], ["a"], [1], [1.0], ["pa"]))
    trace.extend(_step(i) for i in range(n))
    return trace


def _step(i: int) -> TokenStep:
    hit = i % 3 == 0
    return TokenStep(i, i, f"w{i}", True, None, [], 0 if hit else -1, 1.0 if hit else float("-inf"),
                     [0 if hit and s == 1 else -1 for s in range(S)], [1.0 if hit and s == 1 else float("-inf")
                                                                      for s in range(S)], [1.0] * S)


class MapApp(App):
    def compose(self) -> ComposeResult:
        yield LayerMap()


def _spy(monkeypatch, widget):
    calls = []
    original = widget.refresh

    def refresh(*regions, **kwargs):
        calls.append(regions)
        return original(*regions, **kwargs)

    monkeypatch.setattr(widget, "refresh", refresh)
    return calls


def _rows_shown(widget) -> list[str]:
    return [(widget.render_line(y).text.split() or [""])[0] for y in range(1, widget.size.height)]


async def test_layer_map_repaints_only_the_rows_that_change(monkeypatch):
    app = MapApp()
    async with app.run_test(size=(40, 12)) as pilot:  # 11 token rows
        view = app.query_one(LayerMap)
        trace = _trace(40)
        view.show(trace, COLOURS, 20, None, S)
        await pilot.pause()
        first = _rows_shown(view)
        assert first[0] == "w15" and "w20" in first  # the cursor mid-way
        calls = _spy(monkeypatch, view)
        view.show(trace, COLOURS, 21, None, S)  # a key: the cursor moves inside the rows on screen
        assert calls and all(len(c) == 1 and isinstance(c[0], Region) and c[0].height == 1 for c in calls)
        assert sorted(c[0].y for c in calls) == [1 + 20 - 15, 1 + 21 - 15]  # the old and the new cursor rows
        await pilot.pause()
        assert _rows_shown(view) == first  # the rows stay put
        calls.clear()
        view.show(trace, COLOURS, 35, None, S)  # off screen: the window moves, everything is repainted
        assert calls == [()]
        await pilot.pause()
        assert _rows_shown(view)[0] == "w30"


async def test_layer_map_paints_new_tokens_of_a_stream_row_by_row(monkeypatch):
    app = MapApp()
    async with app.run_test(size=(40, 12)) as pilot:
        view = app.query_one(LayerMap)
        trace = _trace(3)
        view.show(trace, COLOURS, None, None, S)
        await pilot.pause()
        calls = _spy(monkeypatch, view)
        trace.extend([_step(3), _step(4)])
        view.show(trace, COLOURS, None, None, S)  # the cursor rides the newest token
        assert sorted(c[0].y for c in calls) == [3, 4, 5]  # the old last row (cursor left it) and the two new ones
        await pilot.pause()
        assert _rows_shown(view)[:5] == ["w0", "w1", "w2", "w3", "w4"]


def test_prestarted_engine_is_adopted_by_the_app_client():
    import chunktui.tui.engine_client as ec

    events = []
    ec.prestart(1, None)
    early = ec._EARLY["engine"]
    client = ec.EngineClient(events.append, lambda code: None, ec.TokenBuffer(), mode="process", threads=1)
    try:
        client.start()
        assert client.process is early[1] and "engine" not in ec._EARLY  # the same process, not a second one
        ec.prestart(2, None)
        other = ec._EARLY["engine"]
        second = ec.EngineClient(events.append, lambda code: None, ec.TokenBuffer(), mode="process", threads=1)
        second.start()  # another thread count: the early one is ended and a fresh engine started
        assert second.process is not other[1] and other[1].wait(timeout=30) is not None
        second.stop()
    finally:
        client.stop()
