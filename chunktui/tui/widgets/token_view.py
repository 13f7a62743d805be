"""The text of a trace, each token coloured by its strongest matching chunk."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.message import Message
from textual.widgets import Static

from chunktui.engine.session import Trace
from chunktui.tui.colours import token_style


class TokenView(Static):
    """Renders tokens; the widget above decides the cursor, the layer and which chunk to show."""

    DEFAULT_CSS = "TokenView { width: 1fr; height: auto; }"

    class Selected(Message):
        """A token was clicked."""

        def __init__(self, view: "TokenView", index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

    def show(self, trace: Trace | None, colours: dict[str, str], cursor: int | None = None, layer: int | None = None,
             only_column: int | None = None, placeholder: str = "") -> None:
        """Colour by the strongest chunk (at `layer` if given), or only where chunk column `only_column` hits."""
        if trace is None or not len(trace):
            self.update(Text(placeholder, style="dim"))
            return
        no_color = self.app.no_color
        out = Text()
        for t, step in enumerate(trace.steps):
            if only_column is not None:
                hit = only_column < len(step.hit) and bool(step.hit[only_column])
                label = trace.columns.labels[only_column] if hit else None
            else:
                label = trace.label_at(t, layer)
            style = token_style(colours.get(label) if label else None, cursor=(t == cursor), no_color=no_color)
            if step.generated and label is None and not no_color:
                style += Style(italic=True)
            piece = step.text
            if not piece.strip("\n") and t == cursor:
                piece = "⏎" + piece if "\n" in piece else "␣"
            out.append(piece or ("▯" if t == cursor else ""), style=style + Style(meta={"@click": f"pick({t})"}))
        self.update(out)

    def action_pick(self, index: int) -> None:
        self.post_message(self.Selected(self, index))


def legend(labels: list[str], colours: dict[str, str], no_color: bool = False, empty: str = "no chunk matched") -> Text:
    """The concepts present, each as a swatch in its colour."""
    out = Text()
    if not labels:
        out.append(empty, style="dim")
        return out
    for label in labels:
        out.append(f" {label} ", style=token_style(colours.get(label), no_color=no_color))
        out.append(" ")
    return out
