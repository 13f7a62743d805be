"""The app's modal screens: questions that wait for an answer (restart the engine, restore, quit, replace)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from chunktui.tui.plain import plain


class RestartEngine(ModalScreen[bool]):
    """The engine process stopped: restart it (and reload the model), or carry on without."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(id="restart-box"):
            yield Label(plain(self.text), id="restart-text", markup=False)
            with Horizontal(classes="form-row"):
                yield Button("Restart engine", id="restart-yes", variant="primary", compact=True)
                yield Button("Not now", id="restart-no", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "restart-yes")

    def key_escape(self) -> None:
        self.dismiss(False)  # as "Not now"


class Choice(ModalScreen[str]):
    """A question with buttons; dismisses with the chosen button's id."""

    def __init__(self, text: str, buttons: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.text, self.buttons = text, buttons  # (id, label, variant)

    def compose(self) -> ComposeResult:
        with Vertical(id="choice-box"):
            yield Label(plain(self.text), id="choice-text", markup=False)
            with Horizontal(classes="form-row"):
                for id_, label, variant in self.buttons:
                    yield Button(label, id=id_, variant=variant, compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()  # the app's own buttons share some of these names
        self.dismiss(event.button.id)

    def key_escape(self) -> None:
        self.dismiss("cancel")
