"""The app's session journal keeper: opens the journal, writes each record, and offers back a lost session.

The journal itself (`shared.journal`) is an append-only JSONL file; this keeper
is the app's side of it: one place that says "journalling stopped" once on a
full disk and carries on, and the start-up question that brings back a session
that did not end normally (`ChunkApp.restore_session` rebuilds it on screen).
"""

from __future__ import annotations

import datetime as _dt

from chunktui.shared.errors import ChunkError
from chunktui.tui.screens import Choice


class JournalKeeper:
    def __init__(self, app) -> None:
        self.app = app
        self.journal = None  # shared.journal.Journal while journalling

    def open(self) -> None:
        """Start this sitting's journal; then offer (or, with --restore, restore) an earlier session."""
        from chunktui.shared.journal import Journal, latest_unfinished

        app = self.app
        if not app.use_journal:
            return
        try:
            self.journal = Journal.new()
        except OSError as err:
            app.fail(f"The session cannot be journalled ({err}); it will be lost if the app is killed. "
                     "Export it (F6) before you quit.", title="No journal", severity="warning")
            return
        try:
            if app.restore_at_start:  # `chunktui tui --restore`: pick one of the recent sessions
                from chunktui.tui.restore_picker import RestorePicker

                app.push_screen(RestorePicker(exclude=self.journal.path),
                                lambda found: app.restore_session(found) if found is not None else None)
                return
            found = latest_unfinished(exclude=self.journal.path)
        except ChunkError as err:
            app.fail(str(err), title="Session not restored", severity="warning")
            return
        if found is None:
            return
        s = found.session
        when = _dt.datetime.fromtimestamp(found.path.stat().st_mtime).strftime("%H:%M on %d %b")
        text = (f"The app stopped without closing at {when} ({len(s.traces)} texts, {len(s.runs)} perturbation "
                f"runs{', exported' if found.exported else ', not exported'}). Restore that session?")
        app.push_screen(Choice(text, [("restore", "Restore", "primary"), ("discard", "Discard", "error"),
                                      ("cancel", "Not now", "default")]),
                        lambda answer: self._answer(answer, found))

    def _answer(self, answer: str, found) -> None:
        if answer == "restore":
            self.app.restore_session(found)
        elif answer == "discard":
            try:
                with open(found.path, "a", encoding="utf-8") as fh:
                    fh.write('{"type":"closed"}\n')
            except OSError:
                pass

    def record(self, method: str, *args) -> None:
        """Write one record (`Journal.<method>(*args)`); on a write failure say so once and stop journalling."""
        if self.journal is not None:
            try:
                getattr(self.journal, method)(*args)
            except OSError as err:  # a full disk: say it once, stop journalling, keep working
                self.journal = None
                self.app.fail(f"The session journal could not be written ({err}); journalling stopped. Export "
                              "the session (F6) to keep it.", title="Journal stopped", severity="warning")

    def close(self, clean: bool = True) -> None:
        """Close the journal; `clean=False` (the app ended any way but a chosen quit) leaves it open to restore."""
        if self.journal is not None:
            try:
                self.journal.close(clean=clean)
            except OSError:
                pass
            self.journal = None
