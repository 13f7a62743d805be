"""Labelling tokens with concepts: words (exact or part-word, with step offsets) and spans.

A label is a boolean mask over the rows of a `TokenTable`. Word matching is
done on the token's text as it appears in the source (taken from the
tokenizer's character offsets), never on decoded byte pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from chunktui.shared.errors import CorpusError
from chunktui.engine.corpus import TokenTable
from chunktui.shared.texts import iter_jsonl

MAX_JOIN = 4  # part-word mode: a token may end the word together with up to 4 preceding tokens


@dataclass
class Labels:
    """Named boolean masks over tokens, plus words that were skipped and why."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> (T,) bool
    skipped: dict[str, str] = field(default_factory=dict)  # label -> reason
    mode: str = "exact"
    step: int = 0
    part_word: dict[str, torch.Tensor] = field(default_factory=dict)  # labels matched in part-word mode

    def counts(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.masks.items()}


def _forms(word: str) -> tuple[str, str]:
    """The word with the case of its first letter free."""
    return word[:1].lower() + word[1:], word[:1].upper() + word[1:]


def word_positions(source: str, tokens: TokenTable, word: str, mode: str = "exact") -> torch.Tensor:
    """(T,) bool: tokens whose text is `word` (exact), or that contain it or end it (part-word)."""
    if mode not in ("exact", "part-word"):
        raise CorpusError(f"Unknown label mode '{mode}': use 'exact' or 'part-word'.")
    forms = _forms(word.strip())
    T = len(tokens)
    hits = torch.zeros(T, dtype=torch.bool)
    starts, ends, ctx = tokens.starts, tokens.ends, tokens.context
    for t in range(T):
        piece = source[starts[t]:ends[t]]
        stripped = piece.lstrip()
        if mode == "exact":
            if stripped in forms:
                hits[t] = True
            continue
        if any(f in piece for f in forms):
            hits[t] = True
            continue
        # the word may end here, spread over this token and up to MAX_JOIN before it
        for k in range(1, MAX_JOIN + 1):
            j = t - k
            if j < 0 or ctx[j] != ctx[t]:
                break
            if source[starts[j]:ends[t]].endswith(forms):
                hits[t] = True
                break
    return hits


def shift(mask: torch.Tensor, tokens: TokenTable, step: int) -> torch.Tensor:
    """Move labels `step` tokens earlier (position t -> t - step), never across contexts."""
    if step == 0:
        return mask
    out = torch.zeros_like(mask)
    idx = mask.nonzero().flatten().tolist()
    for t in idx:
        s = t - step
        if 0 <= s < len(tokens) and tokens.context[s] == tokens.context[t]:
            out[s] = True
    return out


def word_labels(source: str, tokens: TokenTable, words: list[str], mode: str = "exact", step: int = 0,
                min_count: int = 5) -> Labels:
    """Labels for each word; words with fewer than `min_count` occurrences are skipped, with a reason."""
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise CorpusError("No words given: pass --words w1,w2,... or a word-list file.")
    labels = Labels(mode=mode, step=step)
    for word in words:
        mask = shift(word_positions(source, tokens, word, mode), tokens, step)
        n = int(mask.sum())
        if n == 0:
            labels.skipped[word] = "never occurs in the corpus" + (" as a whole token (try --part-word)" if mode == "exact" else "")
        elif n < min_count:
            labels.skipped[word] = f"occurs only {n} time(s), fewer than --min-count {min_count}"
        else:
            labels.masks[word] = mask
    return labels


@dataclass
class SpanCorpus:
    """A JSONL span file: the texts joined into one source, each record its own context."""

    source: str
    contexts: list[tuple[int, int]]
    spans: list[tuple[int, int, str]]  # absolute character offsets into source


