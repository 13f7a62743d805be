"""Step pane: open a text or JSONL file of sequences and step through one token at a time."""

from __future__ import annotations

import json
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, OptionList, Select
from textual.widgets.option_list import Option

from chunktui.engine.errors import CorpusError
from chunktui.tui.widgets.trace_view import TraceView


def read_sequences(path: str | Path) -> list[tuple[str, str]]:
    """(id, text) pairs from a .jsonl file ({"id", "text"} per line) or a text file (one per non-empty line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusError(f"{path} does not exist (or is a folder). Give a .txt or .jsonl file of sequences.")
    try:
        body = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except OSError as err:
        raise CorpusError(f"Could not read {path}: {err.strerror or err}.") from None
    out: list[tuple[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path.name}:{lineno}: not valid JSON ({err.msg}).") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CorpusError(f"{path.name}:{lineno}: expected an object with a \"text\" field.")
            out.append((str(rec.get("id", f"line {lineno}")), rec["text"]))
    else:
        for lineno, line in enumerate(body.splitlines(), 1):
            if line.strip():
                out.append((f"line {lineno}", line.strip()))
    if not out:
        raise CorpusError(f"{path} holds no sequences.")
    return out


class StepPane(Vertical):
    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.sequences: list[tuple[str, str]] = []

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
            options.add_option(Option(name, id=str(i)))
        options.highlighted = 0 if sequences else None

    def set_labels(self, labels: list[str]) -> None:
        self.query_one("#step-jump", Select).set_options([(label, label) for label in labels])

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "step-jump":
            view = self.query_one("#step-trace", TraceView)
            view.jump_label = None if event.value is Select.NULL else str(event.value)
            view.redraw()
