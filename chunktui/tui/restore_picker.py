"""`chunktui tui --restore`: a picker of recent sessions (the journals in the state folder), newest first.

The journals are read in a worker thread (a long session's journal takes a moment), so the screen never waits;
each line says when the session was, what it holds, and whether it was exported or ended normally. Enter restores
the highlighted one; Esc closes the picker and restores nothing.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

SHOWN = 20  # journals listed at most (the state folder keeps that many)


def describe(found) -> Text:
    """One picker line for a read journal (`shared.journal.Restored`)."""
    s = found.session
    try:
        when = _dt.datetime.fromtimestamp(found.path.stat().st_mtime).strftime("%d %b %H:%M")
    except OSError:
        when = "?"
    titles = ", ".join(t.title.replace("\n", " ")[:24] for t in s.traces[:2])
    more = f" +{len(s.traces) - 2}" if len(s.traces) > 2 else ""
    line = Text()
    line.append(f"{when}  ", style="bold")
    line.append(f"{len(s.traces)} texts, {len(s.runs)} runs")
    line.append(" · exported" if found.exported else " · not exported", style="green" if found.exported else "yellow")
    if not found.closed:
        line.append(" · cut short", style="yellow")
    if titles:
        line.append(f"  {titles}{more}", style="dim")
    return line


class RestorePicker(ModalScreen[object]):
    """Dismisses with the chosen `Restored` session, or None."""

    BINDINGS = [Binding("escape", "close", "close")]

    def __init__(self, exclude: Path | None = None, folder: Path | None = None) -> None:
        super().__init__()
        self.exclude, self.folder = exclude, folder
        self.found: list = []  # Restored, in the order listed
        self.unreadable = 0

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box"):
            yield Label("Restore a session (Enter), or Esc for none", id="picker-title")
            yield OptionList(id="picker-list")
            yield Label("reading the session journals…", id="picker-note")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()
        self.run_worker(self._read, thread=True, exclusive=True)

    def _read(self) -> None:
        """Worker thread: read the newest journals that hold something."""
        from chunktui.shared.errors import ChunkError
        from chunktui.shared.journal import journals, read_journal

        found, unreadable = [], 0
        for path in journals(self.folder):
            if self.exclude is not None and path == self.exclude:
                continue
            try:
                restored = read_journal(path)
            except ChunkError:
                unreadable += 1
                continue
            if not restored.empty:
                found.append(restored)
            if len(found) >= SHOWN:
                break
        self.app.call_from_thread(self._show, found, unreadable)

    def _show(self, found: list, unreadable: int) -> None:
        self.found, self.unreadable = found, unreadable
        options = self.query_one(OptionList)
        options.clear_options()
        for i, restored in enumerate(found):
            options.add_option(Option(describe(restored), id=str(i)))
        if found:
            options.highlighted = 0
        note = f"{len(found)} sessions with texts or runs, newest first" if found else \
            "There is no earlier session with texts or runs to restore (Esc closes this)."
        if unreadable:
            note += f"; {unreadable} unreadable journals left out"
        self.query_one("#picker-note", Label).update(note)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.found[int(event.option.id)])

    def action_close(self) -> None:
        self.dismiss(None)
