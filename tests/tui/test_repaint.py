"""Frames repaint what changed: the layer map's rows, the token detail's lines (no layout pass), and the engine
process started before the app."""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult
from textual.geometry import Region

from chunktui.shared.session import ChunkColumns, TokenStep, Trace
from chunktui.tui.widgets.layer_map import LayerMap
from chunktui.tui.widgets.token_detail import TokenDetail
from chunktui.tui.widgets.token_view import TokenView

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


class DetailApp(App):
    def compose(self) -> ComposeResult:
        yield TokenDetail()


def _detail_lines(widget) -> list[str]:
    return [widget.render_line(y).text.rstrip() for y in range(widget.size.height)]


async def test_token_detail_repaints_changed_lines_without_a_layout_pass(monkeypatch):
    app = DetailApp()
    async with app.run_test(size=(40, 14)) as pilot:
        view = app.query_one(TokenDetail)
        trace = _trace(12)
        view.show(trace, COLOURS, 0, None)
        await pilot.pause()
        first = _detail_lines(view)
        assert first[0].startswith("token 0 'w0'") and "a" in "\n".join(first)
        calls = []
        original = view.refresh

        def refresh(*regions, **kwargs):
            calls.append((regions, kwargs))
            return original(*regions, **kwargs)

        monkeypatch.setattr(view, "refresh", refresh)
        view.show(trace, COLOURS, 1, None)  # another token: a text of the same length, some lines differ
        assert calls and not any(kw.get("layout") for _, kw in calls)  # no layout pass of the screen
        assert all(len(r) == 1 and r[0].height == 1 for r, _ in calls)  # line by line
        assert len(calls) < view.size.height  # not every line
        await pilot.pause()
        second = _detail_lines(view)
        assert second[0].startswith("token 1 'w1'") and str(view.content).startswith("token 1")
        changed = {y for y in range(len(first)) if first[y] != second[y]}
        assert {r[0].y for r, _ in calls} == changed  # exactly the lines that differ
        calls.clear()
        view.show(trace, COLOURS, 1, None)  # the same text again: nothing to repaint
        assert calls == []


async def test_token_detail_longer_than_its_panel_scrolls():
    app = DetailApp()
    async with app.run_test(size=(14, 5)) as pilot:  # a narrow panel: the text wraps past its height
        view = app.query_one(TokenDetail)
        trace = _trace(3)
        view.show(trace, COLOURS, 0, None)
        await pilot.pause()
        assert view.virtual_size.height > view.size.height and view.show_vertical_scrollbar
        assert view.virtual_size.width == view.size.width - 1  # wrapped beside the scrollbar
        text = str(view.content)
        view.scroll_to(y=1, animate=False)
        await pilot.pause()
        assert view.scroll_y == 1
        wrapped = [view.render_line(y).text.rstrip() for y in range(view.size.height)]
        assert wrapped[0] and wrapped[0] in text and not text.startswith(wrapped[0])  # lines further down
        view.show(trace, COLOURS, 1, None)  # another token: back to its top
        await pilot.pause()
        assert view.scroll_y == 0 and view.render_line(0).text.startswith("token 1")


class TextApp(App):
    def compose(self) -> ComposeResult:
        yield TokenView()


async def test_token_view_draws_each_line_once_until_it_changes(monkeypatch):
    app = TextApp()
    async with app.run_test(size=(30, 6)) as pilot:
        view = app.query_one(TokenView)
        trace = _trace(150)
        view.show(trace, COLOURS, 0, None)
        await pilot.pause()
        assert view.line_count() > 12
        drawn = []
        original = view._draw
        monkeypatch.setattr(view, "_draw", lambda line, *rest: drawn.append(line) or original(line, *rest))
        before = {y: view.render_line(y) for y in range(3, 6)}  # lines 3-5, which scrolling moves up
        view.scroll_to(y=3, animate=False, immediate=True)  # a scroll: every line moves on screen
        await pilot.pause()
        assert sorted(set(drawn)) == [6, 7, 8]  # only the lines new on screen are drawn
        assert all(view.render_line(y - 3) is before[y] for y in before)  # the others are the strips drawn before
        drawn.clear()
        target = next(t for t in range(len(trace)) if view._line_of[t] == 4)
        old = view.render_line(4 - 3)
        view.show(trace, COLOURS, target, None)  # the cursor moves onto line 4 (from line 0, off screen)
        await pilot.pause()
        assert sorted(set(drawn)) == [4]  # its line is drawn anew, and nothing else on screen
        assert view.render_line(4 - 3) != old  # with the cursor on it
        drawn.clear()
        view.show(trace, COLOURS, target, 1)  # another layer: every line anew
        await pilot.pause()
        assert sorted(set(drawn)) == [3, 4, 5, 6, 7, 8]


async def test_a_followed_stream_scrolls_the_token_view_half_a_screen_at_a_time(monkeypatch):
    app = TextApp()
    async with app.run_test(size=(30, 8)) as pilot:
        view = app.query_one(TokenView)
        height = view.scrollable_content_region.height
        half = height // 2
        trace = _trace(0)
        scrolls, ranges, lines = [], [], []
        for i in range(300):  # a stream, one token per frame, the cursor on the newest token
            trace.extend([_step(i)])
            view.show(trace, COLOURS, i, None)
            view.scroll_to_token(i)
            await pilot.pause()
            y, top = view._line_of[i], int(view.scroll_offset.y)
            assert top <= y < top + height  # the newest token is always on screen
            if not scrolls or scrolls[-1] != top:
                scrolls.append(top)
            if not ranges or ranges[-1] != view.virtual_size.height:
                ranges.append(view.virtual_size.height)
            lines.append(view.line_count())
        assert view.line_count() > 4 * height
        # short of a screenful the range is the text's own (no scrollbar); past it, it grows in half screens,
        # with room for the last line to stand mid-way
        assert view.virtual_size.height % half == 0 and view.virtual_size.height >= view.line_count() + height - half
        assert len(ranges) <= height + (view.line_count() - height) // half + 2
        # each scroll moves half a screen (the newest line mid-way), so there are about twice as few scrolls as
        # screens of text, not one per line
        assert all(b - a == height - half for a, b in zip(scrolls[1:], scrolls[2:]))
        assert len(scrolls) <= 2 + (view.line_count() - height) // (height - half)
        # moving back to a token above the screen puts its line mid-way too; the first token scrolls to the top
        target = next(t for t in range(len(trace)) if view._line_of[t] == view.line_count() - 3 * height)
        view.scroll_to_token(target)
        await pilot.pause()
        assert int(view.scroll_offset.y) == view._line_of[target] - half
        view.scroll_to_token(0)
        await pilot.pause()
        assert view.scroll_offset.y == 0


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
