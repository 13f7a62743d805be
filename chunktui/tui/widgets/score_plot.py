"""A chunk's score across the tokens of a text: bars up where it matches, down where it does not."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from chunktui.tui.plain import safe


class ScorePlot(Widget):
    DEFAULT_CSS = "ScorePlot { height: 7; }"
    LIMIT = 4.0  # scores are clipped to [-LIMIT, LIMIT]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scores: list[float] = []
        self.colour: str | None = None
        self.title = ""

    def show(self, scores: list[float], colour: str | None, title: str) -> None:
        self.scores, self.colour, self.title = scores, colour, title
        self.refresh()

    def render(self) -> Text:
        out = Text(no_wrap=True, overflow="crop")
        out.append(safe(self.title, one=True) or "choose a chunk (Enter) to plot its score across tokens", style="dim")
        if not self.scores:
            return out
        width = max(1, self.size.width - 3)
        scores = self.scores[-width:]  # the latest tokens when the text is wider than the plot
        rows = max(2, self.size.height - 1)
        half = rows // 2
        colour = None if self.app.no_color else self.colour
        for r in range(rows):
            # row r covers one band above (r < half) or below the zero line
            level = (half - r) / half * self.LIMIT if r < half else -(r - half + 1) / (rows - half) * self.LIMIT
            out.append("\n" + ("+ " if r == 0 else "0 " if r == half else "- " if r == rows - 1 else "  "),
                       style="dim")
            for s in scores:
                s = max(-self.LIMIT, min(self.LIMIT, s))
                if r < half and s >= 0 and s >= level - self.LIMIT / half:
                    out.append("█", style=Style(color=colour, bold=True))
                elif r >= half and s < 0 and s < level + self.LIMIT / (rows - half):
                    out.append("▒", style="dim")
                else:
                    out.append(" ")
        return out
