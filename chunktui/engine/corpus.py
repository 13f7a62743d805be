"""A corpus's contexts and their hidden states: H[l, t] for every layer, over a whole text.

Hidden states are captured by `hooks.ResidualRecorder`. `collect` runs a corpus through the model in per-sentence contexts (the
paper's protocol) or sliding windows, batched, and returns one flat table of
tokens with their hidden states.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from chunktui.shared.errors import CorpusError, GenerationCancelled
from chunktui.engine.devices import out_of_memory
from chunktui.engine.allocator import keep_freed_memory, release_freed_memory
from chunktui.engine.memory import available_bytes, ensure_fits, ensure_host_fits
from chunktui.engine.hooks import ResidualRecorder
from chunktui.engine.layout import ModelLayout
from chunktui.engine.models import LoadedModel


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


@dataclass
class Corpus:
    """A text split into model contexts and tokenised, without running the model.

    `rows[i]` is one forward pass: (token ids, character offsets, keep_from,
    context index); its recorded tokens are rows[i] ids[keep_from:], and they
    are tokens `row_start[i]` .. `row_start[i] + n_kept - 1` of `tokens`.
    """

    source: str
    contexts: list[tuple[int, int]]
    rows: list[tuple[list[int], list[tuple[int, int]], int, int]]
    row_start: list[int]
    tokens: TokenTable
    context_mode: str
    windowed_contexts: int = 0  # contexts longer than the model's, read in overlapping windows
    context_length: int = 0

    def windowing_note(self) -> str | None:
        return HiddenStates.windowing_note(self)  # the same words for a corpus and its states

    @property
    def digest(self) -> str:
        return corpus_digest(self.source, self.context_mode)

    def token_rows(self) -> torch.Tensor:
        """(T,) index of the row each token was read in."""
        out = torch.empty(len(self.tokens), dtype=torch.long)
        for i, (ids, _, keep, _) in enumerate(self.rows):
            out[self.row_start[i]:self.row_start[i] + len(ids) - keep] = i
        return out


def prepare_corpus(tokenizer, text: str, mode: str = "sentence", window: int = 128, stride: int = 64,
                   contexts: list[tuple[int, int]] | None = None, context_length: int | None = None) -> Corpus:
    """Split and tokenise a corpus (no model): the token table labels are computed on.

    With `context_length` (the model's), a context longer than it is read in overlapping windows."""
    if not text.strip():
        raise CorpusError("The corpus is empty: there is no text to read.")
    if contexts is not None:
        spans = contexts
        rows = [(ids, offs, 0) for ids, offs in _encode_contexts(tokenizer, text, spans)]
    else:
        spans, rows = build_contexts(tokenizer, text, mode, window, stride)
    # a context longer than the model's (BOS included) is read in overlapping windows of the context's size;
    # each token is kept from the window that gives it the most left context, so the table has no repeats
    limit = max(2, context_length - (1 if _bos_id(tokenizer) is not None else 0)) if context_length else 1 << 62
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
    table = TokenTable()
    row_start = []
    for ids, offs, keep, ci in rows:
        row_start.append(len(table.ids))
        for p in range(keep, len(ids)):
            table.ids.append(ids[p])
            table.starts.append(offs[p][0])
            table.ends.append(offs[p][1])
            # a sliding window is not a context boundary: the text runs on (labels may shift across windows)
            table.context.append(0 if mode == "window" and contexts is None else ci)
            table.position.append(p)
    return Corpus(source=text, contexts=spans, rows=rows, row_start=row_start, tokens=table,
                  context_mode=mode if contexts is None else "records", windowed_contexts=split,
                  context_length=context_length or 0)


def schedule(corpus: Corpus, batch_size: int, rows: Sequence[int] | None = None) -> list[list[int]]:
    """Batches of row indices, longest first (little padding within a batch).

    The schedule depends only on the corpus, the batch size and the rows asked
    for, never on the number of processes: every rank computes each batch
    exactly as a single process would, so sharded results are bitwise equal.
    """
    if batch_size < 1:
        raise CorpusError(f"--batch-size must be at least 1, got {batch_size}.")
    rows = range(len(corpus.rows)) if rows is None else rows
    order = sorted(rows, key=lambda i: (-len(corpus.rows[i][0]), i))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


@torch.no_grad()
def run_batch(loaded: LoadedModel, corpus: Corpus, batch: Sequence[int], layers: Sequence[int]):
    """One forward pass over the rows in `batch`: (token indices (t,), states (t, S, d) on the model's device)."""
    layout = loaded.layout
    tokenizer = loaded.tokenizer
    bos = _bos_id(tokenizer)
    lead = 1 if bos is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [corpus.rows[i] for i in batch]
    width = max(len(r[0]) for r in rows) + lead
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (ids, _, _, _) in enumerate(rows):
        seq = ([bos] if lead else []) + ids
        input_ids[k, :len(seq)] = torch.tensor(seq)
        mask[k, :len(seq)] = 1
    device = loaded.device
    with out_of_memory("collecting hidden states", device):
        with ResidualRecorder(layout, layers) as rec:
            loaded.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False,
                         **_states_only(loaded.model))
        states = rec.states()  # (batch, width, S, d)
    parts, index = [], []
    for k, i in enumerate(batch):
        ids, _, keep, _ = corpus.rows[i]
        parts.append(states[k, lead + keep:lead + len(ids)])
        start = corpus.row_start[i]
        index.append(torch.arange(start, start + len(ids) - keep))
    return torch.cat(index), torch.cat(parts)


