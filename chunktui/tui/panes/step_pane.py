"""Step pane: open a text or JSONL file of sequences and step through one token at a time."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, OptionList, Select
from textual.widgets.option_list import Option

from chunktui.tui.widgets.trace_view import TraceView

from chunktui.tui.plain import plain


class StepPane(Vertical):
    BINDINGS = [Binding("ctrl+o", "app.open_sequences", "open file")]

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.sequences: list[tuple[str, str]] = []
        self.labels: list[str] = []

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label("File", classes="field-label")
            yield Input(self.path, id="step-path", placeholder=".txt or .jsonl of sequences", compact=True)
            yield Button("Open", id="step-open", compact=True)
            yield Label("n jumps to", classes="field-label")
            yield Select([], prompt="any chunk", id="step-jump", compact=True)
        with Horizontal(id="step-body"):
            yield OptionList(id="step-list")
            yield TraceView(placeholder="Open a file and choose a sequence (Enter). Then ← → step a token, "
                                        "[ ] change layer, n jumps to the next match.", id="step-trace")

    def set_sequences(self, sequences: list[tuple[str, str]]) -> None:
        self.sequences = sequences
        options = self.query_one("#step-list", OptionList)
        options.clear_options()
        for i, (name, _) in enumerate(sequences):
            options.add_option(Option(plain(name, one=True), id=str(i)))
        options.highlighted = 0 if sequences else None

    def set_labels(self, labels: list[str]) -> None:
        self.labels = list(labels)
        self.query_one("#step-jump", Select).set_options([(plain(label, one=True), label) for label in labels])

    def choose_jump(self, label: str | None) -> None:
        """Make `label` the "n jumps to" choice (None: any chunk); n and p in Step follow what this shows."""
        select = self.query_one("#step-jump", Select)
        if label is None:
            select.clear()
        elif label in self.labels:
            select.value = label
        self.query_one("#step-trace", TraceView).jump_label = label

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "step-jump":
            view = self.query_one("#step-trace", TraceView)
            view.jump_label = None if event.value is Select.NULL else str(event.value)
            view.redraw()
