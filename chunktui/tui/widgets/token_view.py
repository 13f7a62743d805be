"""The text of a trace, each token coloured by its strongest matching chunk, drawn line by line.

A ScrollView on Textual's line API: tokens are laid out into screen lines once
(new tokens extend the last lines; only a resize lays everything out again),
and `render_line` draws just the lines on screen. A frame's cost depends on
the height of the view, not on the length of the text, and moving the cursor
refreshes only the two lines it leaves and enters.
"""

from __future__ import annotations

import textwrap

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from chunktui.shared.session import Trace
from chunktui.tui.colours import token_style
from chunktui.tui.widgets.lines import set_virtual_size

from chunktui.shared.safe import visible
from chunktui.tui.plain import safe


_CONTROL = {c: chr(0x2400 + c) for c in range(32) if c != 10} | {9: "    ", 127: "\u2421"}


def printable(text: str) -> str:
    """A token's text as the screen can show it: tabs as spaces, control bytes as their visible symbols (␙),
    C1 controls, bidi overrides and lone surrogates as chunktui.shared.safe.visible shows them."""
    text = text.translate(_CONTROL) if any(ord(ch) < 32 or ord(ch) == 127 for ch in text) else text
    return visible(text)


class TokenView(ScrollView, can_focus=False):
    """Renders tokens; the widget above decides the cursor, the layer and which chunk to show."""

    # the wrap width never changes (the gutter is kept), and the scrollbar is always shown: Textual lays out the
    # whole screen when a scrollbar appears (show_vertical_scrollbar is a layout reactive), which took two
    # layout passes (24 and 9 ms, instrumented) in the frame where a stream's text first overflowed the view
    # (about token 207 of `bench app`'s stream; a key pressed then took 14-66 ms, against 5-6 ms around it)
    DEFAULT_CSS = "TokenView { width: 1fr; height: 1fr; scrollbar-gutter: stable; overflow-y: scroll; }"

    class Selected(Message):
        """A token was clicked."""

        def __init__(self, view: "TokenView", index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trace: Trace | None = None
        self.colours: dict[str, str] = {}
        self.cursor: int | None = None
        self.shown_layer: int | None = None
        self.only_column: int | None = None
        self.placeholder = ""
        self._lines: list[list[tuple[int, str]]] = []  # each screen line: (token, piece) in order
        self._line_of: list[int] = []  # token -> the line its text starts on
        self._laid = 0  # tokens laid out so far
        self._col = 0  # cells used on the last line
        self._width = 0  # the width the layout was made for
        self._styles: dict[tuple, Style] = {}  # (colour, cursor, italic, no_color, base) -> style
        self._drawn: dict[int, Strip] = {}  # line -> its strip as drawn (kept while the line does not change)
        self._drawn_key: tuple | None = None  # (base style, colours, no_color, width, scroll_x) they were drawn with
        self.anchor: int | None = None  # without a cursor, the token whose line is kept at the top (show_from)

    # ------------------------------------------------------------------ what to show

    def show(self, trace: Trace | None, colours: dict[str, str], cursor: int | None = None, layer: int | None = None,
             only_column: int | None = None, placeholder: str = "") -> None:
        """Show a trace (laid out anew if it is another one), or grow the one shown; redraw what changed."""
        new_trace = trace is not self.trace or (trace is not None and len(trace) < self._laid)
        if new_trace:
            self.trace = trace
            self.anchor = None
            self._reset_layout()
        self.colours, self.placeholder = colours, placeholder
        restyle = new_trace or layer != self.shown_layer or only_column != self.only_column  # every line anew
        self.shown_layer, self.only_column = layer, only_column
        old_cursor, self.cursor = self.cursor, cursor
        first_new = self._extend()
        if restyle:
            self.refresh()
            return
        if first_new is not None:
            self.refresh_lines(first_new, len(self._lines) - first_new)
        for t in (old_cursor, cursor):
            self._refresh_token(t)
        if trace is None or not len(trace):
            self.refresh()

    def grew(self) -> None:
        """Lay out tokens that arrived since the last call."""
        first_new = self._extend()
        if first_new is not None:
            self.refresh_lines(first_new, len(self._lines) - first_new)

    def relabelled(self) -> None:
        """The trace's steps were replaced (same texts, new chunks): redraw what is visible."""
        self._reset_layout()
        self._extend()
        self.refresh()

    def scroll_to_token(self, t: int | None, animate: bool = False) -> None:
        """Bring token t's line on screen. The view stays put while the line is on screen; when it is not, the
        line is put mid-way (half a screen moves at a time): a stream followed to its end scrolls, and so
        repaints the whole view and its scrollbar, once per half screen of text, not once per line."""
        if t is None or t >= len(self._line_of):
            return
        y = self._line_of[t]
        height = self.scrollable_content_region.height
        if not height:  # not laid out yet
            self.scroll_to_region(Region(0, y, 1, 1), animate=animate, immediate=True)
            return
        top = int(self.scroll_offset.y)
        if top <= y < top + height:
            return
        self.scroll_to(y=max(0, y - height // 2), animate=animate, immediate=True)

    def show_from(self, t: int | None) -> None:
        """Scroll so that token t's line is near the top (kept there when a resize lays the text out again)."""
        self.anchor = t
        self._scroll_to_anchor()
        self.call_after_refresh(self._scroll_to_anchor)  # once the new virtual size allows the scroll

    def _scroll_to_anchor(self) -> None:
        t = self.anchor
        if t is None or t >= len(self._line_of):
            return
        self.scroll_to(y=max(0, self._line_of[t] - 1), animate=False, immediate=True)

    def line_count(self) -> int:
        return len(self._lines)

    # ------------------------------------------------------------------ layout

    def _reset_layout(self) -> None:
        self._lines, self._line_of, self._laid, self._col = [], [], 0, 0
        self._width = self._wrap_width()

    def _wrap_width(self) -> int:
        return max(8, self.scrollable_content_region.width or self.size.width or 80)

    def _extend(self) -> int | None:
        """Lay out tokens [laid, T); the first line that changed, or None."""
        trace = self.trace
        if trace is None or self._laid >= len(trace):
            return None
        width = self._width or self._wrap_width()
        self._width = width
        if not self._lines:
            self._lines.append([])
        first = len(self._lines) - 1
        lines, col = self._lines, self._col
        for t in range(self._laid, len(trace)):
            text = printable(trace.steps[t].text)
            self._line_of.append(len(lines) - 1)
            parts = text.split("\n")
            for i, part in enumerate(parts):
                if col and cell_len(part) <= width and cell_len(part) > width - col:
                    lines.append([])  # wrap at the token boundary when the piece fits on a line of its own
                    col = 0
                while part:
                    room = width - col
                    if room <= 0:
                        lines.append([])
                        col, room = 0, width
                    piece = part[:room]
                    while cell_len(piece) > room and len(piece) > 1:  # wide characters
                        piece = piece[:-1]
                    lines[-1].append((t, piece))
                    col += cell_len(piece)
                    part = part[len(piece):]
                if i < len(parts) - 1:
                    lines[-1].append((t, ""))  # the newline itself: drawn as ⏎ under the cursor
                    lines.append([])
                    col = 0
            if not text:
                lines[-1].append((t, ""))
        self._col = col
        self._laid = len(trace)
        self._set_virtual_size(Size(width, self._virtual_height()))
        return first

    def _virtual_height(self) -> int:
        """The scroll range in lines: the text's lines while they fit the view; a longer text gets room below its
        end for its last line to stand mid-way (see `scroll_to_token`), in steps of half a screen, so the range
        (and the scrollbar) changes once per half screen of new text, not with every line."""
        lines = len(self._lines)
        height = self.scrollable_content_region.height
        if not height or lines <= height:
            return lines
        half = max(1, height // 2)
        need = lines + height - half
        return -(-need // half) * half

    def _set_virtual_size(self, size: Size) -> None:
        """A longer text without a layout pass (a layout pass of the whole screen per new line was the largest
        single cost of a frame): see `lines.set_virtual_size`."""
        set_virtual_size(self, size)

    def on_resize(self) -> None:
        if self._wrap_width() != self._width:
            self._reset_layout()
            self._extend()
            if self.cursor is None and self.anchor is not None:
                self._scroll_to_anchor()
            else:
                self.scroll_to_token(self.cursor)
            self.refresh()
        elif self._lines:  # the same wrap, another height: the room below the text follows the height
            self._set_virtual_size(Size(self._width, self._virtual_height()))

    def refresh(self, *regions, **kwargs):
        """A refresh of the whole view draws every line anew; a refresh of a region (a scroll) reuses the lines."""
        if not regions and getattr(self, "_drawn", None):
            self._drawn.clear()
        return super().refresh(*regions, **kwargs)

    def refresh_lines(self, y_start: int, line_count: int = 1) -> None:
        """Lines whose content changed (new tokens, the cursor): drawn anew."""
        drawn = self._drawn
        for y in range(y_start, y_start + line_count):
            drawn.pop(y, None)
        super().refresh_lines(y_start, line_count)

    def _refresh_token(self, t: int | None) -> None:
        if t is None or t >= len(self._line_of):
            return
        y = self._line_of[t]
        end = self._line_of[t + 1] if t + 1 < len(self._line_of) else len(self._lines) - 1
        self.refresh_lines(y, end - y + 1)

    # ------------------------------------------------------------------ drawing

    def _style(self, t: int, base: Style) -> Style:
        """A token's style: its chunk's colour, the cursor, italics for unmatched generated text (cached)."""
        trace = self.trace
        step = trace.steps[t]
        if self.only_column is not None:
            label = trace.columns.labels[self.only_column] if self.only_column in step.hits else None
        else:
            label = trace.label_at(t, self.shown_layer)
        colour = self.colours.get(label) if label else None
        key = (colour, t == self.cursor, step.generated and label is None, self.app.no_color, base, bool(step.firings))
        style = self._styles.get(key)
        if style is None:
            style = token_style(colour, cursor=key[1], no_color=key[3])
            if key[2] and not key[3]:
                style += Style(italic=True)
            if key[5]:  # a rule fired on this token
                style += Style(underline=True, bold=True)
            style = self._styles[key] = base + style
        return style

    def on_click(self, event) -> None:
        """Select the token under the mouse."""
        line = event.y + self.scroll_offset.y
        if self.trace is None or not 0 <= line < len(self._lines):
            return
        x, target = event.x + self.scroll_offset.x, None
        for t, piece in self._lines[line]:
            target = t
            x -= cell_len(piece)
            if x < 0:
                break
        if target is not None:
            self.post_message(self.Selected(self, target))

    def render_lines(self, crop):
        self._base = self.rich_style  # computed once per pass: it costs about a millisecond each time
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width or self.size.width
        base = getattr(self, "_base", None) or self.rich_style
        line = y + scroll_y
        if self.trace is None or not len(self.trace):
            lines = textwrap.wrap(self.placeholder, max(8, width)) or [""]
            text = lines[line] if line < len(lines) else ""
            return Strip([Segment(text, base + Style(dim=True))]).adjust_cell_length(width, base)
        if line >= len(self._lines):
            return Strip.blank(width, base)
        key = (base, id(self.colours), self.app.no_color, width, scroll_x)
        drawn = self._drawn
        if key != self._drawn_key:
            drawn.clear()
            self._drawn_key = key
        strip = drawn.get(line)
        if strip is None:  # a scroll moves lines on screen without changing them: drawn once, not once per scroll
            strip = drawn[line] = self._draw(line, base, scroll_x, width)
            if len(drawn) > 4 * max(8, self.size.height):  # keep the lines around the screen, not every line
                near = range(scroll_y - 2 * self.size.height, scroll_y + 3 * self.size.height)
                for y in [y for y in drawn if y not in near]:
                    del drawn[y]
        return strip

    def _draw(self, line: int, base: Style, scroll_x: int, width: int) -> Strip:
        segments = []
        for t, piece in self._lines[line]:
            if not piece:
                if t == self.cursor:
                    segments.append(Segment("⏎" if "\n" in self.trace.steps[t].text else "▯", self._style(t, base)))
                continue
            if t == self.cursor and not piece.strip():
                piece = "␣" * len(piece)
            segments.append(Segment(piece, self._style(t, base)))
        return Strip(segments).crop(scroll_x, scroll_x + width).adjust_cell_length(width, base)


def legend(labels: list[str], colours: dict[str, str], no_color: bool = False, empty: str = "no chunk matched") -> Text:
    """The concepts present, each as a swatch in its colour."""
    out = Text()
    if not labels:
        out.append(empty, style="dim")
        return out
    for label in labels:
        out.append(f" {safe(label, one=True)} ", style=token_style(colours.get(label), no_color=no_color))
        out.append(" ")
    return out
