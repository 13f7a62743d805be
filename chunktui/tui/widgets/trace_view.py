"""Text, legend, token-by-layer map and token detail for one trace: the view Stream and Step share.

Every part draws in time that does not grow with the trace: the text view
lays out only new tokens and draws visible lines, the legend's labels are
counted incrementally, the layer map draws visible rows, and the token detail
shows one token (its per-chunk deviations are asked of the engine when the
cursor settles on it).
"""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from chunktui.shared.session import Trace
from chunktui.tui.widgets.layer_map import LayerMap
from chunktui.tui.widgets.token_detail import TokenDetail
from chunktui.tui.widgets.token_view import TokenView, legend

from chunktui.tui.plain import safe


class TraceView(Widget, can_focus=True):
    """Keyboard: ← → move a token, Home/End, [ ] change layer (all = strongest over layers), n/p next match."""

    LIVE_DETAIL_SECONDS = 0.25  # how often the detail of the newest token is redrawn while a stream runs
    # a moved cursor's detail panel waits this long for the engine's detail (a few ms) before it shows what the
    # step alone says: one draw per move instead of two (the step's summary, then the detail over it)
    DETAIL_WAIT_SECONDS = 0.1

    BINDINGS = [
        Binding("left", "move(-1)", "Token ←", show=False),
        Binding("right", "move(1)", "token", key_display="← →"),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("left_square_bracket", "layer(-1)", "Layer −", show=False),
        Binding("right_square_bracket", "layer(1)", "layer", key_display="[ ]"),
        Binding("n", "next_match(1)", "match", key_display="n p"),
        Binding("p", "next_match(-1)", "Prev match", show=False),
        Binding("shift+down", "detail_scroll(1)", "Detail ↓", show=False),
        Binding("shift+up", "detail_scroll(-1)", "Detail ↑", show=False),
    ]

    class CursorMoved(Message):
        def __init__(self, view: "TraceView", cursor: int | None, layer: int | None) -> None:
            super().__init__()
            self.view = view
            self.cursor = cursor
            self.layer_index = layer

    class DetailWanted(Message):
        """The cursor settled on a token: ask the engine for its per-chunk deviations."""

        def __init__(self, view: "TraceView", trace: Trace, index: int, layer: int | None) -> None:
            super().__init__()
            self.view = view
            self.trace = trace
            self.index = index
            self.layer_index = layer

    def __init__(self, placeholder: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.trace: Trace | None = None
        self.colours: dict[str, str] = {}
        self.n_states = 0
        self.cursor: int | None = None
        self.layer_index: int | None = None
        self.follow = True  # the cursor rides the newest token while streaming
        self.jump_label: str | None = None
        self.placeholder = placeholder
        self.detail = None  # the engine's Detail for (cursor, layer), when it came
        self._legend_key = None
        self._detail_drawn = 0.0
        self._detail_timer = None  # the step's summary, drawn if the engine's detail is late

    def compose(self) -> ComposeResult:  # laid out side by side by the view itself (one container less to draw)
        with Vertical(classes="trace-left"):
            yield TokenView(classes="trace-text")
            yield Static(classes="legend")
        with Vertical(classes="trace-right"):
            yield LayerMap()
            yield TokenDetail(classes="trace-detail")

    def on_mount(self) -> None:
        self.call_after_refresh(self.redraw)

    def set_trace(self, trace: Trace | None, colours: dict[str, str], n_states: int) -> None:
        self.trace, self.colours, self.n_states = trace, colours, n_states
        self.cursor = None if trace is None or not len(trace) else len(trace) - 1
        self.follow = True
        self.detail = None
        self._stop_detail_wait()
        self._legend_key = None
        if self.layer_index is not None and self.layer_index >= n_states:
            self.layer_index = None
        self.redraw()

    def grew(self) -> None:
        """The trace got new tokens: move along with them unless the user took the cursor."""
        if self.trace is not None and len(self.trace) and (self.follow or self.cursor is None):
            self.cursor = len(self.trace) - 1
        self.redraw()

    def relabelled(self) -> None:
        """The trace's steps were replaced (the RNN's full parse): lay the text out again."""
        self._legend_key = None
        if self.is_mounted:
            self.query_one(TokenView).relabelled()
        self.redraw()

    def set_detail(self, detail) -> None:
        if detail.index == self.cursor and detail.layer == self.layer_index:
            self.detail = detail
            self._stop_detail_wait()
            self.query_one(TokenDetail).show(self.trace, self.colours, self.cursor, self.layer_index, detail)

    def redraw(self, moved: bool = False) -> None:
        """Draw what changed. `moved`: the cursor or layer moved, and the engine will be asked for the detail:
        the detail panel waits for it (DETAIL_WAIT_SECONDS at most) rather than being drawn twice."""
        if not self.is_mounted:
            return
        trace, colours = self.trace, self.colours
        text = self.query_one(TokenView)
        text.show(trace, colours, self.cursor, self.layer_index, placeholder=self.placeholder)
        present = trace.present(self.layer_index) if trace else []  # counted incrementally by the trace
        key = (id(trace), tuple(present), self.layer_index, self.jump_label, id(colours), self.app.no_color)
        if key != self._legend_key:  # redrawn only when what it says changes, not per token
            self._legend_key = key
            where = "colour rule, all layers" if self.layer_index is None else f"raw, layer {self.layer_index}"
            line = legend(present, colours, self.app.no_color)
            line.append(f"· {where} ([ ])", style="dim")
            if self.jump_label:
                line.append(f" · n: next {safe(self.jump_label, one=True)}", style="dim")
            self.query_one(".legend", Static).update(line, layout=False)  # fixed height: no layout pass
        self.query_one(LayerMap).show(trace, colours, self.cursor, self.layer_index, self.n_states)
        live = self.follow and trace is not None and trace.finished is None
        now = time.monotonic()
        if not live or now - self._detail_drawn >= self.LIVE_DETAIL_SECONDS:
            # riding a running stream, the newest token's detail changes every frame: draw it a few times a second
            self._detail_drawn = now
            if moved and self._wants_detail() and trace.trace_id is not None:  # the engine will be asked
                self._stop_detail_wait()
                self._detail_timer = self.set_timer(self.DETAIL_WAIT_SECONDS, self._draw_detail)
            elif self._detail_timer is None:  # while it waits, a frame leaves the panel to the detail or the timer
                self._draw_detail()
        if self.cursor is not None:
            text.scroll_to_token(self.cursor)

    def _draw_detail(self) -> None:
        """The detail panel for the cursor: the engine's detail if it came, else what the step says."""
        self._detail_timer = None
        self.query_one(TokenDetail).show(self.trace, self.colours, self.cursor, self.layer_index,
                                         self._cursor_detail())

    def _cursor_detail(self):
        """The engine's Detail if it is the cursor's (token and layer), else None."""
        detail = self.detail
        return detail if detail is not None and detail.index == self.cursor and detail.layer == self.layer_index \
            else None

    def _stop_detail_wait(self) -> None:
        if self._detail_timer is not None:
            self._detail_timer.stop()
            self._detail_timer = None

    def _moved(self) -> None:
        self.redraw(moved=True)
        self.post_message(self.CursorMoved(self, self.cursor, self.layer_index))
        self.want_detail()

    def _wants_detail(self) -> bool:
        """The cursor token's full detail is missing and worth asking for (not the live end of a stream)."""
        trace = self.trace
        if trace is None or self.cursor is None or not len(trace):
            return False
        if self.follow and trace.finished is None:
            return False
        return self._cursor_detail() is None

    def want_detail(self) -> None:
        """Ask for the cursor token's full detail, unless it is the live end of a running stream."""
        if self._wants_detail():
            self.post_message(self.DetailWanted(self, self.trace, self.cursor, self.layer_index))

    def action_move(self, delta: int) -> None:
        if self.trace is None or not len(self.trace):
            return
        T = len(self.trace)
        self.cursor = max(0, min(T - 1, (self.cursor if self.cursor is not None else T - 1) + delta))
        self.follow = self.cursor == T - 1 and self.trace.finished is None
        self._moved()

    def action_jump(self, where: int) -> None:
        if self.trace is None or not len(self.trace):
            return
        self.cursor = len(self.trace) - 1 if where < 0 else 0
        self.follow = where < 0 and self.trace.finished is None
        self._moved()

    def action_layer(self, delta: int) -> None:
        """Cycle: all layers -> 0 -> 1 ... -> L -> all layers."""
        if not self.n_states:
            return
        order = [None] + list(range(self.n_states))
        self.layer_index = order[(order.index(self.layer_index) + delta) % len(order)]
        self._moved()

    def action_detail_scroll(self, direction: int) -> None:
        """Scroll the token's per-layer list (it scrolls with the mouse wheel too)."""
        detail = self.query_one(TokenDetail)
        detail.scroll_relative(y=direction * max(1, detail.size.height - 2), animate=False)

    def action_next_match(self, direction: int) -> None:
        trace = self.trace
        if trace is None or not len(trace):
            return
        start = self.cursor if self.cursor is not None else -1
        label = self.jump_label
        if label is None:  # any match at all
            order = range(start - 1, -1, -1) if direction < 0 else range(start + 1, len(trace))
            found = next((t for t in order if trace.chunk_at(t, self.layer_index) >= 0), None)
        else:
            found = trace.next_match(start, label, self.layer_index, backwards=direction < 0)
        if found is None:
            what = label or "chunk"
            self.app.notify(f"No {'earlier' if direction < 0 else 'later'} match of {what}"
                            f"{'' if self.layer_index is None else f' at layer {self.layer_index}'}.", timeout=3)
            return
        self.cursor = found
        self.follow = False
        self._moved()

    def on_token_view_selected(self, event: TokenView.Selected) -> None:
        self.cursor = event.index
        self.follow = False
        self.focus()
        self._moved()
