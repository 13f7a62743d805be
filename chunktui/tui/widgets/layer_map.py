"""The token-by-layer map: one row per token, one column per layer, glyph and colour by match strength.

Drawn line by line (Textual's line API): only the rows on screen are built,
with styles cached per (colour, emphasis), so a frame costs the same at any
length of text; and only rows that changed are repainted (see `show`).
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

from chunktui.shared.session import Trace
from chunktui.tui.colours import strength_glyph

from chunktui.tui.plain import safe


class LayerMap(Widget):
    """Rows follow the cursor; the header marks every fifth layer and the chosen one."""

    DEFAULT_CSS = "LayerMap { height: 1fr; width: auto; min-width: 20; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trace: Trace | None = None
        self.colours: dict[str, str] = {}
        self.cursor: int | None = None
        self.layer_index: int | None = None
        self.n_states = 0
        self.label_width = 6
        self._styles: dict[tuple, Style] = {}
        self._styles_base: Style | None = None
        self._top: int | None = None  # the first token row on screen
        self._shown_len = 0  # the trace's length at the last repaint
        self._drawn_cursor: int | None = None  # the token row last drawn as the cursor's

    def show(self, trace: Trace | None, colours: dict[str, str], cursor: int | None, layer: int | None,
             n_states: int) -> None:
        """Show (trace, cursor, layer); repaint only the rows that changed.

        The rows on screen stay put while the cursor moves inside them, so a key
        repaints two rows (the old cursor's and the new one's) and a frame of a
        running stream repaints the rows of the new tokens; the window moves (a
        full repaint) only when the cursor leaves it, by half a screen at a time
        on a grid of half screens (so where it stands depends on the cursor, not
        on how many tokens each frame brought).
        """
        resized = n_states != self.n_states
        old = (self.trace, self.colours, self.layer_index, self._top, self._shown_len)
        old_cursor = self._drawn_cursor  # the trace may have grown in place: the row drawn as the cursor's
        self.trace, self.colours, self.cursor, self.layer_index, self.n_states = trace, colours, cursor, layer, n_states
        self._drawn_cursor = self._cursor_row()
        if resized:
            self._top, self._shown_len = None, len(trace) if trace is not None else 0
            self.refresh(layout=True)  # a layout pass only when the number of layers changes
            return
        if trace is not old[0]:
            self._top = None
        rows = self._rows()
        top = self._place(rows)
        new_len = len(trace) if trace is not None else 0
        if (trace is not old[0] or colours is not old[1] or layer != old[2] or top != old[3] or not self.size.height
                or new_len < old[4]):
            self._shown_len = new_len
            self.refresh()
            return
        changed = {old_cursor, self._cursor_row()} | set(range(old[4], new_len))
        self._shown_len = new_len
        width = self.size.width
        for t in sorted(t for t in changed if t is not None):  # no cursor: None, nothing to repaint for it
            if top <= t < top + rows:
                self.refresh(Region(0, 1 + t - top, width, 1))

    def get_content_width(self, container, viewport) -> int:
        return self.label_width + 1 + max(self.n_states, 1)

    def _style(self, base: Style, color: str | None = None, bold: bool = False, dim: bool = False,
               reverse: bool = False) -> Style:
        if base is not self._styles_base:  # the theme changed: styles are made again
            self._styles, self._styles_base = {}, base
        key = (color, bold, dim, reverse)
        style = self._styles.get(key)
        if style is None:
            style = self._styles[key] = base + Style(color=color, bold=bold or None, dim=dim or None,
                                                     reverse=reverse or None)
        return style

    def _rows(self) -> int:
        return max(1, self.size.height - 1)

    def _cursor_row(self) -> int | None:
        if self.trace is None or not len(self.trace):
            return None
        return len(self.trace) - 1 if self.cursor is None else self.cursor

    def _place(self, rows: int) -> int:
        """The first token row on screen: kept while the cursor is on screen, else moved to put it mid-way."""
        cursor = self._cursor_row()
        if cursor is None:
            self._top = 0
            return 0
        top = self._top
        half = max(1, rows // 2)
        span = min(2 * half, rows)
        if top is None:  # a fresh trace: the cursor mid-way, or the last tokens filling the rows
            top = max(0, min(cursor - rows // 2, len(self.trace) - rows))
        elif rows < 2:
            top = cursor
        elif cursor >= top + span:  # past the bottom: half a screen on, on a grid of half screens, so the
            top = max(0, (cursor // half - 1) * half)  # rows depend on the cursor, not on how tokens came in
        elif cursor < top:  # above the top: half a screen back
            top = (cursor // half) * half
        self._top = top
        return top

    def _first_row(self, rows: int) -> int:
        """The first token row on screen (see `_place`)."""
        return self._top if self._top is not None else self._place(rows)

    def on_resize(self) -> None:
        self._top = None
        if self.trace is not None:
            self._place(self._rows())

    def render_lines(self, crop):
        self._base = self.rich_style  # computed once per pass: it costs about a millisecond each time
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = getattr(self, "_base", None) or self.rich_style
        S = self.n_states
        if y == 0:  # the header: layer numbers
            segments = [Segment(" " * (self.label_width + 1), self._style(base, dim=True))]
            for l in range(S):
                if l == self.layer_index:
                    segments.append(Segment("▼", self._style(base, bold=True)))
                else:
                    mark = str(l // 10) if l % 10 == 0 and l else ("0" if l == 0 else ("·" if l % 5 == 0 else " "))
                    segments.append(Segment(mark, self._style(base, dim=True)))
            return Strip(segments).adjust_cell_length(width, base)
        trace = self.trace
        if trace is None or not len(trace):
            text = "layers →".rjust(self.label_width + 9) if y == 1 else ""
            return Strip([Segment(text, self._style(base, dim=True))]).adjust_cell_length(width, base)
        rows = max(1, self.size.height - 1)
        t = self._first_row(rows) + y - 1
        if t >= len(trace):
            return Strip.blank(width, base)
        cursor = len(trace) - 1 if self.cursor is None else self.cursor
        step = trace.steps[t]
        piece = safe(step.text.replace("\n", "⏎").strip(), one=True) or "␣"
        name = piece[: self.label_width].rjust(self.label_width)
        segments = [Segment(name, self._style(base, reverse=t == cursor, bold=t == cursor)), Segment(" ", base)]
        no_color = self.app.no_color
        run, run_style = "", None  # neighbouring cells with one style travel as one segment (most are dim dots)
        for l in range(S):
            c = step.layer_chunk[l] if l < len(step.layer_chunk) else -1
            chosen = l == self.layer_index
            if c < 0:
                glyph, style = "·", self._style(base, bold=True) if chosen else self._style(base, dim=True)
            else:
                colour = None if no_color else self.colours.get(trace.columns.labels[c])
                glyph, style = strength_glyph(step.layer_score[l]), self._style(base, color=colour, bold=chosen)
            if style is run_style:
                run += glyph
                continue
            if run:
                segments.append(Segment(run, run_style))
            run, run_style = glyph, style
        if run:
            segments.append(Segment(run, run_style))
        return Strip(segments).adjust_cell_length(width, base)
