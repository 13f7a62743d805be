"""Export pane: the session as JSON, Markdown, HTML or CSV, through the same code as `chunktui report`."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, Select, Static

from chunktui.tui.plain import plain, safe

FORMATS = [("HTML (self-contained, coloured tokens)", "html"), ("Markdown", "md"), ("CSV (one row per token)", "csv"),
           ("JSON (the session)", "json")]


class ExportPane(Vertical):
    BINDINGS = [Binding("ctrl+e", "app.export", "export")]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label("Format", classes="field-label")
            yield Select(FORMATS, value="html", allow_blank=False, id="export-format", compact=True)
        with Horizontal(classes="form-row"):
            yield Label("File", classes="field-label")
            # absolute, so the person sees where the file goes (the folder the app was started in)
            yield Input(str(Path.cwd() / "chunktui-session.html"), id="export-path", compact=True)
            yield Button("Export", id="export", variant="primary", compact=True)
        yield Static("", id="export-summary")
        yield Static("", id="export-result")

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "export-format":
            path = self.query_one("#export-path", Input)
            stem, dot, suffix = path.value.rpartition(".")
            if dot and suffix.lower() in ("html", "md", "csv", "json"):
                path.value = f"{stem}.{event.value}"

    def request(self) -> tuple[str, str]:
        return str(self.query_one("#export-format", Select).value), self.query_one("#export-path", Input).value.strip()

    def show_summary(self, session) -> None:
        lines = Text()
        lines.append("This session\n", style="bold")
        if session.is_empty():
            lines.append("nothing yet: generate (Stream), open a sequence (Step) or regenerate (Perturb)", style="dim")
        for i, trace in enumerate(session.traces, 1):
            lines.append(f"  {i}. {safe(trace.kind, one=True)}: {safe(trace.title[:60], one=True)} ({len(trace)} tokens)\n")
        for i, run in enumerate(session.runs, 1):
            iv = run.get("intervention") if isinstance(run.get("intervention"), dict) else {}
            labels = ", ".join(str(x) for x in iv.get("labels") or [])
            lines.append(safe(f"  run {i}: {iv.get('mode', '?')} x{iv.get('strength', '?')} of {labels}", one=True) + "\n")
        self.query_one("#export-summary", Static).update(lines)

    def show_result(self, text: str, ok: bool) -> None:
        self.query_one("#export-result", Static).update(plain(text, style="green" if ok else "bold red"))
