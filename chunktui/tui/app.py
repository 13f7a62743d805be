"""The chunktui terminal app: Model, Stream, Chunks, Perturb, Step and Export panes.

All model work runs in thread workers; the UI thread only renders. A
generation worker compacts each token (`session.step_from_event`) and drops it
in a buffer; a 20 Hz timer drains the buffer and redraws once, so the screen
updates at a steady rate however fast tokens come. Failures in workers come
back as `TaskFailed` messages and become notifications; the app carries on.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Input, OptionList, Static, TabbedContent, TabPane

from chunktui.engine.build import read_sequences
from chunktui.engine.errors import ChunkError, DictionaryError
from chunktui.engine.session import ChunkColumns, Session, Trace, step_from_event, steps_from_scan
from chunktui.tui import messages as m
from chunktui.tui.colours import label_colours
from chunktui.tui.panes.chunks_pane import ChunksPane
from chunktui.tui.panes.export_pane import ExportPane
from chunktui.tui.panes.model_pane import ModelPane
from chunktui.tui.panes.perturb_pane import PerturbPane
from chunktui.tui.panes.step_pane import StepPane
from chunktui.tui.panes.stream_pane import StreamPane
from chunktui.tui.widgets.trace_view import TraceView

PANES = [("model", "Model", "f1"), ("stream", "Stream", "f2"), ("chunks", "Chunks", "f3"), ("perturb", "Perturb", "f4"),
         ("step", "Step", "f5"), ("export", "Export", "f6")]
FRAME_RATE = 20  # redraws per second while tokens stream


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except Exception:
            return None


class ChunkApp(App):
    """Stream a model's hidden states, see its chunks, graft them, step through texts, export."""

    CSS_PATH = "app.tcss"
    TITLE = "chunktui"
    BINDINGS = [Binding(key, f"pane('{pane}')", title) for pane, title, key in PANES] + [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+g", "generate", "Generate", show=False),
        Binding("ctrl+r", "regenerate", "Regenerate", show=False),
        Binding("ctrl+e", "export", "Export", show=False),
    ]

    def __init__(self, model_spec: str = "smollm2-135m", dict_path: str | None = None, device: str = "auto",
                 dtype: str = "auto", dict_dirs: Iterable[str | Path] | None = None,
                 sequences_path: str | None = None, show_timing: bool = True, autoload: bool = True) -> None:
        super().__init__()
        self.model_spec, self.device, self.dtype = model_spec, device, dtype
        self.dict_path = str(dict_path) if dict_path else None
        self.dict_dirs = [Path(d) for d in dict_dirs] if dict_dirs is not None else []
        self.extra_dicts: list[str] = []
        self.sequences_path = sequences_path or ""
        self.show_timing = show_timing
        self.autoload = autoload
        self.loaded = None
        self.dictionary = None
        self.packed = None
        self.colours: dict[str, str] = {}
        self.session = Session()
        self.stream_trace: Trace | None = None
        self.step_trace: Trace | None = None
        self.current_trace: Trace | None = None
        self.chosen_chunk_id: str | None = None
        # generation: the worker appends compacted steps; the UI timer drains them
        self._pending: list = []
        self._pending_lock = threading.Lock()
        self._cancel: threading.Event | None = None
        self._busy: str | None = None  # "load", "generate", "perturb", "scan"
        self._gen_started = 0.0
        self._gen_tokens = 0
        self.frames = 0  # redraws caused by new tokens (the benchmark reads these)
        self.frame_times: list[float] = []
        self.tokens_per_second: float | None = None

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="stream"):
            with TabPane("F1 Model", id="model"):
                yield ModelPane(self.model_spec, self.device, self.dtype)
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
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1 / FRAME_RATE, self._drain)
        self.update_status()
        self.query_one("#prompt", Input).focus()
        if self.sequences_path and Path(self.sequences_path).is_file():
            self.action_open_sequences(quiet=True)
        if self.autoload:
            self.action_load()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Load model", "Load the model named in the Model pane", self.action_load)
        yield SystemCommand("Generate", "Stream a continuation of the prompt (Stream pane)", self.action_generate)
        yield SystemCommand("Stop", "Cancel the running generation or comparison", self.action_cancel)
        yield SystemCommand("Regenerate with perturbation", "Run control and perturbed arms (Perturb pane)",
                            self.action_regenerate)
        yield SystemCommand("Open sequences", "Open the file in the Step pane", self.action_open_sequences)
        yield SystemCommand("Export session", "Write the session in the Export pane's format", self.action_export)
        for pane, title, key in PANES:
            yield SystemCommand(f"Go to {title}", f"Show the {title} pane ({key.upper()})",
                                lambda pane=pane: self.action_pane(pane))

    # ------------------------------------------------------------------ helpers

    def fail(self, text: str, title: str = "Error", severity: str = "error") -> None:
        self.notify(text, title=title, severity=severity, timeout=8)

    def update_status(self) -> None:
        parts = []
        if self.loaded is None:
            parts.append("no model" if self._busy != "load" else "loading model…")
        else:
            parts.append(f"{self.loaded.name} on {self.loaded.device}")
        if self.dictionary is not None:
            name = (Path(self.dictionary.path).name.replace(".chunks.safetensors", "") if self.dictionary.path
                    else getattr(self.dictionary, "name", "dict"))
            parts.append(f"dict {name} "
                         f"({len(self.dictionary.chunks)} chunks)")
        else:
            parts.append("no dictionary")
        if self._busy:
            parts.append(f"{self._busy}… (Esc cancels)")
        if self.show_timing:
            if self.tokens_per_second is not None:
                parts.append(f"{self.tokens_per_second:.1f} tok/s")
            rss = _rss_mb()
            if rss is not None:
                parts.append(f"mem {rss:.0f} MB")
            if self.loaded is not None and self.loaded.device.type == "cuda":
                import torch

                parts.append(f"gpu {torch.cuda.memory_allocated(self.loaded.device) / 2**20:.0f} MB")
        else:
            parts.append("tok/s —  mem —")
        self.query_one("#status", Static).update("  ·  ".join(parts))

    def _set_busy(self, what: str | None) -> None:
        self._busy = what
        stream = self.query_one(StreamPane)
        stream.set_running(what == "generate")
        self.query_one("#regenerate", Button).disabled = what == "perturb"
        self.update_status()

    def _need_model(self) -> bool:
        if self.loaded is None:
            self.fail("Load a model first (F1, Load).", title="No model", severity="warning")
            return False
        return True

    def _need_idle(self) -> bool:
        if self._busy:
            self.fail(f"Busy: {self._busy} is running. Press Esc to cancel it first.", title="Busy",
                      severity="warning")
            return False
        return True

    # ------------------------------------------------------------------ actions

    def action_pane(self, pane: str) -> None:
        self.query_one(TabbedContent).active = pane
        self._focus_pane(pane)

    def _focus_pane(self, pane: str) -> None:
        focus = {"model": "#model-spec", "stream": "#stream-trace" if self.stream_trace else "#prompt",
                 "chunks": "#chunk-table", "perturb": "#perturb-chunks",
                 "step": "#step-trace" if self.step_trace else "#step-list", "export": "#export-path"}[pane]
        self.query_one(focus).focus()
        if pane == "chunks":
            self._show_chunk_focus()
        if pane == "export":
            self.query_one(ExportPane).show_summary(self.session)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = event.pane.id
        if pane == "chunks":
            self._show_chunk_focus()
        elif pane == "export":
            self.query_one(ExportPane).show_summary(self.session)

    def action_cancel(self) -> None:
        if self._cancel is not None and self._busy in ("generate", "perturb"):
            self._cancel.set()
            self.notify(f"Cancelling {self._busy}…", timeout=3)
        elif self._busy == "load":
            self.workers.cancel_group(self, "load")
            self._set_busy(None)
            self.notify("Stopped waiting for the model; it will be ignored when it arrives.", timeout=4)

    # ---- model and dictionaries

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
        self._set_busy("load")
        self.query_one(ModelPane).show_progress("resolve", 0.0, spec)
        self._load_worker(spec, device, dtype)

    @work(thread=True, exclusive=True, group="load")
    def _load_worker(self, spec: str, device: str, dtype: str) -> None:
        from textual.worker import get_current_worker

        from chunktui.engine.models import load_model
        from chunktui.rnn.backend import is_rnn_spec, load_rnn

        worker = get_current_worker()
        progress = lambda s, f, t: self.post_message(m.LoadProgress(s, f, t))  # noqa: E731
        try:
            if is_rnn_spec(spec):  # the reflection RNN: trained here in seconds, DSC chunks as its dictionary
                loaded = load_rnn(spec, progress=progress)
            else:
                loaded = load_model(spec, device, dtype, progress=progress)
        except ChunkError as err:
            self.post_message(m.TaskFailed("Model not loaded", str(err)))
            return
        except Exception as err:  # anything else: say so, keep the app alive
            self.post_message(m.TaskFailed("Model not loaded", f"{type(err).__name__}: {err}"))
            return
        if not worker.is_cancelled:
            self.post_message(m.ModelLoaded(loaded))

    def on_load_progress(self, message: m.LoadProgress) -> None:
        text = message.text if self.show_timing or message.stage != "done" else "loaded"  # no timings in tests
        self.query_one(ModelPane).show_progress(message.stage, message.fraction, text)

    def on_model_loaded(self, message: m.ModelLoaded) -> None:
        self.loaded = message.loaded
        self.session.model = self.loaded.card()
        self.query_one(ModelPane).show_card(self.session.model, self.show_timing)
        self._set_busy(None)
        self.notify(f"Loaded {self.loaded.name} ({self.loaded.n_layers} layers, width {self.loaded.hidden_size}).",
                    timeout=3)
        self.dictionary, self.packed = None, None
        if self._is_rnn():
            from chunktui.tui.panes.stream_pane import DEFAULT_PROMPT

            prompt, temp = self.query_one("#prompt", Input), self.query_one("#stream-temp", Input)
            if prompt.value == DEFAULT_PROMPT:
                prompt.value = "ABCDEEGHI"  # symbols of the task; greedy decoding would only repeat the filler
            if float(temp.value or 0) == 0:
                temp.value = "1.0"
            self.use_dictionary(self.loaded.dictionary)
            self.query_one(ModelPane).show_dictionaries(
                [("DSC chunks of the RNN's reference run", None, self.loaded.dictionary)], None)
            return
        self._list_dictionaries(select=self.dict_path)

    def _is_rnn(self) -> bool:
        return getattr(self.loaded, "kind", "lm") == "rnn"

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

    @work(thread=True, exclusive=True, group="dicts")
    def _list_dictionaries(self, select: str | None) -> None:
        from chunktui.engine.dictionary import load_dictionary

        loaded = self.loaded
        if loaded is None:
            return
        identity = loaded.identity()
        entries = []
        for path in self.dictionary_candidates():
            if not Path(path).is_file():
                entries.append((path, "file not found", None))
                continue
            try:
                dictionary = load_dictionary(path)
            except DictionaryError as err:
                entries.append((path, str(err), None))
                continue
            except Exception as err:
                entries.append((path, f"unreadable ({type(err).__name__}: {err})", None))
                continue
            entries.append((path, dictionary.compatibility_problem(identity), dictionary))
        self.post_message(m.DictionariesListed(entries, select))

    def on_dictionaries_listed(self, message: m.DictionariesListed) -> None:
        pane = self.query_one(ModelPane)
        entries = message.entries
        chosen = None
        if message.select:
            for path, problem, dictionary in entries:
                if Path(path) == Path(message.select):
                    if problem is None:
                        chosen = dictionary
                    else:
                        self.fail(f"{Path(path).name}: {problem}. Pick another dictionary in the Model pane (F1).",
                                  title="Dictionary not usable", severity="warning")
        if chosen is None and message.select is None and self.dictionary is None:
            chosen = next((d for _, p, d in entries if p is None), None)
        if chosen is not None:
            self.use_dictionary(chosen)
        elif self.dictionary is None and not any(p is None for _, p, _ in entries):
            self.fail("No dictionary fits this model, so tokens are not coloured. Build one with `chunktui build`, "
                      "then add it in the Model pane (F1).", title="No dictionary", severity="warning")
        pane.show_dictionaries(entries, str(self.dictionary.path) if self.dictionary is not None else None)

    def use_dictionary(self, dictionary) -> None:
        from chunktui.engine.matching import pack

        loaded = self.loaded
        self.dictionary = dictionary
        if self._is_rnn():  # DSC chunks are matched by the RNN backend; the dictionary stands as the pack
            self.packed = dictionary
        else:
            self.packed = pack(dictionary.chunks, loaded.hidden_size, loaded.layout.n_states, loaded.device)
        self.colours = label_colours(dictionary.labels())
        self.session.dictionary = str(dictionary.path) if dictionary.path else None
        self.session.labels = dictionary.labels()
        self.query_one(ChunksPane).set_chunks(dictionary.chunks)
        self.query_one(PerturbPane).set_labels(dictionary.labels())
        self.query_one(StepPane).set_labels(dictionary.labels())
        self.chosen_chunk_id = None
        self.update_status()

    @on(OptionList.OptionSelected, "#dict-list")
    def _dict_chosen(self, event: OptionList.OptionSelected) -> None:
        path, problem, dictionary = self.query_one(ModelPane).entries[int(event.option.id)]
        if problem is None and dictionary is not None:
            self.use_dictionary(dictionary)
            self.query_one(ModelPane).show_dictionaries(self.query_one(ModelPane).entries, path)
            self.notify(f"Using {Path(path).name}.", timeout=3)

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
        if self._is_rnn():
            self.fail("An RNN uses the DSC chunks learned when it was loaded; chunk dictionaries are for language "
                      "models.", title="Not for the RNN", severity="warning")
            return
        self.extra_dicts.append(str(Path(path).expanduser()))
        field.value = ""
        self._list_dictionaries(select=str(Path(path).expanduser()))

    # ---- stream

    def action_generate(self) -> None:
        if not self._need_model() or not self._need_idle():
            return
        try:
            prompt, sampling, chat = self.query_one(StreamPane).request()
        except ChunkError as err:
            self.fail(str(err), title="Cannot generate")
            return
        if self.packed is None:
            self.notify("No dictionary in use: tokens will not be coloured.", severity="warning", timeout=4)
        trace = Trace("stream", prompt, ChunkColumns.from_pack(self.packed),
                      settings=dict(sampling.describe(), chat=chat))
        self.stream_trace = self.current_trace = trace
        view = self.query_one("#stream-trace", TraceView)
        view.set_trace(trace, self.colours, self.loaded.layout.n_states)
        view.focus()
        with self._pending_lock:
            self._pending = []
        self._cancel = threading.Event()
        self._gen_started, self._gen_tokens = time.perf_counter(), 0
        self.frames, self.frame_times, self.tokens_per_second = 0, [], None
        self._set_busy("generate")
        self._generate_worker(trace, prompt, sampling, chat, self._cancel)

    @work(thread=True, exclusive=True, group="generate")
    def _generate_worker(self, trace: Trace, prompt: str, sampling, chat: bool, cancel: threading.Event) -> None:
        from chunktui.engine.streaming import generate_stream
        from chunktui.rnn.backend import rnn_stream

        reason = None
        try:
            if self._is_rnn():
                events = rnn_stream(self.loaded, prompt, sampling, cancel=cancel)
            else:
                events = generate_stream(self.loaded, prompt, sampling, packed=self.packed, cancel=cancel, chat=chat)
            for event in events:
                step = step_from_event(event)  # copy to CPU and compact here, off the UI thread
                with self._pending_lock:
                    self._pending.append(step)
                reason = event.finished or reason
        except ChunkError as err:
            self.post_message(m.TaskFailed("Generation failed", str(err)))
            reason = "failed"
        except Exception as err:
            self.post_message(m.TaskFailed("Generation failed", f"{type(err).__name__}: {err}"))
            reason = "failed"
        if reason is None and cancel.is_set():
            reason = "cancelled"
        self.post_message(m.TraceFinished(trace, reason or "length"))

    def _drain(self) -> None:
        """Timer: move buffered tokens into the trace and redraw once (coalesced)."""
        with self._pending_lock:
            steps, self._pending = self._pending, []
        if not steps or self.stream_trace is None:
            return
        self.stream_trace.extend(steps)
        generated = sum(s.generated for s in steps)
        self._gen_tokens += generated
        elapsed = time.perf_counter() - self._gen_started
        if self._gen_tokens and elapsed > 0:
            self.tokens_per_second = self._gen_tokens / elapsed
        self.query_one("#stream-trace", TraceView).grew()
        self.frames += 1
        self.frame_times.append(time.perf_counter())
        self.update_status()

    def on_trace_finished(self, message: m.TraceFinished) -> None:
        trace = message.trace
        if trace.kind == "stream":
            self._drain()
            if self._is_rnn() and len(trace):
                from chunktui.rnn.backend import relabel

                relabel(self.loaded, trace.steps)  # the full parse, now that the run is complete (ms)
                trace._score_cache = None
            trace.finished = message.reason
            trace.elapsed = time.perf_counter() - self._gen_started
            if len(trace):
                self.session.add_trace(trace)
            self._set_busy(None)
            self.query_one("#stream-trace", TraceView).grew()
            if message.reason == "cancelled":
                self.notify(f"Generation cancelled after {trace.n_generated} tokens.", severity="warning", timeout=4)
        else:
            self.step_trace = self.current_trace = trace
            self.session.add_trace(trace)
            self._set_busy(None)
            view = self.query_one("#step-trace", TraceView)
            view.set_trace(trace, self.colours, self.loaded.layout.n_states)
            view.cursor, view.follow = 0, False
            view.redraw()
            view.focus()

    def on_task_failed(self, message: m.TaskFailed) -> None:
        if self._busy == "load":
            self.query_one(ModelPane).show_progress("failed", 0.0, message.title)
        if self._busy in ("load", "perturb", "scan"):
            self._set_busy(None)
        self.fail(message.text, title=message.title, severity=message.severity)

    # ---- chunks

    @on(DataTable.RowSelected, "#chunk-table")
    def _chunk_chosen(self, event: DataTable.RowSelected) -> None:
        self.chosen_chunk_id = str(event.row_key.value)
        chunk = self.dictionary.by_id(self.chosen_chunk_id) if self.dictionary else None
        if chunk is not None:
            for view in self.query(TraceView):
                view.jump_label = chunk.label
                view.redraw()
        self._show_chunk_focus()

    def _show_chunk_focus(self) -> None:
        pane = self.query_one(ChunksPane)
        chunk = None
        if self.dictionary is not None and self.chosen_chunk_id:
            try:
                chunk = self.dictionary.by_id(self.chosen_chunk_id)
            except KeyError:
                chunk = None
        trace = self.current_trace
        column = None
        if trace is not None and chunk is not None and chunk.id in trace.columns.ids:
            column = trace.columns.ids.index(chunk.id)
        pane.show_focus(trace, self.colours, column, chunk)

    # ---- perturb

    def action_regenerate(self) -> None:
        if not self._need_model() or not self._need_idle():
            return
        if self._is_rnn():
            self.fail("The perturbation panel steers language models. For the RNN, graft a chunk's state with "
                      "`chunktui rnn graft` (and `chunktui rnn transfer`).", title="Not for the RNN",
                      severity="warning")
            return
        if self.dictionary is None:
            self.fail("Perturbing needs a dictionary: pick one in the Model pane (F1).", title="No dictionary")
            return
        from chunktui.engine.hidden import parse_layers
        from chunktui.engine.perturb import Intervention, select_chunks

        try:
            req = self.query_one(PerturbPane).request()
            layers = parse_layers(req["layers"], self.loaded.layout.n_states)
            chunks = select_chunks(self.dictionary, req["names"], layers)
            intervention = Intervention(chunks=chunks, mode=req["mode"], strength=req["strength"],
                                        positions=req["positions"], layer_means=self.dictionary.layer_means)
        except ChunkError as err:
            self.fail(str(err), title="Cannot perturb")
            return
        self._cancel = threading.Event()
        self._set_busy("perturb")
        self.query_one("#perturb-summary", Static).update("running the control and perturbed arms…")
        self._perturb_worker(intervention, req["prompt"], req["sampling"], req["chat"], self._cancel)

    @work(thread=True, exclusive=True, group="perturb")
    def _perturb_worker(self, intervention, prompt: str, sampling, chat: bool, cancel: threading.Event) -> None:
        from chunktui.engine.perturb import compare

        try:
            report = compare(self.loaded, intervention, [prompt], samples=1, sampling=sampling, chat=chat,
                             batch_size=1, cancel=cancel)
        except ChunkError as err:
            self.post_message(m.TaskFailed("Perturbation failed", str(err)))
            return
        except Exception as err:
            self.post_message(m.TaskFailed("Perturbation failed", f"{type(err).__name__}: {err}"))
            return
        if cancel.is_set():
            self.post_message(m.TaskFailed("Perturbation cancelled", "The run was cancelled; nothing was recorded.",
                                           severity="warning"))
            return
        run = dict(report.to_json(), prompt=prompt, model=self.loaded.name)
        self.post_message(m.RunFinished(run))

    def on_run_finished(self, message: m.RunFinished) -> None:
        self.session.add_run(message.run)
        self._set_busy(None)
        self.query_one(PerturbPane).add_run(message.run)

    # ---- step

    def action_open_sequences(self, quiet: bool = False) -> None:
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
            self.notify(f"{len(sequences)} sequences from {Path(path).name}. Choose one (Enter).", timeout=3)
            self.query_one("#step-list").focus()

    @on(OptionList.OptionSelected, "#step-list")
    def _sequence_chosen(self, event: OptionList.OptionSelected) -> None:
        if not self._need_model() or not self._need_idle():
            return
        name, text = self.query_one(StepPane).sequences[int(event.option.id)]
        self._set_busy("scan")
        self._scan_worker(name, text)

    @work(thread=True, exclusive=True, group="scan")
    def _scan_worker(self, name: str, text: str) -> None:
        from chunktui.engine.streaming import scan_text
        from chunktui.rnn.backend import rnn_scan

        try:
            result = rnn_scan(self.loaded, text) if self._is_rnn() else scan_text(self.loaded, text, self.packed)
            trace = Trace("scan", name, ChunkColumns.from_pack(self.packed))
            trace.extend(steps_from_scan(result))
            trace.finished = "scanned"
        except ChunkError as err:
            self.post_message(m.TaskFailed("Scan failed", str(err)))
            return
        except Exception as err:
            self.post_message(m.TaskFailed("Scan failed", f"{type(err).__name__}: {err}"))
            return
        self.post_message(m.TraceFinished(trace, "scanned"))

    # ---- export

    def action_export(self) -> None:
        from chunktui.engine.reports import write_report

        pane = self.query_one(ExportPane)
        fmt, path = pane.request()
        if not path:
            self.fail("Give a file name to export to.", title="No file")
            return
        if self.session.is_empty():
            self.notify("The session is empty; the report will only describe the model.", severity="warning",
                        timeout=4)
        try:
            written = write_report(self.session.to_json(), fmt, path)
        except ChunkError as err:
            pane.show_result(str(err), ok=False)
            self.fail(str(err), title="Export failed")
            return
        pane.show_result(f"wrote {written} ({fmt})", ok=True)
        pane.show_summary(self.session)
        self.notify(f"Wrote {written}", title="Exported", timeout=4)

    # ------------------------------------------------------------------ events

    def on_input_submitted(self, event: Input.Submitted) -> None:
        action = {"prompt": self.action_generate, "perturb-prompt": self.action_regenerate,
                  "model-spec": self.action_load, "step-path": self.action_open_sequences,
                  "export-path": self.action_export, "dict-path": self.action_add_dictionary}.get(event.input.id or "")
        if action is not None:
            action()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        action = {"generate": self.action_generate, "stop": self.action_cancel, "model-load": self.action_load,
                  "regenerate": self.action_regenerate, "step-open": self.action_open_sequences,
                  "export": self.action_export, "dict-add": self.action_add_dictionary}.get(event.button.id or "")
        if action is not None:
            action()

    def on_trace_view_cursor_moved(self, event: TraceView.CursorMoved) -> None:
        self.current_trace = event.view.trace or self.current_trace


