"""Text, legend, token-by-layer map and token detail for one trace: the view Stream and Step share."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from chunktui.engine.session import Trace
from chunktui.tui.widgets.layer_map import LayerMap
from chunktui.tui.widgets.token_detail import TokenDetail
from chunktui.tui.widgets.token_view import TokenView, legend


class TraceView(Widget, can_focus=True):
    """Keyboard: ← → move a token, Home/End, [ ] change layer (all = strongest over layers), n/p next match."""

    BINDINGS = [
        Binding("left", "move(-1)", "Token ←", show=False),
        Binding("right", "move(1)", "Token →", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("left_square_bracket", "layer(-1)", "Layer −", show=False),
        Binding("right_square_bracket", "layer(1)", "Layer +", show=False),
        Binding("n", "next_match(1)", "Next match", show=False),
        Binding("p", "next_match(-1)", "Prev match", show=False),
    ]

    class CursorMoved(Message):
        def __init__(self, view: "TraceView", cursor: int | None, layer: int | None) -> None:
            super().__init__()
            self.view = view
            self.cursor = cursor
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

    def compose(self) -> ComposeResult:
        with Horizontal(classes="trace-body"):
            with Vertical(classes="trace-left"):
                with VerticalScroll(classes="trace-text"):
                    yield TokenView()
                yield Static(classes="legend")
            with Vertical(classes="trace-right"):
                yield LayerMap()
                with VerticalScroll(classes="trace-detail"):
                    yield TokenDetail()

    def on_mount(self) -> None:
        self.call_after_refresh(self.redraw)

    def set_trace(self, trace: Trace | None, colours: dict[str, str], n_states: int) -> None:
        self.trace, self.colours, self.n_states = trace, colours, n_states
        self.cursor = None if trace is None or not len(trace) else len(trace) - 1
        self.follow = True
        if self.layer_index is not None and self.layer_index >= n_states:
            self.layer_index = None
        self.redraw()

    def grew(self) -> None:
        """The trace got new tokens: move along with them unless the user took the cursor."""
        if self.trace is not None and len(self.trace) and (self.follow or self.cursor is None):
            self.cursor = len(self.trace) - 1
        self.redraw()

    def redraw(self) -> None:
        if not self.is_mounted:
            return
        trace, colours = self.trace, self.colours
        self.query_one(TokenView).show(trace, colours, self.cursor, self.layer_index, placeholder=self.placeholder)
        present = sorted({l for l in (trace.labels(self.layer_index) if trace else []) if l})
        where = "strongest, all layers" if self.layer_index is None else f"layer {self.layer_index}"
        text = legend(present, colours, self.app.no_color)
        text.append(f"· {where} ([ ])", style="dim")
        if self.jump_label:
            text.append(f" · n: next {self.jump_label}", style="dim")
        self.query_one(".legend", Static).update(text)
        self.query_one(LayerMap).show(trace, colours, self.cursor, self.layer_index, self.n_states)
        self.query_one(TokenDetail).show(trace, colours, self.cursor, self.layer_index)
        if self.cursor is not None and self.follow:
            self.query_one(".trace-text", VerticalScroll).scroll_end(animate=False)

    def _moved(self) -> None:
        self.redraw()
        self.post_message(self.CursorMoved(self, self.cursor, self.layer_index))

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
        self.follow = where < 0
        self._moved()

    def action_layer(self, delta: int) -> None:
        """Cycle: all layers -> 0 -> 1 ... -> L -> all layers."""
        if not self.n_states:
            return
        order = [None] + list(range(self.n_states))
        self.layer_index = order[(order.index(self.layer_index) + delta) % len(order)]
        self._moved()

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
