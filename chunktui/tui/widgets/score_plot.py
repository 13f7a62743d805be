"""A chunk's score across the tokens of a text, with axes: bars up where it matches, down where it does not.

The y axis is labelled with its range (symmetric about 0, the threshold: a
score >= 0 is a match); the x axis with token indices of the tokens shown
(the latest ones when the text is wider than the plot).
"""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

NICE = (0.5, 1, 2, 4, 8, 16, 32, 64, 128)


def nice_limit(scores: list[float]) -> float:
    """The y axis' half range: the smallest of 0.5, 1, 2, 4, ... 128 that holds every finite score."""
    finite = [abs(s) for s in scores if s is not None and math.isfinite(s)]
    top = max(finite, default=1.0)
    return next((n for n in NICE if top <= n), NICE[-1])


def x_labels(first: int, count: int, width: int) -> str:
    """Token indices under the plot: the first and last token shown, and one in the middle when there is room."""
    line = [" "] * width
    last = first + count - 1

    def put(col: int, text: str) -> None:
        col = max(0, min(width - len(text), col))
        if all(c == " " for c in line[max(0, col - 1):col + len(text) + 1]):
            line[col:col + len(text)] = list(text)

    put(0, str(first))
    if count > 1:
        put(count - len(str(last)), str(last))
    if count >= 3 * (len(str(last)) + 2):
        middle = first + count // 2
        put(count // 2 - len(str(middle)) // 2, str(middle))
    return "".join(line)


from chunktui.tui.plain import safe


class ScorePlot(Widget):
    DEFAULT_CSS = "ScorePlot { height: 10; text-wrap: nowrap; }"
    GUTTER = 7  # the y labels and the axis: "+128 ┤"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scores: list[float] = []
        self.colour: str | None = None
        self.title = ""
        self.limit = 1.0
        self.first = 0  # index of the first token drawn

    def show(self, scores: list[float], colour: str | None, title: str) -> None:
        self.scores, self.colour, self.title = scores, colour, title
        self.refresh()

    def render(self) -> Text:
        out = Text(no_wrap=True, overflow="crop")
        title = safe(self.title, one=True) or "choose a chunk (Enter) to plot its score across tokens"
        if len(title) > self.size.width > 1:  # one line: the axes below keep their rows
            title = title[:self.size.width - 1] + "…"
        out.append(title, style="dim")
        if not self.scores:
            return out
        width = max(1, self.size.width - self.GUTTER)
        self.first = max(0, len(self.scores) - width)
        scores = [s if s is not None and not math.isnan(s) else 0.0 for s in self.scores[self.first:]]
        limit = self.limit = nice_limit(scores)
        body = max(3, self.size.height - 3)  # title, x axis, x labels
        up = body // 2  # rows above the zero line
        down = body - up - 1  # rows below it
        colour = None if self.app.no_color else self.colour
        bar = Style(color=colour, bold=True)
        for r in range(body):
            if r == 0:
                label, tick = f"{limit:+g}", "┤"
            elif r == up:
                label, tick = "0", "┼"
            elif r == body - 1:
                label, tick = f"{-limit:+g}", "┤"
            else:
                label, tick = "", "│"
            out.append("\n" + label.rjust(self.GUTTER - 2) + " " + tick, style="dim")
            if r == up:  # the zero line: the threshold; a token at exactly 0 still matches
                for s in scores:
                    out.append("▄" if s >= 0 else "─", style=bar if s >= 0 else "dim")
                continue
            for s in scores:
                s = max(-limit, min(limit, s))
                if r < up:  # band [lo, hi) above zero, row 0 at the top
                    lo = limit * (up - r - 1) / up
                    out.append("█" if s > lo else " ", style=bar)
                else:
                    hi = -limit * (r - up - 1) / down
                    out.append("▒" if s < hi and s < 0 else " ", style="dim")
        out.append("\n" + " " * (self.GUTTER - 1) + "└" + "─" * len(scores), style="dim")
        out.append("\n" + "token".rjust(self.GUTTER - 1) + " " + x_labels(self.first, len(scores), width),
                   style="dim")
        return out
