"""The chunktui terminal app: Model, Stream, Chunks, Perturb, Step and Export panes.

The app never imports torch. The model, the dictionary and every tensor live
in an engine process (`chunktui/server.py`, spawned at start); panes post typed
requests (`shared/protocol.py`) through `EngineClient`, and events come back:
token steps into a `TokenBuffer` that a 20 Hz timer drains (one redraw per
frame however fast tokens come), everything else as `EngineEvent` messages
handled here. Every failure, in the engine or the app, goes through `fail`,
which logs it (traceback included) to the log file in the state folder and
shows the message; the app carries on. If the engine process dies, the
session on screen stays and the app offers to restart it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import time
from pathlib import Path
from typing import Iterable

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, DataTable, Footer, Input, OptionList, TabbedContent, TabPane

from chunktui.shared import protocol as p
from chunktui.shared.dispatch import Handlers
from chunktui.shared.errors import ChunkError
from chunktui.shared.session import ChunkColumns, Session, Trace
from chunktui.palette import label_colours
from chunktui.paths import state_dir
from chunktui.tui.engine_client import EngineClient
from chunktui.tui.panes.chunks_pane import FIRES_CHARS, FIRES_K, ChunksPane
from chunktui.tui.panes.export_pane import ExportPane
from chunktui.tui.panes.model_pane import ModelPane
from chunktui.tui.panes.perturb_pane import PerturbPane
from chunktui.tui.panes.step_pane import StepPane
from chunktui.tui.panes.stream_pane import StreamPane
from chunktui.tui.journal_keeper import JournalKeeper
from chunktui.tui.options import AppOptions
from chunktui.tui.rules_screen import RuleSettings, RulesScreen, check_message
from chunktui.tui.screens import Choice, RestartEngine
from chunktui.tui.status import StatusBar
from chunktui.tui.token_buffer import TokenBuffer
from chunktui.tui.widgets.trace_view import TraceView

PANES = [("model", "Model", "f1"), ("stream", "Stream", "f2"), ("chunks", "Chunks", "f3"), ("perturb", "Perturb", "f4"),
         ("step", "Step", "f5"), ("export", "Export", "f6")]
FRAME_RATE = 20  # redraws per second while tokens stream
STATUS_SECONDS = 0.5  # the status bar's speed figure is redrawn at most this often while tokens stream
# The app's handler for each engine event, keyed by class (tests check every event has exactly one);
# token steps never come here: the client's reader thread puts them in the TokenBuffer (engine_client.BUFFERED).
ON_EVENT = Handlers("the app")
LONG_REQUESTS = (p.Load, p.ListDictionaries, p.UseDictionary, p.Generate, p.Scan, p.Compare, p.BenchStream,
                 p.TopContexts)
# Each pane's first focus (its F key) and its main text field (`/`, when no text field has focus). The first focus
# is the field you type in, except where the pane's main thing is a text or a table you move through with keys:
# Stream and Step start on their text once there is one (`/` then reaches the prompt / file field), Chunks on its
# table (`/` reaches the filter). Perturb starts on its prompt, never on its Chunks field.
FIRST_FOCUS = {"model": "#model-spec", "stream": "#prompt", "chunks": "#chunk-table", "perturb": "#perturb-prompt",
               "step": "#step-list", "export": "#export-path"}
MAIN_FIELD = {"model": "#model-spec", "stream": "#prompt", "chunks": "#chunk-filter", "perturb": "#perturb-prompt",
              "step": "#step-path", "export": "#export-path"}


class EngineEvent(Message):
    """An event from the engine process (posted by the client's reader thread)."""

    def __init__(self, event) -> None:
        super().__init__()
        self.event = event


class EngineDied(Message):
    def __init__(self, exitcode: int | None) -> None:
        super().__init__()
        self.exitcode = exitcode


class ChunkApp(App):
    """Stream a model's hidden states, see its chunks, graft them, step through texts, export."""

    CSS_PATH = "app.tcss"
    TITLE = "chunktui"
    BINDINGS = [Binding(key, f"pane('{pane}')", title, show=False) for pane, title, key in PANES] + [
        Binding("escape", "cancel", "stop"),
        Binding("ctrl+g", "generate", "generate", show=False),
        Binding("ctrl+r", "regenerate", "perturb", show=False),
        # priority: a text field's own Ctrl+E (end of line) must not swallow the export
        Binding("ctrl+e", "export", "export", show=False, priority=True),
        Binding("f7", "rules", "rules", show=False),
        Binding("slash", "focus_input", "prompt", key_display="/"),
        Binding("question_mark", "toggle_help", "keys", key_display="?"),
    ]

    def __init__(self, options: AppOptions | None = None, **fields) -> None:
        """Start from `options` (an `AppOptions`), or from its fields as keywords (a bare start)."""
        if options is None:
            options = AppOptions(**fields)
        elif fields:
            options = dataclasses.replace(options, **fields)
        super().__init__()
        self.options = options
        o = options
        self.restore_at_start, self.use_journal = o.restore, o.journal
        self.clean_quit = False  # set by quit_cleanly: only then is the journal marked closed
        self.keeper = JournalKeeper(self)  # the session as it happens, for a restart to restore
        self.rule_settings = RuleSettings()  # rules written in the Rules screen (F7), on or off
        self.rule_stop: str | None = None  # the rule that stopped the last stream, for the status bar
        self.dirty = False  # the session holds work not exported yet
        self.stop_at_eos = o.stop_at_eos
        self.model_spec, self.device, self.dtype = o.model_spec, o.device, o.dtype
        self.placement = dict(o.placement)  # device_map, max_memory, offload_folder, offline (from the CLI)
        self.dict_path = o.dict_path
        self.dict_dirs = list(o.dict_dirs)
        self.extra_dicts: list[str] = []
        self.sequences_path = o.sequences_path
        self.show_timing = o.show_timing
        self.autoload = o.autoload
        self.threads = o.threads
        self.start_prompt, self.start_tokens, self.open_step = o.prompt, o.max_new_tokens, o.open_step
        self.model: p.Loaded | None = None  # what the engine loaded
        self.dictionary: p.DictionaryInUse | None = None
        self.colours: dict[str, str] = {}
        self.session = Session()
        self.traces: dict[int, Trace] = {}
        self.stream_trace: Trace | None = None
        self.step_trace: Trace | None = None
        self.current_trace: Trace | None = None
        self.chosen_chunk_id: str | None = None
        self.buffer = TokenBuffer()
        self.engine = EngineClient(self._engine_event, self._engine_died, self.buffer, mode=o.engine_mode,
                                   threads=o.threads, log_path=self.log_path)
        self._busy: str | None = None  # "load", "generate", "perturb", "scan", "search", "bench"
        self._jobs = 0  # long requests sent and not yet done
        self._asks = 0  # detail/score requests not yet answered
        self._detail_pending: dict = {}  # TraceView -> its DetailWanted, sent after the next screen refresh
        self._next_trace = 0
        self._gen_started: float | None = None
        self.engine_ready: p.Ready | None = None
        self.frames = 0  # redraws caused by new tokens (the benchmark reads these)
        self.frame_times: list[float] = []
        self.tokens_per_second: float | None = None
        self.bench_result: p.BenchDone | None = None
        self.memory: p.Memory | None = None
        self._top_request = 0  # the id of the last "where it fires" search asked for
        self._top_asked: tuple[str, str | None] | None = None  # its (name, corpus)
        self._exported_tokens: dict[int, int] = {}  # id(trace) -> its tokens when last exported
        self._exported_runs = 0  # runs in the session when last exported

    @property
    def journal(self):
        """The open `shared.journal.Journal`, or None (not journalling, or stopped after a write failed)."""
        return self.keeper.journal

    @journal.setter
    def journal(self, value) -> None:
        self.keeper.journal = value

    @property
    def log_path(self) -> Path:
        return state_dir() / "chunktui.log"

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="stream"):
            with TabPane("F1 Model", id="model"):
                yield ModelPane(self.model_spec, self.device, self.dtype, placement=self.placement)
            with TabPane("F2 Stream", id="stream"):
                yield StreamPane()
            with TabPane("F3 Chunks", id="chunks"):
                yield ChunksPane()
            with TabPane("F4 Perturb", id="perturb"):
                yield PerturbPane()
            with TabPane("F5 Step", id="step"):
                yield StepPane(self.sequences_path)
            with TabPane("F6 Export", id="export"):
                yield ExportPane()
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1 / FRAME_RATE, self._drain)
        if self.start_tokens:
            self.query_one("#stream-tokens", Input).value = str(self.start_tokens)
        if self.start_prompt:
            self.query_one("#prompt", Input).value = self.start_prompt
        self.update_status()
        self.query_one("#prompt", Input).focus()
        if self.sequences_path and Path(self.sequences_path).is_file():
            self.action_open_sequences(quiet=True)
        if self.open_step:
            self.action_pane("step")
        self.keeper.open()
        self.start_engine()
        # the screen allocates many short-lived objects per frame; the objects made so far live for the whole
        # sitting, so the collector leaves them out (freeze). Young collections run every 2,000 allocations: each
        # is a pause of about 1 ms (p95 1.6 ms over a 1,000-token stream), where every 20,000 they were 6-13 ms
        # on average and up to 46 ms late in a stream (the young objects' referents spread over a larger heap),
        # long enough to land in a key's repaint. Most of what a frame leaves is cyclic (Textual's strips cache
        # themselves), so what survives is swept in the middle generation every 50 young collections (100,000
        # allocations, as before: a pause of about 20 ms, twice a stream) and the oldest as often as before.
        gc.freeze()
        gc.set_threshold(2_000, 50, 80)

    def start_engine(self) -> None:
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # no state folder: the engine's output goes nowhere, the app still works
        self.engine.log_path = self.log_path if self.log_path.parent.is_dir() else None
        self.engine.start()
        if self.autoload:
            self.action_load()

    async def on_unmount(self) -> None:
        self.engine.stop()
        self.keeper.close(clean=self.clean_quit)  # only a quit the user chose marks the session closed

    def quit_cleanly(self) -> None:
        """End the app as the user asked (Ctrl+Q, Quit, Export and quit): the journal is marked closed."""
        self.clean_quit = True
        self.exit()

    # ------------------------------------------------------------------ the session journal

    def restore_session(self, found) -> None:
        """Bring back a journalled session (`journal.read_journal`'s result): its texts, runs and labels."""
        restored = found.session
        if not self.session.model and restored.model:
            self.session.model = restored.model
        if not self.session.labels and restored.labels:
            self.session.labels, self.session.dictionary = list(restored.labels), restored.dictionary
            if not self.colours:
                self.colours = label_colours(restored.labels)
        for trace in restored.traces:
            self._next_trace += 1
            trace.trace_id = self._next_trace  # the engine holds nothing for it: detail comes from the steps
            self.traces[trace.trace_id] = trace
            self.session.add_trace(trace)
            if self.journal is not None:
                self.journal.trace(trace)
                self.journal.steps(trace, trace.steps)
                self.journal.finished(trace)
        for run in restored.runs:
            self.session.add_run(run)
            self.query_one(PerturbPane).add_run(run)
            if self.journal is not None:
                self.journal.run(run)
        n_states = len(restored.traces[0].steps[0].norms) if restored.traces and restored.traces[0].steps else 1
        streams = [t for t in restored.traces if t.kind == "stream"]
        scans = [t for t in restored.traces if t.kind == "scan"]
        if streams:
            self.stream_trace = self.current_trace = streams[-1]
            self.query_one("#stream-trace", TraceView).set_trace(streams[-1], self.colours, n_states)
        if scans:
            self.step_trace = scans[-1]
            self.query_one("#step-trace", TraceView).set_trace(scans[-1], self.colours, n_states)
        self.dirty = self.dirty or (not found.exported and not restored.is_empty())
        if found.exported:  # what was exported before counts as exported now
            self._exported_tokens.update({id(t): len(t) for t in restored.traces})
            self._exported_runs += len(restored.runs)
        more = f"; {found.skipped_note()}" if found.skipped else ""
        self.notify(f"Restored {len(restored.traces)} texts and {len(restored.runs)} runs from "
                    f"{found.path.name}{more}.", title="Session restored", timeout=6, markup=False)

    def unexported(self) -> tuple[int, int]:
        """(texts, runs) added or grown since the last export (all of them before any export)."""
        texts = sum(1 for t in self.session.traces if self._exported_tokens.get(id(t)) != len(t))
        return texts, max(0, len(self.session.runs) - self._exported_runs)

    def _mark_exported(self) -> None:
        self._exported_tokens = {id(t): len(t) for t in self.session.traces}
        self._exported_runs = len(self.session.runs)
        self.dirty = False

    async def action_quit(self) -> None:
        """Ctrl+Q: with work not exported, ask first (export, quit, cancel)."""
        texts, runs = self.unexported()
        if not self.dirty or self.session.is_empty() or not (texts or runs):
            self.quit_cleanly()
            return
        since = " since the last export" if self._exported_tokens or self._exported_runs else ""
        text = (f"This session holds {texts} text{'s' if texts != 1 else ''} and {runs} perturbation "
                f"run{'s' if runs != 1 else ''} that have not been exported{since}. (They stay in the session journal; "
                "`chunktui tui --restore` brings them back.)")
        self.push_screen(Choice(text, [("export", "Export and quit", "primary"), ("quit", "Quit", "error"),
                                       ("cancel", "Cancel", "default")]), self._quit_answer)

    def _quit_answer(self, answer: str) -> None:
        if answer == "quit":
            self.quit_cleanly()
        elif answer == "export":
            if self.action_export(then_quit=True) is False:
                self.action_pane("export")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Load model", "Load the model named in the Model pane", self.action_load)
        yield SystemCommand("Generate", "Stream a continuation of the prompt (Stream pane)", self.action_generate)
        yield SystemCommand("Stop", "Cancel the running generation or comparison", self.action_cancel)
        yield SystemCommand("Regenerate with perturbation", "Run control and perturbed arms (Perturb pane)",
                            self.action_regenerate)
        yield SystemCommand("Open sequences", "Open the file in the Step pane", self.action_open_sequences)
        yield SystemCommand("Export session", "Write the session in the Export pane's format", self.action_export)
        yield SystemCommand("Rules", "Write rules that alert, stop or steer on chunk matches (F7)",
                            self.action_rules)
        yield SystemCommand("Restart engine", "Start a new engine process and load the model again",
                            self.action_restart_engine)
        for pane, title, key in PANES:
            yield SystemCommand(f"Go to {title}", f"Show the {title} pane ({key.upper()})",
                                lambda pane=pane: self.action_pane(pane))

    # ------------------------------------------------------------------ one error path

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Every toast shows its text as written: file names, labels and error texts are never markup
        ('[/bad]' stays '[/bad]') and their control characters are shown as symbols (chunktui.tui.plain)."""
        from chunktui.tui.plain import safe

        super().notify(safe(message), title=safe(title, one=True), severity=severity, timeout=timeout, markup=False)

    def fail(self, text: str, title: str = "Error", severity: str = "error", traceback: str | None = None) -> None:
        """Every failure: logged (with its traceback, if any) to the log file, shown as written."""
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as log:
                stamp = _dt.datetime.now().isoformat(timespec="seconds")
                log.write(f"{stamp} [{severity}] {title}: {text}\n{traceback or ''}")
        except OSError:
            pass
        self.notify(text, title=title, severity=severity, timeout=8, markup=False)

    # ------------------------------------------------------------------ engine plumbing

    def _engine_event(self, event) -> None:  # reader thread
        self.post_message(EngineEvent(event))

    def _engine_died(self, exitcode: int | None) -> None:  # reader thread
        self.post_message(EngineDied(exitcode))

    def send(self, request) -> bool:
        if not self.engine.send(request):
            self.fail("The engine process is not running. Restart it (Ctrl+P, Restart engine).", title="No engine")
            return False
        if isinstance(request, LONG_REQUESTS):
            self._jobs += 1
        elif isinstance(request, (p.TokenDetail, p.ChunkScores)):
            self._asks += 1
        return True

    def engine_idle(self) -> bool:
        """Nothing sent is still outstanding (tests and the benchmark wait on this)."""
        return self._jobs == 0 and self._asks == 0 and self._busy is None

    def on_engine_event(self, message: EngineEvent) -> None:
        ON_EVENT.dispatch(self, message.event)

    def on_engine_died(self, message: EngineDied) -> None:
        how = f"exit code {message.exitcode}" if message.exitcode is not None else "no exit code"
        if message.exitcode is not None and message.exitcode < 0:
            how = f"killed by signal {-message.exitcode}"
        running = self._busy
        self._finish_running("failed")
        self._jobs = self._asks = 0
        self._detail_pending.clear()
        self.model = None
        self._set_busy(None)
        text = (f"The engine process stopped ({how}; out of memory, or killed). "
                f"{'The ' + running + ' in progress was cut short. ' if running else ''}"
                "Your session stays on screen. Restart the engine and load the model again?")
        self.fail(text, title="Engine stopped", severity="error")
        self.push_screen(RestartEngine(text), lambda yes: self.action_restart_engine() if yes else None)

    def action_restart_engine(self) -> None:
        self.engine.stop(timeout=1)
        self.model = None
        self._jobs = self._asks = 0
        self._detail_pending.clear()
        self._set_busy(None)
        self.engine.start()
        self.action_load()

    @ON_EVENT(p.Memory)
    def _handle_memory(self, event: p.Memory) -> None:
        self.memory = event
        if self.model is not None:
            # machine-dependent figures (free memory) are left out where timings are (tests, snapshots)
            self.query_one(ModelPane).show_card(self.model.card, self.show_timing,
                                                event.rows if self.show_timing else None)
        self.update_status()

    @ON_EVENT(p.JobDone)
    def _handle_jobdone(self, event: p.JobDone) -> None:
        self._jobs = max(0, self._jobs - 1)

    @ON_EVENT(p.Ready)
    def _handle_ready(self, event: p.Ready) -> None:
        self.engine_ready = event
        self.query_one(ModelPane).set_catalog(event.catalog)

    @ON_EVENT(p.Progress)
    def _handle_progress(self, event: p.Progress) -> None:
        if event.task == "perturb":  # a comparison's arms: the Perturb pane and the status bar, not the Model pane
            self._perturb_progress = event.text
            self.query_one(PerturbPane).show_progress(event.fraction, event.text)
            self.update_status()
            return
        text = event.text if self.show_timing or event.stage != "done" else "loaded"  # no timings in tests
        self.query_one(ModelPane).show_progress(event.stage, event.fraction, text)
        self._progress = text
        self.update_status()

    @ON_EVENT(p.Failed)
    def _handle_failed(self, event: p.Failed) -> None:
        if event.task == "load":
            self.query_one(ModelPane).show_progress("failed", 0.0, event.title)
        if event.task == "perturb":  # the pane stops saying "running"
            self.query_one(PerturbPane).stopped(event.title)
        if event.task in ("load", "perturb", "bench") and self._busy in ("load", "perturb", "bench"):
            self._set_busy(None)
        if event.task == "top":
            if self._busy != "search" and event.title == "Search cancelled":
                return  # it gave way to another job (_need_idle said so)
            if self._busy == "search":
                self._set_busy(None)
            self.query_one(ChunksPane).clear_fires(f"{event.title}: {event.text}",
                                                   style="" if event.severity == "warning" else "bold red")
        self.fail(event.text, title=event.title, severity=event.severity, traceback=event.traceback)

    # ------------------------------------------------------------------ status

    def update_status(self) -> None:
        bar = getattr(self, "_status_bar", None)
        if bar is None or not bar.is_attached:
            bar = self._status_bar = self.query_one(StatusBar)
        self._status_at = time.perf_counter()
        bar.show(self)

    def _set_busy(self, what: str | None) -> None:
        self._busy = what
        self.query_one(StreamPane).set_running(what == "generate")
        self.query_one("#regenerate", Button).disabled = what == "perturb"
        self.update_status()

    def _need_model(self) -> bool:
        if self.model is None:
            self.fail("Load a model first (F1, Load).", title="No model", severity="warning")
            return False
        return True

    def _need_idle(self) -> bool:
        if self._busy == "search":  # a search gives way to what was asked for now (Find runs it again)
            self.engine.send(p.Cancel())
            self.query_one(ChunksPane).clear_fires("The search stopped for the job you started; press Find to run "
                                                   "it again.")
            self._set_busy(None)
            return True
        if self._busy:
            self.fail(f"Busy: {self._busy} is running. Press Esc to cancel it first.", title="Busy",
                      severity="warning")
            return False
        return True

    # ------------------------------------------------------------------ navigation

    def action_pane(self, pane: str) -> None:
        self.query_one(TabbedContent).active = pane
        self._focus_pane(pane)

    def _focus_pane(self, pane: str) -> None:
        focus = FIRST_FOCUS[pane]
        if pane == "stream" and self.stream_trace is not None:
            focus = "#stream-trace"
        elif pane == "step" and self.step_trace is not None:
            focus = "#step-trace"
        self.query_one(focus).focus()
        if pane == "chunks":
            self._show_chunk_focus()
        if pane == "export":
            self.query_one(ExportPane).show_summary(self.session)

    def action_focus_input(self) -> None:
        """/ : the active pane's main text field (the prompt in Stream), ready to type.

        Only reached when no text field has focus: a focused field takes '/' as a character first."""
        pane = self.query_one(TabbedContent).active
        field = self.query_one(MAIN_FIELD.get(pane, "#prompt"))
        field.focus()
        if isinstance(field, Input):
            field.select_all()  # typing replaces the old text

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = event.pane.id
        if pane == "chunks":
            self._show_chunk_focus()
        elif pane == "export":
            self.query_one(ExportPane).show_summary(self.session)

    def action_toggle_help(self) -> None:
        """?: the keys of the focused pane and widget (Textual's help panel); Esc or ? again closes it."""
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_cancel(self) -> None:
        """Esc: close the help panel if it is open, else stop what is running."""
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
            return
        if self._busy in ("generate", "perturb", "bench", "search"):
            self.engine.send(p.Cancel())
            self.notify(f"Cancelling {self._busy}…", timeout=3)
        elif self._busy == "load":
            self.notify("The model is still loading; it cannot be interrupted half way. Load another one "
                        "afterwards, or restart the engine (Ctrl+P).", timeout=5)

    # ------------------------------------------------------------------ model and dictionaries

    def action_load(self) -> None:
        if self._busy == "load":
            return
        if self._busy:
            self._need_idle()
            return
        spec, device, dtype = self.query_one(ModelPane).values()
        if not spec:
            self.fail("Type a model spec (for example smollm2-135m).", title="No model named")
            return
        self.dictionary, self.model = None, None
        if self.send(p.Load(spec, device, dtype, dict_path=self.dict_path, candidates=self.dictionary_candidates(),
                            **self.query_one(ModelPane).placement_values())):
            self._set_busy("load")
            self.query_one(ModelPane).show_progress("resolve", 0.0, spec)

    @ON_EVENT(p.Loaded)
    def _handle_loaded(self, event: p.Loaded) -> None:
        self.model = event
        self.session.model = event.card
        self.keeper.record("session", self.session)
        self.query_one(ModelPane).show_card(event.card, self.show_timing)
        self._set_busy(None)
        card = event.card
        self.notify(f"Loaded {card['name']} ({card['layers']} layers, width {card['width']}).", timeout=3,
                    markup=False)
        prompt, temp = self.query_one("#prompt", Input), self.query_one("#stream-temp", Input)
        from chunktui.tui.panes.stream_pane import DEFAULT_PROMPT

        if event.suggested_prompt and prompt.value == DEFAULT_PROMPT:
            prompt.value = event.suggested_prompt
        if event.suggested_temperature is not None and float(temp.value or 0) == 0:
            temp.value = str(event.suggested_temperature)

    def dictionary_candidates(self) -> list[str]:
        found: list[str] = []
        for path in ([self.dict_path] if self.dict_path else []) + self.extra_dicts:
            if path and str(path) not in found:
                found.append(str(path))
        for folder in self.dict_dirs:
            if folder.is_dir():
                for path in sorted(folder.glob("*.chunks.safetensors")):
                    if str(path) not in found and not any(Path(f).resolve() == path.resolve() for f in found):
                        found.append(str(path))
        return found

    @ON_EVENT(p.DictionariesListed)
    def _handle_dictionarieslisted(self, event: p.DictionariesListed) -> None:
        self.query_one(ModelPane).show_dictionaries(event.entries, event.select)
        self._start_prompt()  # no dictionary fits the model: the prompt streams without colours

    def _start_prompt(self) -> None:
        """`chunktui tui --prompt`: straight into streaming once the model is loaded and its dictionary (if any) in
        use. Asked for as soon as the dictionary is in use, not when the engine's list of dictionaries arrives
        (about 0.25 s later at start-up): the engine runs the stream after that list."""
        if self.start_prompt and self.model is not None:
            self.start_prompt = None
            self.action_pane("stream")
            self.action_generate()

    @ON_EVENT(p.DictionaryInUse)
    def _handle_dictionaryinuse(self, event: p.DictionaryInUse) -> None:
        self.dictionary = event
        self.colours = label_colours(event.labels)
        self.session.dictionary = event.path
        self.session.labels = list(event.labels)
        self.keeper.record("session", self.session)
        self.query_one(ChunksPane).set_chunks(event.chunks)
        self.query_one(PerturbPane).set_labels(event.labels)
        self.query_one(StepPane).set_labels(event.labels)
        self.chosen_chunk_id = None
        self.update_status()
        self._start_prompt()

    @on(OptionList.OptionSelected, "#dict-list")
    def _dict_chosen(self, event: OptionList.OptionSelected) -> None:
        entry = self.query_one(ModelPane).entries[int(event.option.id)]
        if entry.problem is None and self.model is not None and self.model.kind != "rnn":
            self.send(p.ListDictionaries(self.dictionary_candidates(), select=entry.path))
            self.notify(f"Using {Path(entry.path).name}.", timeout=3, markup=False)

    def action_add_dictionary(self) -> None:
        field = self.query_one("#dict-path", Input)
        path = field.value.strip()
        if not path:
            return
        if not Path(path).expanduser().is_file():
            self.fail(f"{path} does not exist.", title="No such dictionary")
            return
        if not self._need_model():
            return
        if self.model.kind == "rnn":
            self.fail("An RNN uses the DSC chunks learned when it was loaded; chunk dictionaries are for language "
                      "models.", title="Not for the RNN", severity="warning")
            return
        self.extra_dicts.append(str(Path(path).expanduser()))
        field.value = ""
        self.send(p.ListDictionaries(self.dictionary_candidates(), select=str(Path(path).expanduser())))

    # ------------------------------------------------------------------ stream

    def _new_trace(self, kind: str, title: str, settings: dict | None = None) -> Trace:
        self._next_trace += 1
        columns = self.dictionary.columns if self.dictionary is not None else ChunkColumns.empty()
        trace = Trace(kind, title, columns, settings=settings)
        trace.trace_id = self._next_trace
        self.traces[trace.trace_id] = trace
        self.keeper.record("trace", trace)
        return trace

    def action_generate(self) -> None:
        if not self._need_model() or not self._need_idle():
            return
        try:
            request = self.query_one(StreamPane).request()
        except ChunkError as err:
            self.fail(str(err), title="Cannot generate")
            return
        request.sampling.stop_at_eos = self.stop_at_eos
        prompt, sampling, chat = request.prompt, request.sampling, request.chat
        if self.dictionary is None:
            self.notify("No dictionary in use: tokens will not be coloured.", severity="warning", timeout=4)
        request.rules = self.rule_settings.active()
        if request.rules:
            ok, message = check_message(self.rule_settings.text, self._rule_vocab())
            if not ok:
                self.fail(message, title="Rules (F7 to fix or switch off)")
                return
        self.rule_stop = None
        self.query_one(StreamPane).show_firings([])  # the last stream's firings go with it
        settings = dict(sampling.describe(), chat=chat)
        if request.rules:
            settings["rules"] = list(request.rules)
        trace = self._new_trace("stream", prompt, settings)
        self.stream_trace = self.current_trace = trace
        view = self.query_one("#stream-trace", TraceView)
        view.set_trace(trace, self.colours, self.model.n_states)
        view.focus()
        self.buffer.reset()
        self.frames, self.frame_times, self.tokens_per_second = 0, [], None
        self._gen_started = time.perf_counter()
        request.trace_id = trace.trace_id
        if self.send(request):
            self._set_busy("generate")

    @ON_EVENT(p.TraceStarted)
    def _handle_tracestarted(self, event: p.TraceStarted) -> None:
        trace = self.traces.get(event.trace_id)
        if trace is not None:
            trace.columns = event.columns

    def _drain(self) -> None:
        """Timer: move buffered tokens into their traces and redraw once (coalesced)."""
        arrived = self.buffer.drain()
        if not arrived:
            return
        for trace_id, steps in arrived.items():
            trace = self.traces.get(trace_id)
            if trace is not None:
                trace.extend(steps)
                self.keeper.record("steps", trace, steps)  # one record per trace per frame
                self.dirty = True
        self.tokens_per_second = self.buffer.rate(self._gen_started)
        if self.stream_trace is not None and self.stream_trace.trace_id in arrived:
            self._new_firings([f for step in arrived[self.stream_trace.trace_id] for f in step.firings])
            view = getattr(self, "_stream_view", None)
            if view is None or not view.is_attached:
                view = self._stream_view = self.query_one("#stream-trace", TraceView)
            view.grew()
            self.frames += 1
            self.frame_times.append(time.perf_counter())
        if time.perf_counter() - getattr(self, "_status_at", 0.0) >= STATUS_SECONDS:
            self.update_status()  # the speed a few times a second, not every frame

    @ON_EVENT(p.TraceDone)
    def _handle_tracedone(self, event: p.TraceDone) -> None:
        self._drain()
        trace = self.traces.get(event.trace_id)
        if trace is None:
            return
        if event.columns is not None:
            trace.columns = event.columns
        if event.steps is not None:
            trace.replace_steps(event.steps)
            self.keeper.record("replace", trace)
        trace.finished = event.reason
        trace.elapsed = event.elapsed
        self.keeper.record("finished", trace)
        self.dirty = self.dirty or bool(len(trace))
        if trace.kind == "stream":
            if len(trace):
                self.session.add_trace(trace)
            if self._busy == "generate":
                self._set_busy(None)
            view = self.query_one("#stream-trace", TraceView)
            if event.steps is not None:
                view.relabelled()
            view.grew()
            view.want_detail()
            if event.reason == "cancelled":
                self.notify(f"Generation cancelled after {trace.n_generated} tokens; the tokens so far are kept "
                            "in the session.", severity="warning", timeout=4)
            if event.reason == "rule":
                self.rule_stop = trace.stopped_by
                self.query_one(StreamPane).show_firings(trace.firings, self.rule_stop)
                self.notify(f"Stopped by rule {self.rule_stop} after {trace.n_generated} tokens.", timeout=4)
                self.update_status()
            return
        if self._busy == "scan":
            self._set_busy(None)
        if event.reason != "scanned":
            return
        self.step_trace = self.current_trace = trace
        self.session.add_trace(trace)
        view = self.query_one("#step-trace", TraceView)
        view.set_trace(trace, self.colours, self.model.n_states if self.model else 1)
        view.cursor, view.follow = 0, False
        view.redraw()
        view.focus()
        view.want_detail()

    # ------------------------------------------------------------------ rules

    def _rule_vocab(self):
        """The dictionary in use as rules see it (labels at layers, the model's depth), or None."""
        from chunktui.shared.rules import Vocabulary

        if self.dictionary is None or self.model is None:
            return None
        cols = self.dictionary.columns
        return Vocabulary.from_columns(cols.labels, cols.layers, self.model.n_states, self.dictionary.name)

    def action_rules(self) -> None:
        def done(settings: RuleSettings | None) -> None:
            if settings is not None:
                self.rule_settings = settings
                self.update_status()
        self.push_screen(RulesScreen(self.rule_settings, self._rule_vocab()), done)

    def _new_firings(self, firings: list[dict]) -> None:
        """Firings that just streamed: listed under the trace; an alert rings the bell when asked."""
        if not firings:
            return
        self.query_one(StreamPane).show_firings(self.stream_trace.firings)
        if self.rule_settings.bell and any(f.get("action") == "alert" for f in firings):
            self.bell()

    def _finish_running(self, reason: str) -> None:
        """The engine went away mid-run: keep what streamed, marked as such."""
        trace = self.stream_trace
        if self._busy == "generate" and trace is not None and trace.finished is None:
            self._drain()
            trace.finished = reason
            if len(trace):
                self.session.add_trace(trace)

    @on(TraceView.DetailWanted)
    def _detail_wanted(self, event: TraceView.DetailWanted) -> None:
        """Ask the engine for the token's detail once the screen shows the move: the request (a write to the
        engine's pipe, which wakes the engine process) is no part of a key's latency, and a view that moves again
        before the screen is drawn asks only for the token it ends on."""
        if event.trace.trace_id is None or not self.engine.alive:
            return
        pending = self._detail_pending
        if event.view not in pending:
            self._asks += 1  # outstanding from now: engine_idle() waits for it
            self.call_after_refresh(self._send_detail, event.view)
        pending[event.view] = event

    def _send_detail(self, view: TraceView) -> None:
        event = self._detail_pending.pop(view, None)
        if event is None:
            return
        self._asks = max(0, self._asks - 1)  # counted again by send()
        if view.cursor != event.index or view.layer_index != event.layer_index or view.trace is not event.trace:
            return  # the view moved on without asking again (a jump to the live end): nothing to ask
        if event.trace.trace_id is not None and self.engine.alive:
            self.send(p.TokenDetail(event.trace.trace_id, event.index, event.layer_index,
                                    label=event.trace.label_at(event.index)))

    def trace_views(self) -> list[TraceView]:
        """The app's trace views (Stream, Step), found once: a DOM query costs milliseconds per key."""
        views = getattr(self, "_trace_views", None)
        if not views or not all(v.is_attached for v in views):
            views = self._trace_views = list(self.query(TraceView))
        return views

    @ON_EVENT(p.Detail)
    def _handle_detail(self, event: p.Detail) -> None:
        self._asks = max(0, self._asks - 1)
        for view in self.trace_views():
            if view.trace is not None and view.trace.trace_id == event.trace_id:
                view.set_detail(event)

    # ------------------------------------------------------------------ chunks

    @on(DataTable.RowSelected, "#chunk-table")
    def _chunk_chosen(self, event: DataTable.RowSelected) -> None:
        self.chosen_chunk_id = str(event.row_key.value)
        chunk = self._chunk(self.chosen_chunk_id)
        if chunk is not None:
            view = self.query_one("#stream-trace", TraceView)
            view.jump_label = chunk.label
            view.redraw()
            # Step's n/p follow its own "n jumps to" choice, which now shows the chosen label (changeable there)
            self.query_one(StepPane).choose_jump(chunk.label)
        self._show_chunk_focus()
        self.action_find_fires(quiet=True)

    def _chunk(self, chunk_id: str | None) -> p.ChunkInfo | None:
        if self.dictionary is None or chunk_id is None:
            return None
        return next((c for c in self.dictionary.chunks if c.id == chunk_id), None)

    def _show_chunk_focus(self) -> None:
        pane = self.query_one(ChunksPane)
        chunk = self._chunk(self.chosen_chunk_id)
        trace = self.current_trace
        column = None
        if trace is not None and chunk is not None and chunk.id in trace.columns.ids:
            column = trace.columns.ids.index(chunk.id)
        pane.show_focus(trace, self.colours, column, chunk)
        if column is not None and trace.trace_id is not None and len(trace) and self.engine.alive:
            self.send(p.ChunkScores(trace.trace_id, column))

    def action_find_fires(self, quiet: bool = False) -> None:
        """Ask the engine where the chosen chunk (or its label, all layers) fires most in the corpus field's file
        (the sample held-out text when it is empty). `quiet`: chosen in the table; a busy engine is not an error."""
        pane = self.query_one(ChunksPane)
        chunk = self._chunk(self.chosen_chunk_id)
        if chunk is None:
            if not quiet:
                self.fail("Choose a chunk first (Enter on a row of the table).", title="No chunk", severity="warning")
            return
        if self.model is None or self.model.kind != "lm":
            pane.clear_fires("Where a chunk fires is searched with a language model and its dictionary."
                             if self.model is not None else "Load a model to search where the chunk fires.")
            return
        name, corpus = pane.fires_request(chunk)
        if corpus is not None and not Path(corpus).expanduser().is_file():
            pane.clear_fires(f"{corpus} does not exist (or is a folder): give a UTF-8 text file.", style="bold red")
            return
        if self._busy == "search":  # the running pass fills every chunk's tables: asked again when it ends
            pane.show_fires_status(f"searching… then {name}")
            return
        if self._busy:
            if quiet:
                pane.clear_fires(f"{self._busy} is running: press Find when it ends.")
            else:
                self._need_idle()
            return
        self._top_request += 1
        self._top_asked = (name, corpus)
        if self.send(p.TopContexts(self._top_request, name, corpus, k=FIRES_K, chars=FIRES_CHARS)):
            self._set_busy("search")
            where = Path(corpus).name if corpus else "the sample held-out text"
            pane.clear_fires(f"searching {where} for {name}… (Esc stops)")

    @ON_EVENT(p.TopProgress)
    def _handle_topprogress(self, event: p.TopProgress) -> None:
        if event.request_id == self._top_request:
            done = f"{100 * event.fraction:.0f}% · " if event.fraction is not None else ""
            self.query_one(ChunksPane).show_fires_status(f"searching… {done}{event.text} (Esc stops)")

    @ON_EVENT(p.TopFound)
    def _handle_topfound(self, event: p.TopFound) -> None:
        if self._busy == "search":
            self._set_busy(None)
        if event.request_id != self._top_request:
            return
        pane, chunk = self.query_one(ChunksPane), self._chunk(self.chosen_chunk_id)
        if chunk is not None and pane.fires_request(chunk) != self._top_asked:
            self.action_find_fires(quiet=True)  # another chunk was chosen meanwhile: the engine's tables answer it
            return
        pane.show_fires(event, self.colours, self.show_timing)

    @ON_EVENT(p.Scores)
    def _handle_scores(self, event: p.Scores) -> None:
        self._asks = max(0, self._asks - 1)
        trace = self.current_trace
        if trace is not None and trace.trace_id == event.trace_id:
            self.query_one(ChunksPane).show_scores(event, trace)

    # ------------------------------------------------------------------ perturb

    def action_regenerate(self) -> None:
        if not self._need_model() or not self._need_idle():
            return
        if not self.model.can_perturb:
            self.fail("The perturbation panel steers language models. For the RNN, graft a chunk's state with "
                      "`chunktui rnn graft` (and `chunktui rnn transfer`).", title="Not for the RNN",
                      severity="warning")
            return
        if self.dictionary is None:
            self.fail("Perturbing needs a dictionary: pick one in the Model pane (F1).", title="No dictionary")
            return
        try:
            request = self.query_one(PerturbPane).request()
        except ChunkError as err:
            self.fail(str(err), title="Cannot perturb")
            return
        if self.send(request):
            self._perturb_progress = None
            self._set_busy("perturb")
            self.query_one(PerturbPane).show_progress(0.0, "running the control and perturbed arms…")

    @ON_EVENT(p.RunDone)
    def _handle_rundone(self, event: p.RunDone) -> None:
        self.session.add_run(event.run)
        self.keeper.record("run", event.run)
        self.dirty = True
        self._set_busy(None)
        self.query_one(PerturbPane).add_run(event.run)

    # ------------------------------------------------------------------ step

    def action_open_sequences(self, quiet: bool = False) -> None:
        from chunktui.shared.texts import read_sequences

        pane = self.query_one(StepPane)
        path = self.query_one("#step-path", Input).value.strip()
        try:
            sequences = read_sequences(path)
        except ChunkError as err:
            if not quiet:
                self.fail(str(err), title="Cannot open sequences")
            return
        pane.set_sequences(sequences)
        if not quiet:
            self.notify(f"{len(sequences)} sequences from {Path(path).name}. Choose one (Enter).", timeout=3,
                        markup=False)
            self.query_one("#step-list").focus()

    @on(OptionList.OptionSelected, "#step-list")
    def _sequence_chosen(self, event: OptionList.OptionSelected) -> None:
        if not self._need_model() or not self._need_idle():
            return
        name, text = self.query_one(StepPane).sequences[int(event.option.id)]
        trace = self._new_trace("scan", name)
        if self.send(p.Scan(trace.trace_id, name, text)):
            self._set_busy("scan")

    # ------------------------------------------------------------------ export

    def _journal_files(self) -> list[str]:
        """The live journal and every session journal kept: never an export target (they are what restores)."""
        from chunktui.shared.journal import journals

        files = [str(self.journal.path)] if self.journal is not None else []
        try:
            files += [str(p) for p in journals()]
        except OSError:
            pass
        return files

    def action_export(self, then_quit: bool = False, overwrite: bool = False) -> bool | None:
        """Write the session in the Export pane's format; ask before replacing a file. False: nothing written."""
        from chunktui.shared.reports import write_report

        pane = self.query_one(ExportPane)
        fmt, path = pane.request()
        if not path:
            self.fail("Give a file name to export to.", title="No file")
            return False
        from chunktui.shared.outputs import plan_output

        target = Path(path).expanduser().absolute()  # said in full: where the file went
        inputs = [self.session.dictionary, self.sequences_path, self.log_path, *self._journal_files()]
        try:  # refused before any question: the live journal, the session's inputs, devices and /proc links
            plan_output(target, inputs=inputs, overwrite=True, lock=False)
        except ChunkError as err:
            pane.show_result(str(err), ok=False)
            self.fail(str(err), title="Export refused")
            return False
        if target.is_file() and not overwrite:
            self.push_screen(Choice(f"{target} already exists. Replace it with this session's {fmt.upper()} "
                                    "report?", [("overwrite", "Replace", "error"), ("cancel", "Cancel", "default")]),
                             lambda answer: self.action_export(then_quit, overwrite=True)
                             if answer == "overwrite" else pane.show_result("not written: the file exists",
                                                                            ok=False))
            return None
        if self.session.is_empty():
            self.notify("The session is empty; the report will only describe the model.", severity="warning",
                        timeout=4)
        try:  # the same checks as every CLI output: not an input, not a folder, writable, locked while written
            planned = plan_output(target, inputs=inputs, overwrite=overwrite)
            written = write_report(self.session.to_json(), fmt, planned)
        except ChunkError as err:
            pane.show_result(str(err), ok=False)
            self.fail(str(err), title="Export failed")
            return False
        pane.show_result(f"wrote {written} ({fmt})", ok=True)
        pane.show_summary(self.session)
        self.notify(f"Wrote {written}", title="Exported", timeout=4, markup=False)
        self.keeper.record("exported", str(written))
        self._mark_exported()
        if then_quit:
            self.quit_cleanly()
        return True

    # ------------------------------------------------------------------ benchmark hooks

    @ON_EVENT(p.BenchDone)
    def _handle_benchdone(self, event: p.BenchDone) -> None:
        self.bench_result = event
        if self._busy == "bench":
            self._set_busy(None)

    # ------------------------------------------------------------------ events

    @on(Input.Changed)
    def _no_raw_controls(self, event: Input.Changed) -> None:
        """A pasted ESC sequence (or any control character) in a field would reach the terminal raw when the
        field draws itself: it is shown, and used, as its visible symbol (␛) instead."""
        from chunktui.shared.safe import has_unsafe, visible

        if has_unsafe(event.value):
            event.input.value = visible(event.value, newlines=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        action = {"prompt": self.action_generate, "perturb-prompt": self.action_regenerate,
                  "model-spec": self.action_load, "step-path": self.action_open_sequences,
                  "export-path": self.action_export, "dict-path": self.action_add_dictionary,
                  "fires-corpus": self.action_find_fires}.get(event.input.id or "")
        if action is not None:
            action()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        action = {"generate": self.action_generate, "stop": self.action_cancel, "model-load": self.action_load,
                  "regenerate": self.action_regenerate, "step-open": self.action_open_sequences,
                  "export": self.action_export, "dict-add": self.action_add_dictionary,
                  "fires-find": self.action_find_fires}.get(event.button.id or "")
        if action is not None:
            action()

    @on(Checkbox.Changed, "#fires-all")
    def _fires_scope_changed(self, event: Checkbox.Changed) -> None:
        if self.chosen_chunk_id is not None:
            self.action_find_fires(quiet=True)

    def on_trace_view_cursor_moved(self, event: TraceView.CursorMoved) -> None:
        self.current_trace = event.view.trace or self.current_trace


def make_app(options: AppOptions | None = None, **fields) -> ChunkApp:
    """The app as users get it (the CLI, the benchmark and the tests call this): `AppOptions.for_users`.

    Pass an `AppOptions`, or its fields as keywords; tests pass a tiny model, their own dictionary folder,
    show_timing=False and engine_mode="thread".
    """
    if options is None:
        options = AppOptions.for_users(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    return ChunkApp(options)
