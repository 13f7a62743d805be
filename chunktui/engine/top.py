"""Where a chunk fires: the contexts of a corpus in which chosen chunks match most strongly.

As max-activating examples are shown elsewhere, but for chunks: every
context of the corpus runs through the model once (streaming, batched; no
corpus-sized state is kept), the chunks are matched with the one packed
matcher (`matching.py`, so the matches agree with the app and `scan`), and
per context only the best token of each *unit* is kept:

- a unit is one chunk (`label@layer`), or a concept (its chunks at several layers);
- a token fires for a unit when at least one of the unit's chunks matches it;
- tokens rank by the number of the unit's layers that match (agreement), then by
  the best matching score, score = the matcher's (ln(threshold/deviation) for PA,
  ln(cosine/threshold) for directions: > 0 inside the threshold); for a concept the
  best is taken over layers 1 and up when any of them matches (layer 0, the
  embedding, matches a word's own text exactly and would win every tie);
- one example per context (its best token), the best `k` contexts returned.

Memory: per (context, unit) five numbers. The app asks for every chunk and every
concept of the dictionary at once, so later choices are answered from the tables.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from chunktui.engine.dictionary import Chunk, ChunkDictionary
from chunktui.engine.matching import PackedDictionary
from chunktui.shared.errors import ChunkError, GenerationCancelled
from chunktui.shared.protocol import TopExample

AGREE = 1000.0  # rank key: agreement * AGREE + best score (scores are clipped to +-SCORE_CLIP)
SCORE_CLIP = 999.0
MAX_CELLS = 20_000_000  # (contexts x units) kept at most; beyond it only the asked units are kept
SNIPPET = 60  # characters of context either side of the token


def resolve_units(dictionary: ChunkDictionary, name: str, layers: Sequence[int] | None = None) -> list[Chunk]:
    """The chunks a name stands for: a chunk id (label@layer), or a label (its chunks at `layers`, else all)."""
    name = name.strip()
    if not name:
        raise ChunkError("Name a chunk: a label (cheese) or a chunk id (cheese@5).")
    chunks = [c for c in dictionary.chunks if c.id == name]
    if chunks:
        if layers is not None and chunks[0].layer not in layers:
            raise ChunkError(f"{name} is at layer {chunks[0].layer}, not in the layers asked for ({_spell(layers)}).")
        return chunks
    chunks = [c for c in dictionary.chunks if c.label == name]
    if not chunks:
        chunks = [c for c in dictionary.chunks if c.label.lower() == name.lower()]
    if not chunks:
        near = sorted({c.label for c in dictionary.chunks if name.lower()[:3] in c.label.lower()})[:6]
        hint = f" Similar: {', '.join(near)}." if near else ""
        raise ChunkError(f"'{name}' is neither a label nor a chunk id of this dictionary.{hint}")
    if layers is not None:
        at = [c for c in chunks if c.layer in set(layers)]
        if not at:
            have = sorted(c.layer for c in chunks)
            raise ChunkError(f"'{name}' has no chunk at layers {_spell(layers)} (it has layers {_spell(have)}).")
        chunks = at
    return chunks


def _spell(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 3 and layers == list(range(layers[0], layers[-1] + 1)) \
        else ", ".join(map(str, layers))


@dataclass
class TopTables:
    """Per context (row of the corpus) and unit: the best token, its key, score, value and the chunk that scored."""

    corpus: object  # engine.corpus.Corpus
    names: list[str]  # unit names
    members: list[list[int]]  # unit -> chunk columns of `chunks`
    chunks: list[Chunk]
    key: torch.Tensor  # (R, U) float64 rank key, -inf: nothing fires in that row
    token: torch.Tensor  # (R, U) long, corpus token index of the best token
    score: torch.Tensor  # (R, U) float32, best matching score at that token
    value: torch.Tensor  # (R, U) float32, its deviation (PA) or cosine
    column: torch.Tensor  # (R, U) long, the chunk (column) that scored it
    agree: torch.Tensor  # (R, U) int, the unit's chunks matching that token
    in_row: torch.Tensor  # (R, U) int, firing tokens of the unit in the row
    matches: torch.Tensor  # (U,) firing tokens over the corpus
    seconds: float

    @property
    def tokens(self) -> int:
        return len(self.corpus.tokens)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ChunkError(f"'{name}' was not searched in this corpus.") from None

    def layers(self, name: str) -> list[int]:
        return sorted({self.chunks[c].layer for c in self.members[self.index(name)]})

    def examples(self, name: str, k: int = 10, chars: int = SNIPPET) -> list[TopExample]:
        u = self.index(name)
        key = self.key[:, u]
        n = int(torch.isfinite(key).sum())
        if n == 0:
            return []
        order = key.argsort(descending=True, stable=True)[:n].tolist()
        tokens = self.corpus.tokens
        out, shown = [], set()
        for r in order:
            if len(out) >= k:
                break
            t = int(self.token[r, u])
            chunk = self.chunks[int(self.column[r, u])]
            a, b = tokens.starts[t], tokens.ends[t]
            ca, cb = self.corpus.contexts[self.corpus.rows[r][3]]
            before, token, after = snippet(self.corpus.source, a, b, ca, cb, chars)
            if (before, token, after) in shown:  # a context repeated word for word is shown once
                continue
            shown.add((before, token, after))
            out.append(TopExample(chunk_id=chunk.id, label=chunk.label, layer=int(chunk.layer),
                                  score=float(self.score[r, u]), value=float(self.value[r, u]),
                                  agree=int(self.agree[r, u]), layers=len(self.members[u]),
                                  in_context=int(self.in_row[r, u]), token=token, before=before, after=after,
                                  token_index=t, start=a, end=b))
        return out


def snippet(source: str, a: int, b: int, lo: int, hi: int, chars: int = SNIPPET) -> tuple[str, str, str]:
    """The token source[a:b] with up to `chars` characters either side, within its context [lo, hi)."""
    lo, hi = min(lo, a), max(hi, b)
    start, end = max(lo, a - chars), min(hi, b + chars)
    flat = lambda s: " ".join(s.split("\n")) if "\n" in s else s  # noqa: E731
    before = ("…" if start > lo else "") + flat(source[start:a])
    after = flat(source[b:end]) + ("…" if end < hi else "")
    return before, flat(source[a:b]), after


def all_units(dictionary: ChunkDictionary) -> dict[str, list[Chunk]]:
    """Every chunk on its own (by id) and every label (its chunks at all layers)."""
    units: dict[str, list[Chunk]] = {c.id: [c] for c in dictionary.chunks}
    labels: dict[str, list[Chunk]] = {}
    for c in dictionary.chunks:
        labels.setdefault(c.label, []).append(c)
    for label, chunks in labels.items():
        units.setdefault(label, chunks)
    return units


@torch.no_grad()
def top_tables(loaded, dictionary: ChunkDictionary, text: str, units: dict[str, list[Chunk]],
               batch_size: int = 16, context_mode: str | None = None,
               progress: Callable[[float, str], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               extra: dict[str, list[Chunk]] | None = None) -> TopTables:
    """One pass over `text`: per context the best token of every unit (see the module's docstring).

    `extra` units are searched too when their tables stay under MAX_CELLS (the app's engine asks for every
    chunk and label of the dictionary, so that later questions need no pass)."""
    from chunktui.engine.corpus import check_layers, prepare_corpus, run_batch, schedule

    if not units:
        raise ChunkError("No chunk to search for.")
    dictionary.check_compatible(loaded.identity())
    mode = context_mode or dictionary.notes.get("context_mode", "sentence")
    mode = mode if mode in ("sentence", "window") else "sentence"
    corpus = prepare_corpus(loaded.tokenizer, text, mode, context_length=loaded.context_length)
    if extra and len(corpus.rows) * (len(units) + len(extra)) <= MAX_CELLS:
        units = dict(units) | {name: chunks for name, chunks in extra.items() if name not in units}
    chunks: list[Chunk] = []
    seen: dict[int, int] = {}
    for members in units.values():
        for c in members:
            if id(c) not in seen:
                seen[id(c)] = len(chunks)
                chunks.append(c)
    layers = check_layers(sorted({c.layer for c in chunks}), loaded.layout)
    packed = PackedDictionary(chunks, loaded.hidden_size, layers, device=loaded.device)
    order = {id(c): i for i, c in enumerate(packed.chunks)}  # the pack's column of each chunk
    names = list(units)
    members = [[order[id(c)] for c in units[n]] for n in names]
    U, C, R = len(names), len(packed.chunks), len(corpus.rows)
    single = all(len(m) == 1 for m in members)
    # unit membership (U, C): agreement counts by one matmul
    M = torch.zeros(U, C)
    for u, cols in enumerate(members):
        M[u, cols] = 1.0
    key = torch.full((R, U), -math.inf, dtype=torch.float64)
    token = torch.zeros(R, U, dtype=torch.long)
    score = torch.zeros(R, U)
    value = torch.zeros(R, U)
    column = torch.zeros(R, U, dtype=torch.long)
    agree = torch.zeros(R, U, dtype=torch.int32)
    in_row = torch.zeros(R, U, dtype=torch.int32)
    matches = torch.zeros(U, dtype=torch.long)
    # a unit's best chunk at a token is taken from layers >= 1 when any of them matches: layer 0 (the embedding)
    # matches the token's own text, a lookup, and would win every tie with its exact template
    split = [(torch.tensor([c for c in cols if packed.chunks[c].layer != 0], dtype=torch.long),
              torch.tensor([c for c in cols if packed.chunks[c].layer == 0], dtype=torch.long)) for cols in members]
    row_of = corpus.token_rows()
    batches = schedule(corpus, batch_size)
    T, done, start = len(corpus.tokens), 0, time.perf_counter()
    for batch in batches:
        if should_stop is not None and should_stop():
            raise GenerationCancelled("Search cancelled.")
        index, states = run_batch(loaded, corpus, batch, layers)
        result = packed.match(states)
        hit = result.hit.cpu()
        s = result.score.float().cpu()
        v = result.value.float().cpu()
        t = len(index)
        hit_score = torch.where(hit, s, torch.tensor(-math.inf))
        if single:
            cols = torch.tensor([m[0] for m in members])
            n_agree = hit[:, cols].int()
            best, best_col = hit_score[:, cols], cols.expand(t, U)
        else:
            n_agree = (hit.float() @ M.T).round().int()  # (t, U)
            best = torch.full((t, U), -math.inf)
            best_col = torch.zeros(t, U, dtype=torch.long)
            for u, (inner, embed) in enumerate(split):
                b, j = hit_score[:, inner].max(1) if len(inner) else (best[:, u], best_col[:, u])
                best[:, u], best_col[:, u] = b, inner[j] if len(inner) else j
                if len(embed):  # layer 0 only where no other layer of the unit matches
                    b0, j0 = hit_score[:, embed].max(1)
                    use0 = ~torch.isfinite(best[:, u])
                    best[:, u] = torch.where(use0, b0, best[:, u])
                    best_col[:, u] = torch.where(use0, embed[j0], best_col[:, u])
        fires = n_agree > 0
        k = torch.where(fires, n_agree.double() * AGREE + best.double().clamp(-SCORE_CLIP, SCORE_CLIP),
                        torch.tensor(-math.inf, dtype=torch.float64))
        rows = row_of[index]  # (t,)
        matches += fires.sum(0)
        in_row.index_add_(0, rows, fires.int())
        key.scatter_reduce_(0, rows.unsqueeze(1).expand(t, U), k, "amax")  # a row lies in one batch: final
        winner = (k == key[rows]) & fires  # (t, U): the tokens that hold their row's best key
        ti, ui = winner.nonzero(as_tuple=True)
        if len(ti):
            # one token per (row, unit); on a tie the earliest token of the row
            pair = rows[ti] * U + ui
            groups, inverse = torch.unique(pair, return_inverse=True)
            first = torch.full((len(groups),), t, dtype=torch.long).scatter_reduce(0, inverse, ti, "amin")
            r, uu = groups // U, groups % U
            c = best_col[first, uu]
            token[r, uu] = index[first]
            column[r, uu] = c
            score[r, uu] = s[first, c]
            value[r, uu] = v[first, c]
            agree[r, uu] = n_agree[first, uu]
        done += t
        if progress is not None:
            elapsed = time.perf_counter() - start
            rate = done / elapsed if elapsed > 0 else 0.0
            progress(done / T, f"{done}/{T} tokens, {rate:.0f} tok/s")
    # columns index the pack; examples read chunks by column
    return TopTables(corpus=corpus, names=names, members=members, chunks=packed.chunks, key=key, token=token,
                     score=score, value=value, column=column, agree=agree, in_row=in_row, matches=matches,
                     seconds=time.perf_counter() - start)