def make_app(model_spec: str | None = None, dict_path: str | None = None, device: str = "auto", dtype: str = "auto",
             dict_dirs: Iterable[str | Path] | None = None, sequences_path: str | None = None,
             show_timing: bool = True, autoload: bool = True, threads: int | None = None) -> ChunkApp:
    """The app as users get it; tests pass a tiny model, their own dictionary folder and show_timing=False.

    Defaults: the built-in model, the sample dictionary, the sample sequences, and every
    `*.chunks.safetensors` in sample_data/ and the working folder offered in the dictionary picker.
    """
    from chunktui.paths import DEFAULT_DICT_NAME, sample_path
    from chunktui.engine.models import DEFAULT_MODEL

    if threads:
        import torch

        torch.set_num_threads(threads)
    if dict_dirs is None:
        dict_dirs = [sample_path(DEFAULT_DICT_NAME).parent, Path.cwd()]
    if dict_path is None:
        dict_path = str(sample_path(DEFAULT_DICT_NAME))
    if sequences_path is None:
        rnn = (model_spec or "").strip().lower().startswith("rnn:")
        sequences_path = str(sample_path("rnn_sequences.txt" if rnn else "sequences.jsonl"))
    return ChunkApp(model_spec=model_spec or DEFAULT_MODEL, dict_path=dict_path, device=device, dtype=dtype,
                    dict_dirs=dict_dirs, sequences_path=sequences_path, show_timing=show_timing, autoload=autoload)
