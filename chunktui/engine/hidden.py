"""Reading the residual stream: H[l, t] for every layer, live or over a corpus.

`ResidualRecorder` is the one place hidden states are captured: a forward
pre-hook on each decoder block records H[l] (the stream entering block l,
l < L) and a forward hook on the final norm records H[L]. Interventions are
pre-hooks on the same blocks registered *before* the recorder's, so the
recorder sees the stream as the block sees it.

`collect` runs a corpus through the model in per-sentence contexts (the
paper's protocol) or sliding windows, batched, and returns one flat table of
tokens with their hidden states.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from chunktui.engine.errors import CorpusError, DeviceMemoryError, GenerationCancelled, out_of_memory_message
from chunktui.engine.memory import ensure_fits, ensure_host_fits
from chunktui.engine.models import LoadedModel, ModelLayout


class ResidualRecorder:
    """Records H[0..L] during a forward pass, without copying.

    Use as a context manager around a forward call; `states()` then returns a
    tensor (batch, seq, n_states, d) in the model's dtype (or the chosen
    subset of layers). On a model dispatched across devices each block's state
    arrives on the device of the block before it; `states()` gathers them onto
    `device` (default: where the first recorded layer arrived, which is the
    model's input device), so matching sees one tensor on one device.
    """

    def __init__(self, layout: ModelLayout, layers: Sequence[int] | None = None,
                 device: torch.device | str | None = None):
        self.layout = layout
        self.layers = list(range(layout.n_states)) if layers is None else list(layers)
        self.device = torch.device(device) if device is not None else None
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "ResidualRecorder":
        wanted = set(self.layers)
        for index, block in enumerate(self.layout.blocks):
            if index in wanted:
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
        if self.layout.n_layers in wanted:
            self._handles.append(self.layout.final_norm.register_forward_hook(self._post_hook(self.layout.n_layers)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            self._captured[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            self._captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def states(self) -> torch.Tensor:
        missing = [l for l in self.layers if l not in self._captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not reached in the forward pass")
        device = self.device or self._captured[self.layers[0]].device
        out = torch.stack([self._captured[l].to(device) for l in self.layers], dim=2)
        self._captured.clear()
        return out


# --------------------------------------------------------------------------- contexts


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences (ending in . ! ? or a line break), whitespace trimmed."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


@dataclass
class TokenTable:
    """One row per token of a corpus (BOS excluded)."""

    ids: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # character offsets into the source text
    ends: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)  # index of the context the token was read in
    position: list[int] = field(default_factory=list)  # position within its context (0 = first after BOS)

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, source: str, index: int) -> str:
        return source[self.starts[index]:self.ends[index]]


@dataclass
class HiddenStates:
    """Hidden states of a corpus: H has shape (T, len(layers), d)."""

    H: torch.Tensor
    layers: list[int]
    tokens: TokenTable
    source: str  # the full text; token offsets point into it
    contexts: list[tuple[int, int]]
    context_mode: str
    model_name: str
    windowed_contexts: int = 0  # contexts longer than the model's, read in overlapping windows
    context_length: int = 0

    def windowing_note(self) -> str | None:
        """What the user should be told when long contexts were split (None when none were)."""
        if not self.windowed_contexts:
            return None
        what = "record" if self.context_mode == "records" else "sentence" if self.context_mode == "sentence" else "window"
        return (f"{self.windowed_contexts} {what}{'s' if self.windowed_contexts > 1 else ''} longer than the model's "
                f"context ({self.context_length} tokens) {'were' if self.windowed_contexts > 1 else 'was'} read in "
                "overlapping windows of that size")

    @property
    def digest(self) -> str:
        return corpus_digest(self.source, self.context_mode)

    def token_texts(self) -> list[str]:
        return [self.source[a:b] for a, b in zip(self.tokens.starts, self.tokens.ends)]


def corpus_digest(text: str, mode: str = "") -> str:
    return hashlib.sha256((mode + "\0" + text).encode()).hexdigest()[:16]


def _encode_contexts(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Token ids and absolute character offsets for each context span."""
    pieces = [text[a:b] for a, b in spans]
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (a, _), ids, offsets in zip(spans, enc["input_ids"], enc["offset_mapping"]):
        out.append((list(ids), [(a + s, a + e) for s, e in offsets]))
    return out


def _windows(ids: list[int], offsets: list[tuple[int, int]], window: int, stride: int):
    """Sliding windows; each token is kept from the window that gives it the most left context."""
    n = len(ids)
    if n <= window:
        return [(0, n, 0)]
    out = []
    start = 0
    while True:
        end = min(start + window, n)
        keep_from = 0 if start == 0 else window - stride
        out.append((start, end, keep_from))
        if end == n:
            break
        start += stride
    return out


def build_contexts(tokenizer, text: str, mode: str = "sentence", window: int = 128, stride: int = 64):
    """Split a text into model contexts.

    Returns (contexts, rows): contexts are character spans; rows are
    (token ids, offsets, keep_from) per forward pass, where tokens before
    `keep_from` are context only (sliding windows) and not recorded.
    """
    if mode == "sentence":
        spans = split_sentences(text)
        rows = [(ids, offs, 0) for ids, offs in _encode_contexts(tokenizer, text, spans)]
        return spans, rows
    if mode == "window":
        if stride <= 0 or stride > window:
            raise CorpusError(f"window stride must be in 1..{window}, got {stride}")
        (ids, offs), = _encode_contexts(tokenizer, text, [(0, len(text))])
        rows, spans = [], []
        for a, b, keep in _windows(ids, offs, window, stride):
            rows.append((ids[a:b], offs[a:b], keep))
            spans.append((offs[a][0], offs[b - 1][1]))
        return spans, rows
    raise CorpusError(f"Unknown context mode '{mode}': use 'sentence' or 'window'.")


def _bos_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id


@torch.no_grad()
def collect(loaded: LoadedModel, text: str, mode: str = "sentence", layers: Sequence[int] | None = None,
            batch_size: int = 16, store_dtype: torch.dtype = torch.float32, window: int = 128, stride: int = 64,
            contexts: list[tuple[int, int]] | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> HiddenStates:
    """Hidden states H[l, t] of every token of `text`, stored on the CPU.

    Each context is fed as its own forward pass, with BOS when the tokenizer
    has one, so nothing crosses contexts. `contexts` overrides the split (e.g.
    one context per JSONL record).
    """
    if not text.strip():
        raise CorpusError("The corpus is empty: there is no text to read.")
    layout = loaded.layout
    layers = list(range(layout.n_states)) if layers is None else sorted(set(layers))
    bad = [l for l in layers if not 0 <= l <= layout.n_layers]
    if bad:
        raise CorpusError(f"Layers {bad} out of range: this model has hidden states 0..{layout.n_layers}.")
    tokenizer = loaded.tokenizer
    if contexts is not None:
        spans = contexts
        rows = [(ids, offs, 0) for ids, offs in _encode_contexts(tokenizer, text, spans)]
    else:
        spans, rows = build_contexts(tokenizer, text, mode, window, stride)
    # a context longer than the model's (BOS included) is read in overlapping windows of the context's size;
    # each token is kept from the window that gives it the most left context, so the table has no repeats
    limit = max(2, loaded.context_length - (1 if _bos_id(tokenizer) is not None else 0))
    split = 0
    fitted = []
    for ci, (ids, offs, keep) in enumerate(rows):
        if len(ids) <= limit:
            fitted.append((ids, offs, keep, ci))
            continue
        split += 1
        for a, b, keep_from in _windows(ids, offs, limit, max(1, limit // 2)):
            keep_from = max(keep_from, keep - a)  # a sliding-window row keeps its own context-only prefix
            if keep_from < b - a:
                fitted.append((ids[a:b], offs[a:b], keep_from, ci))
    rows = [r for r in fitted if r[0]]
    if not rows:
        raise CorpusError("The corpus has no tokens after splitting into contexts.")
    bos = _bos_id(tokenizer)
    lead = 1 if bos is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # longest first keeps padding small within a batch
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    chunks_by_row: dict[int, torch.Tensor] = {}
    total = sum(len(r[0]) for r in rows)
    done = 0
    device = loaded.device
    ensure_host_fits(total * len(layers) * layout.hidden_size * torch.tensor([], dtype=store_dtype).element_size(),
                     f"collecting the hidden states of {total} tokens at {len(layers)} layers")
    longest = max(len(r[0]) for r in rows) + lead
    ensure_fits(loaded, "collecting hidden states for", longest, batch=min(batch_size, len(rows)),
                kept_states=longest * len(layers) // layout.n_states)
    for b in range(0, len(order), batch_size):
        if should_stop is not None and should_stop():
            raise GenerationCancelled("Hidden-state collection cancelled; nothing was saved.")
        batch = [rows[i] for i in order[b:b + batch_size]]
        width = max(len(r[0]) for r in batch) + lead
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, (ids, _, _, _) in enumerate(batch):
            seq = ([bos] if lead else []) + ids
            input_ids[k, :len(seq)] = torch.tensor(seq)
            mask[k, :len(seq)] = 1
        try:
            with ResidualRecorder(layout, layers) as rec:
                # logits_to_keep=1: only the states are wanted, not (B, T, vocab) logits
                loaded.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False,
                             logits_to_keep=1)
            states = rec.states()  # (batch, width, S, d)
        except torch.cuda.OutOfMemoryError as err:
            raise DeviceMemoryError(out_of_memory_message("collecting hidden states", str(device))) from err
        states = states.to("cpu", store_dtype)
        for k, i in enumerate(order[b:b + batch_size]):
            n = len(rows[i][0])
            chunks_by_row[i] = states[k, lead + rows[i][2]:lead + n]
            done += n
        if progress is not None:
            progress(done, total)
    table = TokenTable()
    parts = []
    for i, (ids, offs, keep, ci) in enumerate(rows):
        parts.append(chunks_by_row[i])
        for p in range(keep, len(ids)):
            table.ids.append(ids[p])
            table.starts.append(offs[p][0])
            table.ends.append(offs[p][1])
            # a sliding window is not a context boundary: the text runs on (labels may shift across windows)
            table.context.append(0 if mode == "window" and contexts is None else ci)
            table.position.append(p)
    H = torch.cat(parts, dim=0)
    return HiddenStates(H=H, layers=layers, tokens=table, source=text, contexts=spans,
                        context_mode=mode if contexts is None else "records", model_name=loaded.name,
                        windowed_contexts=split, context_length=loaded.context_length)


def parse_layers(spec: str | None, n_states: int) -> list[int]:
    """'all', '3', '2-9', '0,5,10-12' or negative indices ('-1' = last) -> sorted layer list.

    Ranges are written low-high: '9-2' is refused, not flipped (see engine.validate).
    """
    from chunktui.engine.validate import layer_spec, layers_in_model

    spec = layer_spec(spec)
    if spec == "all":
        return list(range(n_states))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:(?:-|\.\.)\s*(-?\d+)\s*)?", part)
        a = int(m.group(1))
        a = a + n_states if a < 0 else a
        if m.group(2) is None:
            out.add(a)
            continue
        b = int(m.group(2))
        b = b + n_states if b < 0 else b
        if a > b:
            raise CorpusError(f"Bad layer spec '{spec}': write ranges low-high ({part.strip()} runs from {a} down "
                              f"to {b} in this model of hidden states 0..{n_states - 1}).")
        out.update(range(a, b + 1))
    layers_in_model(sorted(out), n_states, "Layers")
    return sorted(out)


def iter_jsonl(path) -> Iterable[tuple[int, dict]]:
    import json

    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from None
