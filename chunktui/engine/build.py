"""Building dictionaries from labelled text, and evaluating them on held-out text.

This is where hidden-state collection, labelling and population averaging
meet; the CLI, the app and the benchmarks all call these two functions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


import torch

from chunktui.engine.allocator import keep_freed_memory
from chunktui.engine.dictionary import Chunk, ChunkDictionary, chunk_id
from chunktui.shared.errors import CorpusError, GenerationCancelled
from chunktui.shared.settings import ProgressFn
from chunktui.engine.corpus import HiddenStates, collect
from chunktui.engine.labels import Labels, read_spans, span_labels, word_labels
from chunktui.engine.matching import PackedDictionary
from chunktui.engine.models import LoadedModel
from chunktui.engine.pa import PAPER_TOLERANCES, confusion_scores, fit_concept



def _quiet(stage: str, fraction: float | None, message: str) -> None:
    pass


@dataclass
class LabelSource:
    """What to label: words in a text corpus, or spans from a JSONL file."""

    corpus: str | None = None  # text (already read)
    corpus_name: str = ""
    words: list[str] | None = None
    spans_path: str | None = None
    label_mode: str = "exact"  # exact | part-word
    step: int = 0
    min_count: int = 5

    def read(self) -> tuple[str, list[tuple[int, int]] | None, list[tuple[int, int, str]] | None]:
        if self.spans_path:
            spans = read_spans(self.spans_path)
            return spans.source, spans.contexts, spans.spans
        if self.corpus is None:
            raise CorpusError("Give a corpus (--corpus FILE) or a span file (--spans FILE.jsonl).")
        if not self.corpus.strip():
            raise CorpusError(f"The corpus {self.corpus_name or ''} is empty.".replace("  ", " "))
        return self.corpus, None, None

    def labels(self, hs, spans) -> Labels:
        """Masks per label over `hs.tokens` (HiddenStates or a tokenised Corpus). A word ending in '*' is matched in part-word mode ("cheesecake*")."""
        if spans is not None:
            return span_labels(hs.tokens, hs.source, spans, self.min_count)
        words = self.words or []
        plain = [w for w in words if not w.endswith("*")]
        starred = [w[:-1] for w in words if w.endswith("*")]
        labels = word_labels(hs.source, hs.tokens, plain, self.label_mode, self.step, self.min_count) if plain else Labels(
            mode=self.label_mode, step=self.step)
        if starred:
            extra = word_labels(hs.source, hs.tokens, starred, "part-word", self.step, self.min_count)
            labels.masks.update(extra.masks)
            labels.skipped.update(extra.skipped)
            labels.part_word.update(extra.masks)
        return labels


@dataclass
class BuildReport:
    collect_seconds: float = 0.0  # pass 1: the template positives' states
    fit_seconds: float = 0.0  # pass 2: every token's deviation, counted
    calibrate_seconds: float = 0.0  # pass 3: every token's pooled evidence with the chosen chunks (the colour rule)
    tokens: int = 0
    layers: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)  # label@layer with no stable subpopulation
    unfit: dict[str, str] = field(default_factory=dict)  # label@layer -> why no chunk could be made there
    world_size: int = 1
    seconds: float = 0.0
    pass1_tokens: int = 0  # tokens in the batches pass 1 ran (pass 2's batches that hold a drawn positive)
    pass1_reused_tokens: int = 0  # of those, tokens pass 2 read back instead of running them again
    pass2_parts: dict = field(default_factory=dict)  # pass 2's seconds: forward (batches not kept), screen, sums
    peak_memory: dict = field(default_factory=dict)
    resumed_batches: int = 0
    screen: dict = field(default_factory=dict)  # pass 2's screen: pairs decided in float32, float64, one row at a time
    kept_states: dict = field(default_factory=dict)  # the states kept for later passes: bytes, RAM-backed or not, where

    def summary(self) -> dict:
        return {"seconds": round(self.seconds, 3), "tokens": self.tokens, "pass1_tokens": self.pass1_tokens,
                "pass1_reused_tokens": self.pass1_reused_tokens,
                "pass2_parts": {k: round(v, 3) for k, v in self.pass2_parts.items()},
                "pass1_seconds": round(self.collect_seconds, 3), "pass2_seconds": round(self.fit_seconds, 3),
                "pass3_seconds": round(self.calibrate_seconds, 3),
                "tokens_per_second": round(self.tokens / self.fit_seconds, 1) if self.fit_seconds else None,
                "peak_memory_bytes": self.peak_memory, "world_size": self.world_size, "layers": len(self.layers),
                "concepts": len(self.counts), "skipped": self.skipped, "empty": len(self.empty),
                "resumed_batches": self.resumed_batches, "screen": self.screen, "kept_states": self.kept_states}


def collect_for(loaded: LoadedModel, source: LabelSource, layers: list[int] | None, context_mode: str = "sentence",
                batch_size: int = 16, store_dtype: torch.dtype = torch.float32, progress: ProgressFn = _quiet,
                should_stop=None):
    """All hidden states of a source in memory (the reference path: small texts, tests, benchmarks)."""
    text, contexts, spans = source.read()
    hs = collect(loaded, text, mode=context_mode, layers=layers, batch_size=batch_size, store_dtype=store_dtype,
                 contexts=contexts, should_stop=should_stop,
                 progress=lambda done, total: progress("collect", done / max(total, 1), f"{done}/{total} tokens"))
    return hs, spans


def build_dictionary_in_memory(loaded: LoadedModel, source: LabelSource, layers: list[int] | None = None, n: int = 5,
                               criterion: str = "accuracy", seed: int = 0, context_mode: str = "sentence",
                               tolerances: tuple[float, ...] = PAPER_TOLERANCES, batch_size: int = 16,
                               store_dtype: torch.dtype = torch.float32) -> tuple[ChunkDictionary, BuildReport]:
    """The reference build: every state in memory, `fit_concept` per concept (paper criteria only).

    Kept so tests can check that the streaming build gives the same dictionary.
    """
    report = BuildReport()
    hs, spans = collect_for(loaded, source, layers, context_mode, batch_size, store_dtype)
    report.tokens = len(hs.tokens)
    report.layers = hs.layers
    labels = source.labels(hs, spans)
    report.counts = labels.counts()
    chunks: list[Chunk] = []
    for label, mask in labels.masks.items():
        fits, drawn = fit_concept(hs.H, mask, hs.layers, n=n, seed=seed, tolerances=tolerances, criterion=criterion)
        chunks += _chunks_for(label, fits, drawn, labels, int(mask.sum()), len(hs.tokens), criterion, seed,
                              hs.digest, report)
    means = torch.full((loaded.layout.n_states, loaded.hidden_size), float("nan"))
    means[hs.layers] = hs.H.double().mean(0).float()
    return ChunkDictionary(model=loaded.identity(), chunks=chunks, notes={}, layer_means=means), report


def _chunks_for(label, fits, drawn, labels: Labels, positives: int, tokens: int, criterion: str, seed: int,
                digest: str, report: BuildReport) -> list[Chunk]:
    chunks = []
    for fit in fits:
        if fit.subpopulation.numel() == 0:
            report.empty.append(f"{label}@{fit.layer}")
            if getattr(fit, "note", None):
                report.unfit[f"{label}@{fit.layer}"] = fit.note
            continue
        stats = dict(fit.stats, n=len(drawn), positives=positives, tokens=tokens,
                     label_mode="part-word" if label in labels.part_word else labels.mode, drawn=drawn.tolist())
        chunks.append(Chunk(id=chunk_id(label, fit.layer, labels.step), label=label, layer=fit.layer, kind="pa",
                            subpopulation=fit.subpopulation, template=fit.template.float(), threshold=fit.threshold,
                            tolerance=fit.tolerance, step=labels.step, method="population-averaging",
                            criterion=criterion, seed=seed, corpus_digest=digest, fit=stats))
    return chunks


def layer_sums(states: torch.Tensor) -> torch.Tensor:
    """states (t, S, d) -> (S, d) float64 sums over the tokens: the bits of `states.double().sum(0)`, one layer at
    a time, so the float64 copy is (t, d) and stays in the allocator's reuse, not a batch-sized new mapping each
    time (whose page faults cost 5x the sum on a CPU)."""
    out = torch.empty(states.shape[1:], dtype=torch.float64, device=states.device)
    for s in range(states.shape[1]):
        out[s] = states[:, s].double().sum(0)
    return out


def labelled_corpus(loaded: LoadedModel, source: LabelSource, layers: list[int] | None, context_mode: str,
                    report: BuildReport):
    """A build's input, tokenised and labelled without the model: (layers, corpus, labels, spans); the report's
    tokens, layers, counts and skipped words are filled in. No concept with enough occurrences is an error."""
    from chunktui.engine.corpus import check_layers, prepare_corpus

    layers = check_layers(layers, loaded.layout)
    text, contexts, spans = source.read()
    corpus = prepare_corpus(loaded.tokenizer, text, context_mode, contexts=contexts, context_length=loaded.context_length)
    report.tokens = len(corpus.tokens)
    report.layers = layers
    labels = source.labels(corpus, spans)
    report.counts = labels.counts()
    report.skipped = dict(labels.skipped)
    if not labels.masks:
        reasons = "; ".join(f"{k}: {v}" for k, v in labels.skipped.items())
        raise CorpusError(f"No concept has enough occurrences to fit a chunk ({reasons}).")
    return layers, corpus, labels, spans


class _Rate:
    """Tokens per second and time left, for the progress bar."""

    def __init__(self, total: int, world: int):
        self.total, self.world, self.t0, self.done = total, world, time.perf_counter(), 0

    def step(self, tokens: int) -> tuple[float, str]:
        self.done += tokens * self.world  # every rank moves at about the same pace
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0) / rate if rate > 0 else float("inf")
        eta = f"{int(left // 60)}:{int(left % 60):02d}" if left != float("inf") else "?"
        return min(self.done / max(self.total, 1), 1.0), f"{min(self.done, self.total)}/{self.total} tokens, {rate:,.0f} tok/s, ETA {eta}"


def build_dictionary(loaded: LoadedModel, source: LabelSource, layers: list[int] | None = None, n: int | None = None,
                     criterion: str = "accuracy", seed: int = 0, context_mode: str = "sentence",
                     tolerances: tuple[float, ...] = PAPER_TOLERANCES, batch_size: int = 16,
                     store_dtype: torch.dtype = torch.float32, progress: ProgressFn = _quiet,
                     should_stop=None, group=None, checkpoint: "Checkpoint | None" = None,
                     colour_budget: float | None = 0.01, vote_layers: list[int] | None = None,
                     reuse_states: bool | None = None) -> tuple[ChunkDictionary, BuildReport]:
    """Fit one PA chunk per concept per layer, streaming over the corpus batch by batch.

    Pass 1 tokenises and labels the corpus without the model, draws R per
    concept and runs the batches of pass 2 that hold R (the same batches, so
    R's states have the very bits pass 2 and the in-memory reference see):
    templates, spreads, subpopulations and the paper's thresholds. Pass 2 runs
    every context once and counts matches per (layer, tolerance), or keeps the
    smallest negative deviations for `fp-budget:B`; batches pass 1 kept are
    read back instead of run again. With a process `group` the batches are
    dealt out across ranks and the counts merged; every rank returns the same
    dictionary. `n=None` makes the template the mean of all positives (the
    default for fp-budget). `store_dtype` is accepted for compatibility and
    not used.

    Pass 3 (the colour rule) needs the states of pass 2's batches again. With
    `reuse_states` (default: on a CPU, where the forward pass is the cost) each
    batch's states are kept as they are computed (`corpus.BatchStates`: held in
    memory when all of them take at most a third of the memory available, else
    in temporary files), pass 2 reads pass 1's back and pass 3 reads them all
    back instead of running the model again: the same bytes, so the same
    dictionary and rule (batches it could not keep run the model as before).
    Without it (an accelerator), pass 2 runs pass 1's batches again.
    """
    from chunktui.engine.distributed import SingleProcess, peak_memory_bytes
    from chunktui.engine.corpus import run_batch, schedule
    from chunktui.engine.pa import StreamingFit, draw_positives, parse_criterion

    keep_freed_memory()  # a corpus job: each batch reuses the memory the last one freed (engine/allocator.py)
    group = group or SingleProcess()
    crit = parse_criterion(criterion)
    if n is None and not crit.calibrated:
        n = 5
    if n is not None and n < 1:
        raise CorpusError(f"--n must be at least 1, got {n}.")
    report = BuildReport(world_size=group.world_size)
    t_start = time.perf_counter()
    layers, corpus, labels, spans = labelled_corpus(loaded, source, layers, context_mode, report)
    draws = {label: draw_positives(mask, n if n is not None else int(mask.sum()), seed)
             for label, mask in labels.masks.items()}
    fit = StreamingFit(labels.masks, draws, layers, tolerances, crit, device=loaded.device)
    S, d = len(layers), loaded.hidden_size

    def stop_check():
        if should_stop is not None and should_stop():
            raise GenerationCancelled("Build cancelled; counts up to the last checkpoint were kept."
                                      if checkpoint else "Build cancelled; nothing was saved.")

    # pass 1: the states of every R, from the batches of pass 2 that hold them (the same batches, so the same
    # bits: the forward is not batch-invariant, and pass 2 and the in-memory reference batch this way)
    batches = schedule(corpus, batch_size)
    mine = list(range(group.rank, len(batches), group.world_size))
    needed = fit.needed_tokens()
    token_rows = corpus.token_rows()
    holds = set(token_rows[needed].unique().tolist())
    first = [j for j in mine if any(i in holds for i in batches[j])]
    if reuse_states is None:
        reuse_states = loaded.device.type == "cpu"
    kept = None
    if reuse_states:
        from chunktui.engine.corpus import BatchStates

        # pass 1's batches are read back by pass 2, and every batch by pass 3
        kept = BatchStates(expected_bytes=report.tokens * S * d * loaded.dtype.itemsize)
    try:
        X = torch.zeros(len(needed), S, d)
        tokens1 = sum(len(corpus.rows[i][0]) for j in first for i in batches[j])
        report.pass1_tokens = tokens1
        rate = _Rate(tokens1, group.world_size)
        for j in first:
            stop_check()
            index, states = run_batch(loaded, corpus, batches[j], layers)
            if kept is not None:
                kept.put(j, index, states)
            hit = torch.isin(index, needed)
            X[torch.searchsorted(needed, index[hit])] = states[hit.to(states.device)].float().cpu()
            progress("templates", *rate.step(len(index)))
        X = group.all_sum(X)  # each state was filled by one rank, zeros elsewhere: the sum is exact
        fit.set_positives(needed, X)
        del X
        report.collect_seconds = time.perf_counter() - t_start

        # pass 2: every token once (pass 1's batches read back where they were kept)
        t1 = time.perf_counter()
        sums = torch.zeros(S, d, dtype=torch.float64)  # for the layer means (mean ablation)
        start = 0
        if checkpoint is not None:
            checkpoint.bind(group, {"corpus": corpus.digest, "labels": sorted(labels.masks), "layers": layers,
                                    "n": n, "criterion": str(crit), "seed": seed, "batch_size": batch_size,
                                    "tolerances": list(tolerances), "model": loaded.identity()["fingerprint_digest"],
                                    "batches": len(batches)})
            expected = {k: tuple(v.shape) for k, v in fit.state_tensors().items()} | {"layer_sums": (S, d)}
            restored = checkpoint.restore(expected, batches=len(mine))
            if restored is not None:
                start, tensors = restored
                fit.load_state_tensors(tensors)
                sums = tensors["layer_sums"]
                report.resumed_batches = start
        rate = _Rate(report.tokens, group.world_size)
        rate.done = sum(len(batches[j]) for j in mine[:start])  # approximate: contexts, not tokens, until it moves
        since = 0
        parts = report.pass2_parts = {"forward": 0.0, "screen": 0.0, "sums": 0.0}
        for pos in range(start, len(mine)):
            stop_check()
            j = mine[pos]
            t2 = time.perf_counter()
            got = kept.get(j, loaded.device) if kept is not None else None
            if got is None:
                index, states = run_batch(loaded, corpus, batches[j], layers)
                if kept is not None and colour_budget is not None:
                    kept.put(j, index, states)
            else:
                index, states = got
                report.pass1_reused_tokens += len(index)
                if colour_budget is None:
                    kept.discard(j)  # no pass 3 to read it again: its memory (or file) goes now
            t3 = time.perf_counter()
            fit.update(index, states)
            t4 = time.perf_counter()
            sums += layer_sums(states).cpu()
            parts["forward"] += t3 - t2
            parts["screen"] += t4 - t3
            parts["sums"] += time.perf_counter() - t4
            progress("build", *rate.step(len(index)))
            since += len(batches[j])
            if checkpoint is not None and since >= checkpoint.every:
                checkpoint.save(pos + 1, dict(fit.state_tensors(), layer_sums=sums))
                since = 0
        fit.merge(group)
        sums = group.all_sum(sums)
        report.fit_seconds = time.perf_counter() - t1
        if getattr(fit, "shared", None) is not None:
            report.screen = {"concept_tokens": fit.shared.screened, "float64_layer_tokens": fit.shared.float64_rows,
                             "rowwise_concept_tokens": fit.shared.near_tokens,
                             "ties_from_drawn_bits": fit.shared.ties_reused, "ties_reference_run": fit.shared.ties_computed}

        chunks: list[Chunk] = []
        for label, fits in fit.finish().items():
            chunks += _chunks_for(label, fits, draws[label], labels, int(labels.masks[label].sum()), report.tokens,
                                  str(crit), seed, corpus.digest, report)
        if not chunks:
            why = "; ".join(f"{k}: {v}" for k, v in list(report.unfit.items())[:3]) or \
                "no concept has a stable subpopulation at any layer"
            raise CorpusError(f"No chunk could be fitted at any layer ({why}). Try another --criterion, more text, "
                              "or other --layers.")
        progress("build", 1.0, f"{len(chunks)} chunks")
        rule = None
        if colour_budget is not None and chunks:
            # pass 3: the token-level colour rule, calibrated on the same text (shared/evidence.py, engine/calibrate.py)
            from chunktui.engine.calibrate import rule_for_corpus

            t2 = time.perf_counter()
            rate = _Rate(report.tokens, group.world_size)
            rule = rule_for_corpus(loaded, chunks, corpus, labels.masks, layers, budget=colour_budget,
                                   voting_layers=vote_layers,
                                   batch_size=batch_size, should_stop=stop_check, group=group,
                                   progress=lambda k: progress("calibrate", *rate.step(k)),
                                   source={"corpus": source.corpus_name or source.spans_path}, states=kept)
            report.calibrate_seconds = time.perf_counter() - t2
    finally:
        if kept is not None:
            report.kept_states = {"bytes": kept.bytes, "in_memory": kept.in_memory, "folder": kept.where}
            kept.close()
    notes = {"context_mode": corpus.context_mode, "label_mode": labels.mode, "step": labels.step,
             "n": n if n is not None else "all", "criterion": str(crit), "seed": seed, "tolerances": len(tolerances),
             "corpus": source.corpus_name or source.spans_path, "tokens": report.tokens,
             "corpus_digest": corpus.digest, "label_source": "spans" if spans is not None else "words"}
    if corpus.windowing_note():
        notes["windowed"] = corpus.windowing_note()
    if rule is not None:
        notes["token_rule"] = rule.to_json()
    means = torch.full((loaded.layout.n_states, d), float("nan"))
    means[layers] = (sums / report.tokens).float()
    report.seconds = time.perf_counter() - t_start
    report.peak_memory = peak_memory_bytes(loaded.device)
    return ChunkDictionary(model=loaded.identity(), chunks=chunks, notes=notes, layer_means=means), report


class Checkpoint:
    """Counts saved every `every` contexts (safetensors + JSON, written atomically), one pair per rank.

    `folder` holds rank{r}.safetensors and rank{r}.json; the JSON records the
    build's settings, so a resume with other settings is refused rather than
    silently mixed. `resume=False` starts afresh (any old checkpoint is
    replaced at the first save).
    """

    def __init__(self, folder: str | Path, every: int = 200, resume: bool = False):
        if every < 1:
            raise CorpusError(f"--checkpoint-every must be at least 1 context, got {every}.")
        self.folder = Path(folder)
        self.every = every
        self.resume = resume
        self.rank, self.world, self.config = 0, 1, {}

    def bind(self, group, config: dict) -> None:
        self.rank, self.world = group.rank, group.world_size
        self.config = dict(config, world_size=self.world)
        if not self.resume and self.rank == 0:  # a fresh run: what ranks it will not have left behind goes now
            for path in self._files():
                rank = path.name.split(".")[0][len("rank"):]
                if rank.isdigit() and int(rank) >= self.world:
                    path.unlink(missing_ok=True)
                    for left in self._leftovers(int(rank)):
                        left.unlink(missing_ok=True)

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.folder.glob("rank*.*") if p.suffix in (".json", ".safetensors"))
        except OSError:
            return []

    @staticmethod
    def saved_world_size(folder: str | Path) -> int | None:
        """The number of processes (`--procs`) that wrote the checkpoints in `folder`, or None (none readable).
        Read before a run launches its processes, so a resume with another --procs is refused at once."""
        sizes = set()
        try:
            metas = sorted(Path(folder).glob("rank*.json"))
        except OSError:
            return None
        for path in metas:
            try:
                size = json.loads(path.read_text(encoding="utf-8"))["config"]["world_size"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(size, int) and not isinstance(size, bool):
                sizes.add(size)
        return max(sizes) if sizes else None

    @staticmethod
    def check_procs(folder: str | Path, procs: int, resume: bool) -> None:
        """--resume continues on as many processes as wrote the checkpoint: each rank resumes its own shard."""
        saved = Checkpoint.saved_world_size(folder) if resume else None
        if saved is not None and saved != procs:
            raise CorpusError(f"The checkpoint in {folder} was written by {saved} process{'es' if saved > 1 else ''} "
                              f"(--procs {saved}): each process resumes its own share of the work, so resume "
                              f"with --procs {saved}, or delete {folder} to start afresh.")

    def _paths(self) -> tuple[Path, Path]:
        return self.folder / f"rank{self.rank}.safetensors", self.folder / f"rank{self.rank}.json"

    def _seal(self, batches_done: int, digest: str, tensors_name: str) -> str:
        """A digest over everything the JSON says: an edited field (batches_done 999999) no longer matches."""
        text = json.dumps([self.config, batches_done, digest, tensors_name], sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def restore(self, expected: dict[str, tuple] | None = None, batches: int | None = None):
        """(batches done by this rank, tensors) from a matching checkpoint, or None.

        `expected` (name -> shape) and `batches` (this rank's batch count) are checked too: a checkpoint that
        does not match its build (other shapes, a count out of range, an edited JSON) is refused.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not self.resume:
            return None
        _, meta_path = self._paths()
        if not meta_path.is_file():
            return None

        def refuse(why: str):
            raise CorpusError(f"The checkpoint in {self.folder} {why}; resume with the same command, or delete "
                              f"{self.folder} to start afresh.")

        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            refuse(f"is unreadable ({err})")
        if not isinstance(meta, dict):
            refuse("is damaged (its JSON is not an object)")
        saved = json.loads(json.dumps(meta.get("config")))
        if saved != json.loads(json.dumps(self.config)):
            changed = sorted(k for k in set(saved or {}) | set(self.config)
                             if (saved or {}).get(k) != json.loads(json.dumps(self.config)).get(k))
            if changed == ["world_size"]:
                self.check_procs(self.folder, self.world, True)
            raise CorpusError(f"The checkpoint in {self.folder} was made with other settings ({', '.join(changed)}); "
                              "resume with the same command, or delete the folder to start afresh.")
        done, digest = meta.get("batches_done"), meta.get("digest")
        name = meta.get("tensors", self._paths()[0].name)  # older checkpoints: the fixed name
        if not isinstance(name, str) or "/" in name or not name.startswith(f"rank{self.rank}"):
            refuse("names a tensor file that is not its own")
        if isinstance(done, bool) or not isinstance(done, int) or not isinstance(digest, str):
            refuse("is damaged (batches_done or digest missing or of the wrong type)")
        if "seal" in meta and meta["seal"] != self._seal(done, digest, name):
            refuse("was edited after it was written (its fields do not match their seal)")
        if batches is not None and not 0 <= done <= batches:
            refuse(f"says {done} batches were done, and this build has {batches} for this process")
        tensors_path = self.folder / name
        if not tensors_path.is_file():
            refuse(f"lacks its tensor file {name}")
        if digest != _file_digest(tensors_path):
            refuse(f"does not match its tensor file {name} (half written?)")
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError) as err:
            refuse(f"holds a damaged tensor file ({err})")
        if expected is not None:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            if shapes != {k: tuple(v) for k, v in expected.items()}:
                refuse("does not match this build (other tensors or shapes)")
        return done, tensors

    def save(self, batches_done: int, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors to a new file named by their digest, then the JSON that names it, then the old file removed:
        a kill at any point leaves the previous checkpoint (or this one) whole and resumable."""
        from safetensors.torch import save

        from chunktui.shared.io import atomic_write_bytes, atomic_write_text

        _, meta_path = self._paths()
        data = save({k: v.contiguous().cpu() for k, v in tensors.items()})
        digest = hashlib.sha256(data).hexdigest()
        name = f"rank{self.rank}.{digest[:16]}.safetensors"
        old = self._current_tensors()
        atomic_write_bytes(self.folder / name, data)
        atomic_write_text(meta_path, json.dumps({"config": self.config, "batches_done": batches_done,
                                                 "digest": digest, "tensors": name,
                                                 "seal": self._seal(batches_done, digest, name)}, indent=1))
        for path in old:
            if path.name != name:
                path.unlink(missing_ok=True)

    def _current_tensors(self) -> list[Path]:
        try:
            return sorted(self.folder.glob(f"rank{self.rank}.*safetensors"))
        except OSError:
            return []

    def _leftovers(self, rank: int) -> list[Path]:
        """Half-written temporary files a killed save of `rank` left (shared.io writes `.NAME.XXXX.tmp` first)."""
        try:
            return sorted(self.folder.glob(f".rank{rank}.*.tmp"))
        except OSError:
            return []

    def clear(self) -> None:
        for path in (*self._paths(), *self._current_tensors(), *self._leftovers(self.rank)):
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # other ranks' files are still there, or it was never made


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate_hidden(dictionary: ChunkDictionary, hs: HiddenStates, labels: Labels, width: int) -> list[dict]:
    """Apply each stored chunk unchanged to held-out states; TP/FP rate and accuracy per chunk."""
    packed = PackedDictionary(dictionary.chunks, width, hs.layers)
    result = packed.match(hs.H)
    hit = result.hit  # (T, C)
    T = hit.shape[0]
    tp = torch.stack([(hit[:, c] & labels.masks[ch.label]).sum() if ch.label in labels.masks else torch.tensor(0)
                      for c, ch in enumerate(packed.chunks)]) if packed.chunks else torch.zeros(0, dtype=torch.long)
    fp = torch.stack([(hit[:, c] & ~labels.masks[ch.label]).sum() if ch.label in labels.masks else torch.tensor(0)
                      for c, ch in enumerate(packed.chunks)]) if packed.chunks else torch.zeros(0, dtype=torch.long)
    return evaluation_records(packed.chunks, labels, tp, fp, T)


def evaluation_records(chunks, labels: Labels, tp: torch.Tensor, fp: torch.Tensor, T: int) -> list[dict]:
    """One record per chunk from its match counts over T held-out tokens: TP, FP and the rates (or why none)."""
    records = []
    for c, chunk in enumerate(chunks):
        mask = labels.masks.get(chunk.label)
        record = {"id": chunk.id, "label": chunk.label, "layer": chunk.layer, "kind": chunk.kind, "tokens": T}
        if mask is None:
            record.update(positives=0, tp_rate=None, fp_rate=None, accuracy=None,
                          note=labels.skipped.get(chunk.label, "label not present in the held-out text"))
        else:
            n_pos = int(mask.sum())
            s = confusion_scores(tp[c], fp[c], n_pos, T - n_pos)
            record.update(positives=n_pos, negatives=T - n_pos, tp=int(tp[c]), fp=int(fp[c]),
                          tp_rate=float(s["tp_rate"]), fp_rate=float(s["fp_rate"]), accuracy=float(s["accuracy"]),
                          f1=float(s["f1"]), balanced=float(s["balanced"]))
        records.append(record)
    return records


def evaluate_dictionary(loaded: LoadedModel, dictionary: ChunkDictionary, source: LabelSource,
                        context_mode: str | None = None, batch_size: int = 16, progress: ProgressFn = _quiet,
                        should_stop=None, group=None, token_level: dict | None = None):
    """Held-out evaluation with the dictionary's own labelling settings (mode, step), streaming.

    With a `token_level` dict, it is filled with the colour rule's figures on this text: how many tokens that
    are no concept are shown with one, and how many concept tokens show their own concept (per concept too).

    Every context runs once; per chunk only its TP and FP counts are kept.
    Returns (records, corpus): one record per chunk, and the tokenised corpus.
    """
    from chunktui.engine.distributed import SingleProcess
    from chunktui.engine.corpus import check_layers, run_batch, schedule
    from chunktui.engine.labels import labelled_corpus

    keep_freed_memory()  # a corpus job (engine/allocator.py)
    group = group or SingleProcess()
    dictionary.check_compatible(loaded.identity())
    corpus, labels = labelled_corpus(loaded, dictionary, source, context_mode)
    layers = check_layers(dictionary.layers(), loaded.layout)
    packed = PackedDictionary(dictionary.chunks, loaded.hidden_size, layers, device=loaded.device,
                              rule=dictionary.token_rule())
    names = sorted(labels.masks)
    T = len(corpus.tokens)
    label_masks = torch.stack([labels.masks[k] for k in names]) if names else torch.zeros(0, T, dtype=torch.bool)
    column = torch.tensor([names.index(c.label) if c.label in labels.masks else -1 for c in packed.chunks],
                          dtype=torch.long)
    present = column >= 0
    tp = torch.zeros(len(packed), dtype=torch.long)
    fp = torch.zeros(len(packed), dtype=torch.long)
    # the colour rule per token: shown concept (index into names, -1 none) against the labels
    concept_of_chunk = torch.tensor([names.index(c.label) if c.label in names else len(names) for c in packed.chunks]
                                    + [-1], dtype=torch.long)
    shown = torch.full((T,), -1, dtype=torch.long)
    batches = schedule(corpus, batch_size)
    rate = _Rate(T, group.world_size)
    for j in range(group.rank, len(batches), group.world_size):
        if should_stop is not None and should_stop():
            raise GenerationCancelled("Evaluation cancelled.")
        index, states = run_batch(loaded, corpus, batches[j], layers)
        matches = packed.match(states)
        hit = matches.hit.cpu()  # (t, C)
        shown[index] = concept_of_chunk[matches.token_chunk.cpu()]  # chunk -1 picks the appended -1
        pos = torch.zeros_like(hit)
        if names:
            pos[:, present] = label_masks[:, index].T[:, column[present]]
        tp += (hit & pos).sum(0)
        fp += (hit & ~pos).sum(0)
        progress("evaluate", *rate.step(len(index)))
    tp, fp = group.all_sum(tp), group.all_sum(fp)
    if token_level is not None:
        shown = group.all_sum(shown + 1) - 1 if group.world_size > 1 else shown  # each token filled by one rank
        token_level.update(token_level_figures(shown, label_masks, names, dictionary.token_rule()))
    return evaluation_records(packed.chunks, labels, tp, fp, T), corpus


def token_level_figures(shown: torch.Tensor, label_masks: torch.Tensor, names: list[str], rule) -> dict:
    """The colour rule on a labelled text: shown (T,) concept index or -1 (len(names): a concept not labelled here)."""
    T = len(shown)
    any_label = label_masks.any(0) if len(names) else torch.zeros(T, dtype=torch.bool)
    non_concept = ~any_label
    coloured = int(((shown >= 0) & non_concept).sum())
    per = {}
    own_total = 0
    for k, name in enumerate(names):
        mask = label_masks[k]
        own = int(((shown == k) & mask).sum())
        own_total += own
        per[name] = {"positives": int(mask.sum()), "shown_own": own, "shown_elsewhere": int(((shown == k) & ~mask).sum())}
    positives = int(label_masks.sum()) if len(names) else 0
    return {"rule": rule.describe(), "calibrated": rule.calibrated, "tokens": T, "non_concept": int(non_concept.sum()),
            "coloured_non_concept": coloured, "rate": coloured / max(int(non_concept.sum()), 1),
            "concept_tokens": positives, "shown_own": own_total, "recall": own_total / max(positives, 1),
            "by_label": per}


def summarise_by_label(records: list[dict]) -> dict[str, dict]:
    """Mean over layers of TP rate, FP rate and accuracy, per label."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get("tp_rate") is None:
            continue
        agg = out.setdefault(r["label"], {"layers": 0, "tp_rate": 0.0, "fp_rate": 0.0, "accuracy": 0.0,
                                          "positives": r["positives"]})
        agg["layers"] += 1
        for key in ("tp_rate", "fp_rate", "accuracy"):
            agg[key] += r[key]
    for agg in out.values():
        for key in ("tp_rate", "fp_rate", "accuracy"):
            agg[key] /= agg["layers"]
    return out


# --------------------------------------------------------------------------- held-out figures stored in a dictionary

HELDOUT_KEY = "heldout"  # chunk.evaluation["heldout"]: optional; a dictionary without it reads as before


def store_heldout(dictionary: ChunkDictionary, records: list[dict], corpus_name: str, corpus_digest: str) -> int:
    """Put each chunk's held-out record (from `evaluate_dictionary`) into `chunk.evaluation["heldout"]`.

    Chunks whose label is absent from the held-out text get no block (an older block is removed: it would
    describe another text). Returns the number of chunks that got figures."""
    by_id = {r["id"]: r for r in records}
    stored = 0
    for chunk in dictionary.chunks:
        record = by_id.get(chunk.id)
        chunk.evaluation = dict(chunk.evaluation or {})
        if record is None or record.get("tp_rate") is None:
            chunk.evaluation.pop(HELDOUT_KEY, None)
            continue
        chunk.evaluation[HELDOUT_KEY] = {
            "corpus": corpus_name, "corpus_digest": corpus_digest, "tokens": int(record["tokens"]),
            "positives": int(record["positives"]), "tp": int(record["tp"]), "fp": int(record["fp"]),
            "tp_rate": float(record["tp_rate"]), "fp_rate": float(record["fp_rate"]),
            "accuracy": float(record["accuracy"])}
        stored += 1
    return stored


def stored_heldout(chunk: Chunk) -> dict | None:
    """The held-out block of a chunk (`store_heldout`), or None when it has none or it is not well formed."""
    block = (chunk.evaluation or {}).get(HELDOUT_KEY) if isinstance(chunk.evaluation, dict) else None
    if not isinstance(block, dict):
        return None
    try:
        tp, fp = float(block["tp_rate"]), float(block["fp_rate"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (0.0 <= tp <= 1.0 and 0.0 <= fp <= 1.0):
        return None
    return dict(block, tp_rate=tp, fp_rate=fp)
