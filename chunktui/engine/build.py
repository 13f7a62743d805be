"""Building dictionaries from labelled text, and evaluating them on held-out text.

This is where hidden-state collection, labelling and population averaging
meet; the CLI, the app and the benchmarks all call these two functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from chunktui.engine.dictionary import Chunk, ChunkDictionary, chunk_id
from chunktui.engine.errors import CorpusError
from chunktui.engine.hidden import HiddenStates, collect
from chunktui.engine.texts import read_sequences, read_text  # noqa: F401  (re-exported)
from chunktui.engine.labels import Labels, read_spans, span_labels, word_labels
from chunktui.engine.matching import PackedDictionary
from chunktui.engine.models import LoadedModel
from chunktui.engine.pa import PAPER_TOLERANCES, confusion_scores, fit_concept

StageFn = Callable[[str, float | None, str], None]


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

    def labels(self, hs: HiddenStates, spans) -> Labels:
        """Masks per label. A word ending in '*' is matched in part-word mode ("cheesecake*")."""
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
    collect_seconds: float = 0.0
    fit_seconds: float = 0.0
    tokens: int = 0
    layers: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)  # label@layer with no stable subpopulation


def collect_for(loaded: LoadedModel, source: LabelSource, layers: list[int] | None, context_mode: str = "sentence",
                batch_size: int = 16, store_dtype: torch.dtype = torch.float32, progress: StageFn = _quiet,
                should_stop=None):
    text, contexts, spans = source.read()
    hs = collect(loaded, text, mode=context_mode, layers=layers, batch_size=batch_size, store_dtype=store_dtype,
                 contexts=contexts, should_stop=should_stop,
                 progress=lambda done, total: progress("collect", done / max(total, 1), f"{done}/{total} tokens"))
    return hs, spans


def build_dictionary(loaded: LoadedModel, source: LabelSource, layers: list[int] | None = None, n: int = 5,
                     criterion: str = "accuracy", seed: int = 0, context_mode: str = "sentence",
                     tolerances: tuple[float, ...] = PAPER_TOLERANCES, batch_size: int = 16,
                     store_dtype: torch.dtype = torch.float32, progress: StageFn = _quiet,
                     should_stop=None) -> tuple[ChunkDictionary, BuildReport]:
    """Collect hidden states, label them, and fit one PA chunk per concept per layer."""
    report = BuildReport()
    t0 = time.perf_counter()
    hs, spans = collect_for(loaded, source, layers, context_mode, batch_size, store_dtype, progress, should_stop)
    report.collect_seconds = time.perf_counter() - t0
    report.tokens = len(hs.tokens)
    report.layers = hs.layers
    labels = source.labels(hs, spans)
    report.counts = labels.counts()
    report.skipped = dict(labels.skipped)
    if not labels.masks:
        reasons = "; ".join(f"{k}: {v}" for k, v in labels.skipped.items())
        raise CorpusError(f"No concept has enough occurrences to fit a chunk ({reasons}).")
    t1 = time.perf_counter()
    chunks: list[Chunk] = []
    digest = hs.digest
    for i, (label, mask) in enumerate(labels.masks.items()):
        progress("fit", i / len(labels.masks), f"fitting '{label}' ({int(mask.sum())} positives)")
        fits, drawn = fit_concept(hs.H, mask, hs.layers, n=n, seed=seed, tolerances=tolerances, criterion=criterion)
        for fit in fits:
            if fit.neurons.numel() == 0:
                report.empty.append(f"{label}@{fit.layer}")
                continue
            stats = dict(fit.stats, n=len(drawn), positives=int(mask.sum()), tokens=len(hs.tokens),
                         label_mode="part-word" if label in labels.part_word else labels.mode, drawn=drawn.tolist())
            chunks.append(Chunk(id=chunk_id(label, fit.layer, labels.step), label=label, layer=fit.layer, kind="pa",
                                neurons=fit.neurons, template=fit.template.float(), threshold=fit.threshold,
                                tolerance=fit.tolerance, step=labels.step, method="population-averaging",
                                criterion=criterion, seed=seed, corpus_digest=digest, fit=stats))
    report.fit_seconds = time.perf_counter() - t1
    progress("fit", 1.0, f"{len(chunks)} chunks")
    notes = {"context_mode": hs.context_mode, "label_mode": labels.mode, "step": labels.step, "n": n,
             "criterion": criterion, "seed": seed, "tolerances": len(tolerances), "corpus": source.corpus_name or source.spans_path,
             "tokens": len(hs.tokens), "corpus_digest": digest, "label_source": "spans" if spans is not None else "words"}
    if hs.windowing_note():
        notes["windowed"] = hs.windowing_note()
    means = torch.full((loaded.layout.n_states, loaded.hidden_size), float("nan"))
    means[hs.layers] = hs.H.float().mean(0)
    return ChunkDictionary(model=loaded.identity(), chunks=chunks, notes=notes, layer_means=means), report


def evaluate_hidden(dictionary: ChunkDictionary, hs: HiddenStates, labels: Labels, width: int) -> list[dict]:
    """Apply each stored chunk unchanged to held-out states; TP/FP rate and accuracy per chunk."""
    packed = PackedDictionary(dictionary.chunks, width, hs.layers)
    result = packed.match(hs.H)
    hit = result.hit  # (T, C)
    T = hit.shape[0]
    records = []
    for c, chunk in enumerate(packed.chunks):
        mask = labels.masks.get(chunk.label)
        record = {"id": chunk.id, "label": chunk.label, "layer": chunk.layer, "kind": chunk.kind, "tokens": T}
        if mask is None:
            record.update(positives=0, tp_rate=None, fp_rate=None, accuracy=None,
                          note=labels.skipped.get(chunk.label, "label not present in the held-out text"))
        else:
            tp = int((hit[:, c] & mask).sum())
            fp = int((hit[:, c] & ~mask).sum())
            n_pos = int(mask.sum())
            s = confusion_scores(torch.tensor(tp), torch.tensor(fp), n_pos, T - n_pos)
            record.update(positives=n_pos, negatives=T - n_pos, tp=tp, fp=fp, tp_rate=float(s["tp_rate"]),
                          fp_rate=float(s["fp_rate"]), accuracy=float(s["accuracy"]), f1=float(s["f1"]),
                          balanced=float(s["balanced"]))
        records.append(record)
    return records


def evaluate_dictionary(loaded: LoadedModel, dictionary: ChunkDictionary, source: LabelSource,
                        context_mode: str | None = None, batch_size: int = 16, progress: StageFn = _quiet,
                        should_stop=None) -> tuple[list[dict], HiddenStates]:
    """Held-out evaluation with the dictionary's own labelling settings (mode, step)."""
    dictionary.check_compatible(loaded.identity())
    notes = dictionary.notes
    if source.words is None and source.spans_path is None:
        part = {c.label for c in dictionary.chunks if c.fit.get("label_mode") == "part-word"}
        source.words = [label + "*" if label in part else label for label in dictionary.labels()]
    if notes.get("label_mode") in ("exact", "part-word"):
        source.label_mode = notes["label_mode"]
    steps = {c.step for c in dictionary.chunks}
    source.step = steps.pop() if len(steps) == 1 else 0
    source.min_count = 1
    mode = context_mode or notes.get("context_mode", "sentence")
    mode = mode if mode in ("sentence", "window") else "sentence"
    hs, spans = collect_for(loaded, source, dictionary.layers(), mode, batch_size, torch.float32, progress, should_stop)
    labels = source.labels(hs, spans)
    return evaluate_hidden(dictionary, hs, labels, loaded.hidden_size), hs


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