def read_spans(path: str | Path) -> SpanCorpus:
    """Read `{"text": ..., "spans": [[start, end, label], ...]}` lines, validating every span."""
    from chunktui.shared.safe import visible
    from chunktui.shared.texts import check_input_file

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CorpusError(f"Span file not found: {path}")
    check_input_file(path, "span file (.jsonl)")
    parts: list[str] = []
    contexts, spans = [], []
    offset = 0
    for lineno, record in iter_jsonl(path):  # strict UTF-8, line length and depth limits, lone surrogates refused
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: each line must be a JSON object with \"text\" and \"spans\".")
        text = record.get("text")
        if not isinstance(text, str):
            raise CorpusError(f"{where}: each line needs a \"text\" string.")
        items = record.get("spans", [])
        if items is None:
            items = []
        if not isinstance(items, list):
            raise CorpusError(f"{where}: \"spans\" must be a list of [start, end, \"label\"], not "
                              f"{type(items).__name__} {visible(repr(items))[:40]}.")
        for item in items:
            if not (isinstance(item, (list, tuple)) and len(item) == 3 and type(item[0]) is int
                    and type(item[1]) is int and isinstance(item[2], str)):
                raise CorpusError(f"{where}: a span must be [start, end, \"label\"], got {visible(repr(item))[:80]}.")
            a, b, label = item
            if not label.strip():
                raise CorpusError(f"{where}: span [{a}, {b}] has an empty label.")
            if a >= b and 0 <= b and a <= len(text):
                raise CorpusError(f"{where}: span [{a}, {b}] is reversed or empty: write [start, end] with "
                                  "start < end.")
            if not 0 <= a < b <= len(text):
                raise CorpusError(f"{where}: span [{a}, {b}] is outside the text (length {len(text)}).")
            spans.append((offset + a, offset + b, label))
        contexts.append((offset, offset + len(text)))
        parts.append(text)
        offset += len(text) + 1
    if not parts:
        raise CorpusError(f"{path} has no records.")
    return SpanCorpus(source="\n".join(parts), contexts=contexts, spans=spans)


def span_labels(tokens: TokenTable, source: str, spans: list[tuple[int, int, str]], min_count: int = 5) -> Labels:
    """A token carries a span's label when its non-space characters overlap the span."""
    labels = Labels(mode="spans")
    starts = torch.tensor(tokens.starts)
    ends = torch.tensor(tokens.ends)
    # move token starts past leading whitespace so " happy" overlaps [start of happy, ...) only
    lead = torch.tensor([len(source[a:b]) - len(source[a:b].lstrip()) for a, b in zip(tokens.starts, tokens.ends)])
    starts = starts + lead
    by_label: dict[str, torch.Tensor] = {}
    for a, b, label in spans:
        hit = (starts < b) & (ends > a) & (ends > starts)
        by_label[label] = by_label.get(label, torch.zeros(len(tokens), dtype=torch.bool)) | hit
    for label, mask in sorted(by_label.items()):
        n = int(mask.sum())
        if n < min_count:
            labels.skipped[label] = f"covers only {n} token(s), fewer than --min-count {min_count}"
        else:
            labels.masks[label] = mask
    if not labels.masks and not labels.skipped:
        raise CorpusError("The span file has no spans.")
    return labels


def read_word_list(path: str | Path) -> list[str]:
    from chunktui.shared.texts import check_input_file, decode_utf8

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CorpusError(f"Word list not found: {path}")
    check_input_file(path, "word list")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"Could not read {path}: {err.strerror or err}.") from None
    words = [line.strip() for line in decode_utf8(data, str(path)).splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise CorpusError(f"Word list {path} is empty.")
    return words


def labelled_corpus(loaded, dictionary, source, context_mode: str | None = None):
    """The corpus tokenised and labelled with a dictionary's own settings (label mode, step, part-word labels,
    context mode): (corpus, labels). `evaluate`, `calibrate` and `monitor` all read their text this way."""
    from chunktui.engine.corpus import prepare_corpus  # corpus imports nothing from here

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
    text, contexts, spans = source.read()
    corpus = prepare_corpus(loaded.tokenizer, text, mode, contexts=contexts, context_length=loaded.context_length)
    return corpus, source.labels(corpus, spans)
