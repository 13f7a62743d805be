"""The token-by-layer map: one row per token, one column per layer, glyph and colour by match strength."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from chunktui.engine.session import Trace
from chunktui.tui.colours import strength_glyph


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

    def show(self, trace: Trace | None, colours: dict[str, str], cursor: int | None, layer: int | None,
             n_states: int) -> None:
        resized = n_states != self.n_states
        self.trace, self.colours, self.cursor, self.layer_index, self.n_states = trace, colours, cursor, layer, n_states
        self.refresh(layout=resized)  # a layout pass only when the number of layers changes

    def get_content_width_hint(self) -> int:
        return self.label_width + 1 + max(self.n_states, 1)

    def get_content_width(self, container, viewport) -> int:
        return self.get_content_width_hint()

    def render(self) -> Text:
        S = self.n_states
        out = Text(no_wrap=True, overflow="crop")
        head = Text(" " * self.label_width + " ", style="dim")
        for l in range(S):
            if l == self.layer_index:
                head.append("▼", style="bold")
            else:
                head.append(str(l // 10) if l % 10 == 0 and l else ("0" if l == 0 else ("·" if l % 5 == 0 else " ")),
                            style="dim")
        out.append_text(head)
        trace = self.trace
        if trace is None or not len(trace):
            out.append("\n" + "layers →".rjust(self.label_width + 9), style="dim")
            return out
        rows = max(1, self.size.height - 1)
        T = len(trace)
        cursor = T - 1 if self.cursor is None else self.cursor
        # keep the cursor row in view, the newest tokens at the bottom while streaming
        start = max(0, min(cursor - rows // 2, T - rows))
        no_color = self.app.no_color
        for t in range(start, min(T, start + rows)):
            step = trace.steps[t]
            piece = step.text.replace("\n", "⏎").strip() or "␣"
            name = piece[: self.label_width].rjust(self.label_width)
            line = Text("\n")
            line.append(name, style=Style(reverse=(t == cursor), bold=(t == cursor)))
            line.append(" ")
            for l in range(S):
                c = step.layer_chunk[l] if l < len(step.layer_chunk) else -1
                if c < 0:
                    line.append("·", style="dim" if l != self.layer_index else "bold")
                    continue
                label = trace.columns.labels[c]
                colour = None if no_color else self.colours.get(label)
                line.append(strength_glyph(step.layer_score[l]), style=Style(color=colour, bold=(l == self.layer_index)))
            out.append_text(line)
        return out
