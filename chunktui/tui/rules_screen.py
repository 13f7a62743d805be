"""The Rules screen: write rules (one per line), checked as you type, switch them on or off, ring the bell on alerts."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Label, TextArea

from chunktui.shared.errors import ChunkError
from chunktui.shared.rules import Vocabulary, check_rule_texts, rule_lines

EXAMPLE = "# one rule per line, e.g.\n# when cheese -> stop\n# when coffee@10-20>=3 for 2 -> suppress coffee for 8\n"


@dataclass
class RuleSettings:
    """What the app keeps: the rules as written, whether they act, whether an alert rings the bell."""

    text: str = ""
    on: bool = False
    bell: bool = False

    @property
    def texts(self) -> list[str]:
        return rule_lines(self.text)

    def active(self) -> list[str]:
        return self.texts if self.on else []


def check_message(text: str, vocab: Vocabulary | None) -> tuple[bool, str]:
    """(ok, message) for the rules in `text`, against the dictionary when one is in use."""
    texts = rule_lines(text)
    if not texts:
        return True, "no rules"
    try:
        rules = check_rule_texts(texts, vocab)
    except ChunkError as err:
        return False, str(err)
    where = f", checked against {vocab.name}" if vocab is not None else " (not checked: no dictionary in use)"
    return True, f"{len(rules)} rule{'s' if len(rules) != 1 else ''} ok{where}"


class RulesScreen(ModalScreen[RuleSettings | None]):
    """Dismisses with the new settings (Use), or None (Cancel / Escape)."""

    def __init__(self, settings: RuleSettings, vocab: Vocabulary | None) -> None:
        super().__init__()
        self.settings, self.vocab = settings, vocab

    def compose(self) -> ComposeResult:
        with Vertical(id="rules-box"):
            yield Label("Rules act on each generated token's chunk matches (docs/rules.md). An intervention fired "
                        "at token t edits from token t+1; with 'now', token t itself, when the condition's layers "
                        "lie below the edited ones.", id="rules-help")
            yield TextArea(self.settings.text or EXAMPLE, id="rules-text", soft_wrap=True)
            yield Label("", id="rules-check", markup=False)
            with Horizontal(classes="form-row"):
                yield Checkbox("rules on", value=self.settings.on, id="rules-on", compact=True)
                yield Checkbox("bell on alert", value=self.settings.bell, id="rules-bell", compact=True)
                yield Button("Use", id="rules-use", variant="primary", compact=True)
                yield Button("Cancel", id="rules-cancel", compact=True)

    def on_mount(self) -> None:
        self._check()

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        self._check()

    def _check(self) -> bool:
        ok, message = check_message(self.query_one("#rules-text", TextArea).text, self.vocab)
        label = self.query_one("#rules-check", Label)
        label.update(message)
        label.set_class(not ok, "error")
        return ok

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "rules-cancel":
            self.dismiss(None)
            return
        on = self.query_one("#rules-on", Checkbox).value
        if on and not self._check():
            self.notify("Fix the rules first (or switch them off).", severity="error", timeout=4)
            return
        self.dismiss(RuleSettings(text=self.query_one("#rules-text", TextArea).text, on=on,
                                  bell=self.query_one("#rules-bell", Checkbox).value))

    def key_escape(self) -> None:
        self.dismiss(None)
