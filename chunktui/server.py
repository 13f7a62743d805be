"""The engine process: the model, the dictionary and every torch call, behind the pipe protocol.

The app spawns `child_main` in a fresh interpreter (multiprocessing "spawn"),
so the UI process never imports torch and the model gets the cores. Requests
arrive on the pipe (`shared.protocol`); a receiver loop answers short ones at
once (cancel, token detail, chunk scores) and queues long ones (load,
generate, scan, compare) for one work thread, which streams events back.

Started as `python -m chunktui.server --fd N [--threads T]`, where N is
the child's end of a socket pair (its stdout and stderr go to the app's log).
This module imports nothing heavy at the top.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback

from chunktui.shared import protocol as p
from chunktui.shared.dispatch import Handlers

# Requests answered by the reading loop at once, and long requests run one at a time by the worker thread.
ANSWERED_AT_ONCE = Handlers("the engine's reader")
JOBS = Handlers("the engine's worker")

TITLES = {p.Load: "Model not loaded", p.Generate: "Generation failed", p.Scan: "Scan failed",
          p.Compare: "Perturbation failed", p.UseDictionary: "Dictionary not usable",
          p.ListDictionaries: "Dictionaries", p.BenchStream: "Benchmark failed", p.TopContexts: "Search failed"}
TASKS = {p.Load: "load", p.Generate: "generate", p.Scan: "scan", p.Compare: "perturb", p.UseDictionary: "dictionary",
         p.ListDictionaries: "dictionary", p.BenchStream: "bench", p.TopContexts: "top"}


def child_main(conn, threads: int | None = None, in_thread: bool = False) -> None:
    """Entry point of the engine process (or of an engine thread, for tests)."""
    if not in_thread:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C belongs to the app; cancel comes as a request
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Server(conn, threads).run()


class Server:
    def __init__(self, conn, threads: int | None = None) -> None:
        self.conn = conn
        self.threads = threads
        self.send_lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        # a Cancel cancels every job sent before it, including one still waiting in the queue: jobs are numbered
        # as they arrive, and the worker starts a job at or below `cancelled_upto` already cancelled
        self.received = 0
        self.cancelled_upto = 0
        self.engine = None
        # trace id -> (columns, [value rows (C,)], [score rows (C,)]): what token detail and chunk plots read
        self.store: dict[int, tuple] = {}
        self.store_lock = threading.Lock()
        self.top = None  # (corpus key, engine.top.TopTables) of the last corpus searched with this dictionary

    def send(self, event) -> None:
        with self.send_lock:
            try:
                self.conn.send(event)
            except (BrokenPipeError, EOFError, OSError):
                pass  # the app is gone; the receiver loop ends too

    # ------------------------------------------------------------------ loops

    def run(self) -> None:
        self.send(p.Progress("engine", 0.02, "starting the engine process (importing torch)"))
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        from chunktui.shared.specs import catalog

        self.send(p.Ready(pid=os.getpid(), threads=torch.get_num_threads(), catalog=catalog()))
        worker = threading.Thread(target=self._work, name="chunktui-engine-work", daemon=True)
        worker.start()
        while True:
            try:
                request = self.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(request, p.Shutdown):
                break
            if ANSWERED_AT_ONCE.handles(request):  # cancel and the small questions never wait behind a job
                ANSWERED_AT_ONCE.dispatch(self, request)
            else:
                self.received += 1
                self.jobs.put((self.received, request))
        self.cancel.set()
        self.jobs.put(None)
        worker.join(timeout=5)  # a running job stops within one token

    def _work(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            number, request = item
            if number <= self.cancelled_upto:  # cancelled before it started: it stops at its first check
                self.cancel.set()
            else:
                self.cancel.clear()
            name = type(request).__name__
            try:
                JOBS.dispatch(self, request)
            except Exception as err:  # every failure: one message for the user, the traceback for the log
                from chunktui.shared.errors import ChunkError

                text = str(err) if isinstance(err, ChunkError) else f"{type(err).__name__}: {err}"
                self.send(p.Failed(TITLES.get(type(request), "Engine error"), text, task=TASKS.get(type(request)),
                                   traceback=None if isinstance(err, ChunkError) else traceback.format_exc()))
                if isinstance(request, (p.Generate, p.Scan)):
                    self.send(p.TraceDone(request.trace_id, "failed", 0.0))
            finally:
                self.send(p.JobDone(name))

    # ------------------------------------------------------------------ long requests

    @JOBS(p.Load)
    def _do_load(self, req: p.Load) -> None:
        from chunktui.api import Engine

        self.engine = None
        with self.store_lock:
            self.store.clear()
        engine = Engine.load(req.spec, device=req.device, dtype=req.dtype, device_map=req.device_map,
                             max_memory=req.max_memory, offload_folder=req.offload_folder, offline=req.offline,
                             progress=lambda stage, fraction, text: self.send(p.Progress(stage, fraction, text)))
        self.engine = engine
        suggested_prompt, suggested_temperature = engine.backend.suggestions()
        self.send(p.Loaded(card=engine.card(), kind=engine.kind, n_states=engine.n_states,
                           can_perturb=engine.backend.can_perturb, suggested_prompt=suggested_prompt,
                           suggested_temperature=suggested_temperature))
        self._memory(0)
        if engine.dictionary is not None:  # the RNN brings its own (DSC chunks)
            d = engine.dictionary
            self._announce_dictionary()
            self.send(p.DictionariesListed([p.DictionaryEntry("DSC chunks of the RNN's reference run", None,
                                                              len(d.chunks), len(d.labels()))], None))
            return
        self._list(req.candidates, req.dict_path, auto=True)

    @JOBS(p.ListDictionaries)
    def _do_listdictionaries(self, req: p.ListDictionaries) -> None:
        if self._need_model():
            self._list(req.candidates, req.select, auto=False)

    def _list(self, candidates: list[str], select: str | None, auto: bool) -> None:
        from pathlib import Path

        engine = self.engine
        entries, usable = [], {}
        # the dictionary that will be used is read in full (tensors validated); once it is found, the others are
        # listed from their headers alone (model, labels, count: milliseconds, not a load each before the first
        # token) and read in full when picked (UseDictionary)
        wanted = None if select is None else Path(select)
        settled = False
        for path in candidates:
            full = not settled and (wanted is None or Path(path) == wanted)
            dictionary, problem = engine.check_dictionary(path, header_only=not full)
            n_chunks = len(dictionary.chunks) if dictionary is not None else 0
            n_labels = len(dictionary.labels()) if dictionary is not None else 0
            entries.append(p.DictionaryEntry(path, problem, n_chunks, n_labels))
            if problem is None:
                usable[path] = dictionary
                settled = settled or full and (wanted is not None or (auto and engine.dictionary is None))
        chosen = None
        if select is not None:
            match = next((e for e in entries if Path(e.path) == Path(select)), None)
            if match is not None and match.problem is None:
                chosen = match.path
            elif match is not None:
                self.send(p.Failed("Dictionary not usable", f"{Path(match.path).name}: {match.problem}. "
                                   "Pick another dictionary in the Model pane (F1).", severity="warning",
                                   task="dictionary"))
        if chosen is None and auto and engine.dictionary is None:
            chosen = next(iter(usable), None)
        if chosen is not None:
            from chunktui.engine.dictionary import DictionaryHeader
            from chunktui.shared.errors import ChunkError

            found = usable[chosen]
            try:
                engine.use_dictionary(chosen if isinstance(found, DictionaryHeader) else found)
            except ChunkError as err:  # its header was fine, its tensors are not: say so, use none
                self.send(p.Failed("Dictionary not usable", f"{Path(chosen).name}: {err}", severity="warning",
                                   task="dictionary"))
                entries = [p.DictionaryEntry(e.path, str(err), e.chunks, e.concepts) if e.path == chosen else e
                           for e in entries]
                chosen = None
        elif engine.dictionary is None and not usable:
            self.send(p.Failed("No dictionary", "No dictionary fits this model, so tokens are not coloured. Build "
                               "one with `chunktui build`, then add it in the Model pane (F1).", severity="warning",
                               task="dictionary"))
        if chosen is not None:
            self._announce_dictionary()
        self.send(p.DictionariesListed(entries, str(engine.dictionary.path) if engine.dictionary is not None
                                       and engine.dictionary.path else None))

    @JOBS(p.UseDictionary)
    def _do_usedictionary(self, req: p.UseDictionary) -> None:
        if self._need_model():
            self.engine.use_dictionary(req.path)
            self._announce_dictionary()

    def _announce_dictionary(self) -> None:
        self.top = None  # searched with another dictionary
        from pathlib import Path

        d = self.engine.dictionary
        path = str(d.path) if getattr(d, "path", None) else None
        name = Path(path).name.replace(".chunks.safetensors", "") if path else getattr(d, "name", "dictionary")
        self.send(p.DictionaryInUse(path=path, name=name, labels=d.labels(), chunks=[_chunk_info(c) for c in d.chunks],
                                    columns=self.engine.columns()))

    def _need_model(self) -> bool:
        if self.engine is None:
            self.send(p.Failed("No model", "Load a model first (F1, Load).", severity="warning"))
            return False
        return True

    @JOBS(p.Generate)
    def _do_generate(self, req: p.Generate) -> None:
        from chunktui.engine.steps import event_rows

        if not self._need_model():
            self.send(p.TraceDone(req.trace_id, "failed", 0.0))
            return
        engine = self.engine
        columns = engine.columns()
        values, scores, steps = [], [], []
        with self.store_lock:
            self.store[req.trace_id] = (columns, values, scores)
        self.send(p.TraceStarted(req.trace_id, columns))
        start, reason = time.perf_counter(), None
        rules = engine.rules(list(req.rules)) if req.rules else None  # a bad rule fails here, before any token
        for event in engine.stream(req.prompt, sampling=req.sampling, chat=req.chat, cancel=self.cancel,
                                   rules=rules):
            step, value, score = event_rows(event)
            with self.store_lock:
                values.append(value)
                scores.append(score)
            steps.append(step)
            self.send(p.Tokens(req.trace_id, [step]))
            reason = event.finished or reason
            if len(steps) % 64 == 0:
                self._memory(len(steps))
        if reason is None and self.cancel.is_set():
            reason = "cancelled"
        revised = engine.backend.revise(steps) if steps else None
        self.send(p.TraceDone(req.trace_id, reason or "length", time.perf_counter() - start, steps=revised))
        self._memory(len(steps))

    def _memory(self, kv_tokens: int) -> None:
        """Device memory now: weights, the KV cache of `kv_tokens` tokens, and the per-token values kept here."""
        rows = self.engine.memory(kv_tokens=kv_tokens) if self.engine is not None else []
        with self.store_lock:
            # deviation and score rows, (C,) float32 each, per token held: no walk over the tokens
            kept = sum(2 * len(values) * values[0].numel() * values[0].element_size()
                       for _, values, _ in self.store.values() if values)
        if rows:
            host = next((r for r in rows if r["device"] == "cpu"), None)
            if host is None:
                host = {"device": "cpu", "weights": 0, "kv_cache": 0, "states": 0, "free": None, "total": None,
                        "peak": None, "used": 0}
                rows.append(host)
            host["states"] += kept  # deviations and scores per token and chunk (token detail, chunk plots)
            host["used"] += kept
        self.send(p.Memory(rows, kv_tokens))

    @JOBS(p.Scan)
    def _do_scan(self, req: p.Scan) -> None:
        from chunktui.engine.steps import scan_rows

        if not self._need_model():
            self.send(p.TraceDone(req.trace_id, "failed", 0.0))
            return
        start = time.perf_counter()
        steps, value, score = scan_rows(self.engine.scan(req.text))
        columns = self.engine.columns()
        with self.store_lock:
            self.store[req.trace_id] = (columns, list(value.unbind(0)), list(score.unbind(0)))
        self.send(p.TraceDone(req.trace_id, "scanned", time.perf_counter() - start, steps=steps, columns=columns))

    @JOBS(p.Compare)
    def _do_compare(self, req: p.Compare) -> None:
        if not self._need_model():
            return
        last = ["", -1.0]

        def progress(stage: str, fraction: float | None, text: str) -> None:
            # a new message always goes; the same message again only when it moved on by 5% (decoding steps)
            if text != last[0] or fraction is None or fraction - last[1] >= 0.05:
                last[:] = [text, fraction if fraction is not None else -1.0]
                self.send(p.Progress(stage, fraction, text, task="perturb"))

        # the samples of one prompt decode as one batch (they share the prompt: no padding)
        report = self.engine.compare(req.names, [req.prompt], mode=req.mode, strength=req.strength,
                                     layers=req.layers, positions=req.positions, samples=req.samples,
                                     sampling=req.sampling, chat=req.chat, batch_size=min(req.samples, 16),
                                     cancel=self.cancel, progress=progress, control=req.control,
                                     control_seed=req.control_seed, sweep=req.sweep, site=req.site,
                                     layer_diff=True)
        if self.cancel.is_set():
            self.send(p.Failed("Perturbation cancelled", "The run was cancelled; nothing was recorded.",
                               severity="warning", task="perturb"))
            return
        self.send(p.RunDone(dict(report.to_json(), prompt=req.prompt, model=self.engine.loaded.name)))

    @JOBS(p.TopContexts)
    def _do_topcontexts(self, req: p.TopContexts) -> None:
        """Where a chunk fires in a corpus; the first search of a corpus fills tables for every chunk and label."""
        from pathlib import Path

        from chunktui.engine.top import all_units, resolve_units, top_tables
        from chunktui.paths import sample_path
        from chunktui.shared.errors import ChunkError, GenerationCancelled
        from chunktui.shared.texts import read_text

        if not self._need_model():
            return
        engine = self.engine
        if engine.kind != "lm" or engine.dictionary is None:
            raise ChunkError("Where a chunk fires is searched for language-model dictionaries: load a model and a "
                             "dictionary first." if engine.kind == "lm" else
                             "Where a chunk fires is for language-model dictionaries, not the RNN's DSC chunks.")
        path = Path(req.corpus).expanduser() if req.corpus else sample_path("heldout.txt")
        text = read_text(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        held = self.top[1] if self.top is not None and self.top[0] == key else None
        cached = held is not None and req.name in held.names
        if not cached:
            wanted = {req.name: resolve_units(engine.dictionary, req.name)}

            def progress(fraction, message):
                self.send(p.TopProgress(req.request_id, fraction, message))

            try:
                held = top_tables(engine.loaded, engine.dictionary, text, wanted, extra=all_units(engine.dictionary),
                                  progress=progress, should_stop=self.cancel.is_set)
            except GenerationCancelled:
                self.send(p.Failed("Search cancelled", "The search was cancelled; nothing was found yet.",
                                   severity="warning", task="top"))
                return
            self.top = (key, held)
        u = held.index(req.name)
        self.send(p.TopFound(req.request_id, req.name, str(path), held.tokens, len(held.corpus.rows),
                             int(held.matches[u]), held.layers(req.name), held.examples(req.name, req.k, req.chars),
                             0.0 if cached else held.seconds, cached=cached))

    @JOBS(p.BenchStream)
    def _do_benchstream(self, req: p.BenchStream) -> None:
        if not self._need_model():
            return
        start, n = time.perf_counter(), 0
        for event in self.engine.stream(req.prompt, sampling=req.sampling, chat=req.chat, cancel=self.cancel):
            n += event.generated
        self.send(p.BenchDone(tokens=n, seconds=time.perf_counter() - start))

    # ------------------------------------------------------------------ short requests (answered at once)

    @ANSWERED_AT_ONCE(p.TokenDetail)
    def _answer_detail(self, req: p.TokenDetail) -> None:
        self.send(self._detail(req))

    def _detail(self, req: p.TokenDetail) -> p.Detail:
        with self.store_lock:
            held = self.store.get(req.trace_id)
            if held is None or req.index >= len(held[1]):
                return p.Detail(req.trace_id, req.index, req.layer, [], 0, available=False)
            columns, values, scores = held
            value, score = values[req.index].tolist(), scores[req.index].tolist()
        hits = [c for c, s in enumerate(score) if s >= 0]
        if req.layer is not None:
            chosen = sorted((c for c in range(len(score)) if columns.layers[c] == req.layer), key=lambda c: -score[c])
            chosen = chosen[:req.max_rows]
        else:
            # every layer: the shown concept's chunk (matched or not), and the best match of any other concept there
            mine = [c for c in range(len(score)) if req.label is not None and columns.labels[c] == req.label]
            best_other: dict[int, int] = {}
            for c in hits:
                if columns.labels[c] != req.label:
                    layer = columns.layers[c]
                    if layer not in best_other or score[c] > score[best_other[layer]]:
                        best_other[layer] = c
            chosen = sorted(mine + list(best_other.values()),
                            key=lambda c: (columns.layers[c], columns.labels[c] != req.label, -score[c]))
        rows = [p.DetailRow(c, value[c], score[c], score[c] >= 0) for c in chosen]
        return p.Detail(req.trace_id, req.index, req.layer, rows, len(hits))

    @ANSWERED_AT_ONCE(p.ChunkScores)
    def _answer_scores(self, req: p.ChunkScores) -> None:
        self.send(self._scores(req))

    @ANSWERED_AT_ONCE(p.Cancel)
    def _cancel(self, req: p.Cancel) -> None:
        self.cancelled_upto = self.received  # the reader thread numbers jobs, so this is every job sent so far
        self.cancel.set()

    @ANSWERED_AT_ONCE(p.Shutdown)
    def _shutdown(self, req: p.Shutdown) -> None:
        """Handled by `run` itself (it ends the loop); listed so that every request has its handler."""

    def _scores(self, req: p.ChunkScores) -> p.Scores:
        with self.store_lock:
            held = self.store.get(req.trace_id)
            if held is None or not held[2]:
                return p.Scores(req.trace_id, req.column, [], available=False)
            rows = list(held[2])
        import torch

        return p.Scores(req.trace_id, req.column, torch.stack(rows)[:, req.column].tolist())  # (T,) in one op


def _chunk_info(chunk) -> p.ChunkInfo:
    fit = chunk.fit or {}
    card = None
    try:
        from chunktui.engine.cards import stored_card

        found = stored_card(chunk)
        if found is not None:
            tops = ", ".join(f"{t!r}" for t, _ in found.top_tokens[:3])
            card = f"card: {found.matches}/{found.tokens} corpus tokens, mostly {tops}."
    except Exception:  # a card is a nicety; a chunk without a readable one still lists
        card = None
    tp, fp = fit.get("tp_rate"), fit.get("fp_rate")
    from chunktui.engine.build import stored_heldout

    held = stored_heldout(chunk)
    return p.ChunkInfo(id=chunk.id, label=chunk.label, layer=int(chunk.layer), kind=chunk.kind, size=int(chunk.size),
                       threshold=float(chunk.threshold), tp_rate=None if tp is None else float(tp),
                       fp_rate=None if fp is None else float(fp), card=card,
                       heldout_tp=held["tp_rate"] if held else None, heldout_fp=held["fp_rate"] if held else None,
                       heldout_corpus=held.get("corpus") if held else None)


def main(argv: list[str] | None = None) -> None:
    import argparse
    from multiprocessing.connection import Connection

    parser = argparse.ArgumentParser(prog="python -m chunktui.server",
                                     description="chunktui's engine process (started by the app)")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair to the app")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    child_main(Connection(args.fd), threads=args.threads or None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: torch's thread pools can abort it ("terminate called ...")


if __name__ == "__main__":
    main()