def _states_only(model) -> dict:
    """Only the hidden states are wanted: ask for the last position's logits only, where the model allows it."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def check_layers(layers: Sequence[int] | None, layout: ModelLayout) -> list[int]:
    layers = list(range(layout.n_states)) if layers is None else sorted(set(layers))
    bad = [l for l in layers if not 0 <= l <= layout.n_layers]
    if bad:
        raise CorpusError(f"Layers {bad} out of range: this model has hidden states 0..{layout.n_layers}.")
    return layers


@torch.no_grad()
def collect(loaded: LoadedModel, text: str, mode: str = "sentence", layers: Sequence[int] | None = None,
            batch_size: int = 16, store_dtype: torch.dtype = torch.float32, window: int = 128, stride: int = 64,
            contexts: list[tuple[int, int]] | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> HiddenStates:
    """Hidden states H[l, t] of every token of `text`, stored on the CPU (memory grows with the corpus).

    Each context is fed as its own forward pass, with BOS when the tokenizer
    has one, so nothing crosses contexts. `contexts` overrides the split (e.g.
    one context per JSONL record). Building and evaluating dictionaries stream
    instead (engine/build.py); this is for small texts, discovery and tests.
    """
    keep_freed_memory()  # a corpus job (engine/allocator.py)
    layers = check_layers(layers, loaded.layout)
    corpus = prepare_corpus(loaded.tokenizer, text, mode, window, stride, contexts,
                            context_length=loaded.context_length)
    T = len(corpus.tokens)
    longest = max(len(r[0]) for r in corpus.rows) + 1
    ensure_fits(loaded, "collecting hidden states for", longest, batch=min(batch_size, len(corpus.rows)),
                kept_states=longest * len(layers) // loaded.layout.n_states,  # refused up front, not half way
                cached=False)  # run_batch passes use_cache=False
    ensure_host_fits(T * len(layers) * loaded.hidden_size * torch.tensor([], dtype=store_dtype).element_size(),
                     f"collecting the hidden states of {T} tokens at {len(layers)} layers")
    H = torch.empty(T, len(layers), loaded.hidden_size, dtype=store_dtype)
    done = 0
    for batch in schedule(corpus, batch_size):
        if should_stop is not None and should_stop():
            raise GenerationCancelled("Hidden-state collection cancelled; nothing was saved.")
        index, states = run_batch(loaded, corpus, batch, layers)
        H[index] = states.to("cpu", store_dtype)
        done += len(index)
        if progress is not None:
            progress(done, T)
    return HiddenStates(H=H, layers=layers, tokens=corpus.tokens, source=text, contexts=corpus.contexts,
                        context_mode=corpus.context_mode, model_name=loaded.name,
                        windowed_contexts=corpus.windowed_contexts, context_length=corpus.context_length)


class StateCache:
    """Hidden states of a corpus on disk, in safetensors shards; read back one layer at a time.

    Shard i holds `index` (t,) token indices and `states` (t, S, d) float32.
    Reading a layer slices every shard (safetensors reads only that slice), so
    memory holds one layer, (T, d), never the corpus's (T, S, d).
    """

    def __init__(self, folder, layers: list[int], n_tokens: int, width: int, shards: list):
        self.folder, self.layers, self.n_tokens, self.width, self.shards = folder, layers, n_tokens, width, shards

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)

    def layer(self, layer: int) -> torch.Tensor:
        from safetensors import safe_open

        s = self.layers.index(layer)
        out = torch.empty(self.n_tokens, self.width)
        for path in self.shards:
            with safe_open(str(path), "pt") as fh:
                index = fh.get_tensor("index")
                out[index] = fh.get_slice("states")[:, s:s + 1].squeeze(1)
        return out


@torch.no_grad()
def cache_states(loaded: LoadedModel, corpus: Corpus, layers: Sequence[int], folder, batch_size: int = 16,
                 shard_bytes: int = 1 << 28, progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> StateCache:
    """Stream the corpus through the model once, writing its states to safetensors shards in `folder`."""
    from pathlib import Path

    from safetensors.torch import save

    from chunktui.shared.io import atomic_write_bytes

    keep_freed_memory()  # a corpus job (engine/allocator.py)

    folder = Path(folder)
    layers = check_layers(layers, loaded.layout)
    per_token = len(layers) * loaded.hidden_size * 4
    shards, index_parts, state_parts, held, done = [], [], [], 0, 0
    T = len(corpus.tokens)

    def flush():
        nonlocal held
        if not index_parts:
            return
        path = folder / f"states-{len(shards):05d}.safetensors"
        atomic_write_bytes(path, save({"index": torch.cat(index_parts), "states": torch.cat(state_parts)}))
        shards.append(path)
        index_parts.clear()
        state_parts.clear()
        held = 0

    for batch in schedule(corpus, batch_size):
        if should_stop is not None and should_stop():
            raise GenerationCancelled("Hidden-state collection cancelled.")
        index, states = run_batch(loaded, corpus, batch, layers)
        index_parts.append(index)
        state_parts.append(states.to("cpu", torch.float32))
        held += len(index) * per_token
        done += len(index)
        if held >= shard_bytes:
            flush()
        if progress is not None:
            progress(done, T)
    flush()
    return StateCache(folder, layers, T, loaded.hidden_size, shards)


def _is_tmpfs(path) -> bool:
    """True when `path` lies on a RAM-backed file system (tmpfs), from /proc/mounts (False when unknown)."""
    import os

    try:
        real = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, parts[2]
        return kind in ("tmpfs", "ramfs")
    except OSError:
        return False


MEMORY = "memory"  # `BatchStates.choose_folder`'s answer for states held in the process itself


class BatchStates:
    """The states one pass computed, batch by batch, for a later pass over the same batches.

    The build's pass 2 reads back the batches pass 1 ran, and pass 3 (the colour rule) reads back every
    batch: the bytes are the very ones the model gave (a forward over the same batch gives the same bytes,
    so the results are identical to running it again). Where they are kept (`choose_folder`):

    - in this process's memory, when all of them take at most a third of the memory available at the
      start: the very tensors the pass computed, kept by reference (no copy, no file; counted in the
      process's RSS). Writing them to a file costs kernel time to take the pages (on this project's 2-core
      machine about 2.3 s per GiB, RAM-backed /dev/shm included: a tenth of the forward pass, taken from
      the cores the model runs on) and reading them back copies them again;
    - else as raw files in a temporary folder ($CHUNKTUI_STATES_DIR, or the default temporary folder),
      removed by `close`, written by one background thread while the model runs on; at most `pending`
      batches wait to be written, so memory stays at a few batches. They are read back by mapping the file
      (no copy). Nothing corpus-sized is held in memory then.

    The token indices stay in memory (8 bytes a token). A batch that was never put (no room or memory
    left, a resumed build's batches before the checkpoint) or whose write failed reads back as None, and
    the caller runs the model for it as before.

    The caller must not modify a batch's states after `put`, nor the states `get` returns (the build's
    passes only read them).
    """

    def __init__(self, folder=None, keep_free_bytes: int = 2 << 30, pending: int = 2, expected_bytes: int = 0):
        import tempfile
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path

        if folder is None:
            folder = self.choose_folder(expected_bytes)
        self.held = folder == MEMORY  # kept in this process, by reference
        self.folder = None if self.held else Path(tempfile.mkdtemp(prefix="chunktui-states.", dir=folder))
        self.in_memory = self.held or _is_tmpfs(self.folder)  # RAM: also watch the memory left, not only the room
        self.keep_free = keep_free_bytes
        self.pending = max(1, pending)
        self.stored: set[int] = set()
        self.full = False  # set when the disk or memory had no room for a batch: later batches are not kept
        self.bytes = 0
        self._meta: dict[int, tuple[torch.Tensor, torch.dtype, tuple[int, ...]]] = {}
        self._held: dict[int, torch.Tensor] = {}
        self._writes: dict = {}  # key -> Future of its write
        self._queue: list[int] = []  # keys whose write may not have finished, oldest first
        self._sizes: dict[int, int] = {}
        self._pool = None if self.held else ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunktui-states")

    @property
    def where(self) -> str:
        """Where the states are kept, for reports: "memory" (this process) or the folder."""
        return MEMORY if self.held else str(self.folder.parent)

    @staticmethod
    def choose_folder(expected_bytes: int):
        """Where the states go: $CHUNKTUI_STATES_DIR if set; else this process's memory (`MEMORY`) when all of
        them take at most a third of the memory available now; else the default temporary folder (None), on
        disk, for corpora too big for memory."""
        import os

        chosen = os.environ.get("CHUNKTUI_STATES_DIR", "").strip()
        if chosen:
            return chosen
        if expected_bytes <= 0:
            return None
        free = available_bytes("cpu")
        if free is None or expected_bytes > free // 3:
            return None
        return MEMORY

    def _path(self, key: int):
        return self.folder / f"{int(key):07d}.states"

    @staticmethod
    def _write(path, states: torch.Tensor) -> None:
        # raw bytes, whatever the dtype (bfloat16 has no numpy type): a uint8 view of the contiguous tensor;
        # an unbuffered write releases the GIL while the kernel copies and the disk catches up
        data = states.view(torch.uint8).numpy()
        with open(path, "wb", buffering=0) as f:
            view, done = memoryview(data).cast("B"), 0
            while done < len(view):
                done += f.write(view[done:])

    def _wait(self, keep: int) -> None:
        """Let at most `keep` writes stay queued."""
        while len(self._queue) > keep:
            key = self._queue.pop(0)
            try:
                self._writes[key].result()
            except Exception:  # noqa: BLE001 - an unwritten batch is run again by the reader; nothing is lost
                self._forget(key)

    def discard(self, key: int) -> None:
        """Let a batch go once no later pass needs it (its memory, or its file); it reads back as None then."""
        key = int(key)
        future = self._writes.get(key)
        if future is not None:
            try:
                future.result()  # let its write finish before its file is removed
            except Exception:  # noqa: BLE001 - unwritten: nothing to remove but the entry
                pass
            if key in self._queue:
                self._queue.remove(key)
        self._forget(key)

    def _forget(self, key: int) -> None:
        self.stored.discard(key)
        self._writes.pop(key, None)
        self._meta.pop(key, None)
        self._held.pop(key, None)
        if not self.held:
            self._path(key).unlink(missing_ok=True)

    def put(self, key: int, index: torch.Tensor, states: torch.Tensor) -> bool:
        """Keep one batch's (token indices, states); False (and nothing kept) when the disk or memory is short."""
        import shutil

        if self.full:
            return False
        key = int(key)
        size = states.numel() * states.element_size() + index.numel() * 8
        if self.held:
            free = available_bytes("cpu")
            if free is not None and free < size + self.keep_free:
                self.full = True
                return False
            self._meta[key] = (index.detach().cpu().clone(), states.dtype, tuple(states.shape))
            self._held[key] = states.detach().cpu().contiguous()  # the same tensor on a CPU: no copy
            self.stored.add(key)
            self.bytes += size
            return True
        self._wait(self.pending - 1)
        waiting = sum(self._sizes[k] for k in self._queue)  # queued, not yet on the disk
        short = shutil.disk_usage(self.folder).free < size + waiting + self.keep_free
        if self.in_memory and not short:  # RAM-backed: the memory left matters, not only the file system's room
            free = available_bytes("cpu")
            short = free is not None and free < size + waiting + self.keep_free
        if short:
            self.full = True
            return False
        states = states.detach().contiguous().cpu()
        self._meta[key] = (index.detach().cpu().clone(), states.dtype, tuple(states.shape))
        self._writes[key] = self._pool.submit(self._write, self._path(key), states)
        self._queue.append(key)
        self._sizes[key] = size
        self.stored.add(key)
        self.bytes += size
        return True

    def get(self, key: int, device=None):
        """(token indices, states) of a batch put under `key`, on `device`; None if it was not kept.

        The states are the kept tensor itself (held) or a read-only view of its file (mapped): read them only."""
        key = int(key)
        if key not in self.stored:
            return None
        index, dtype, shape = self._meta[key]
        if self.held:
            states = self._held[key]
        else:
            try:
                self._writes[key].result()
            except Exception:  # noqa: BLE001 - as in `_wait`
                self._forget(key)
                return None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            path = self._path(key)
            try:
                if path.stat().st_size != nbytes:  # cut short
                    raise OSError(path)
                # mapped, not read: the pages the file system already holds, without a copy (MAP_PRIVATE)
                states = torch.from_file(str(path), shared=False, size=nbytes, dtype=torch.uint8).view(dtype)
                states = states.view(shape)
            except (OSError, RuntimeError):  # gone or unreadable: run the model for it instead
                self._forget(key)
                return None
        return index.clone(), (states if device is None else states.to(device))

    def close(self) -> None:
        import shutil

        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.stored.clear()
        self._meta.clear()
        self._held.clear()
        self._writes.clear()
        self._queue.clear()
        if self.held and self.bytes:
            release_freed_memory()  # the kept states' memory goes back to the system
