"""Longest-match parsing of a sequence into chunks.

Used twice: for the ground-truth parse of a generated symbol sequence (chunks
are the planted words) and for DSC's parse of a state sequence (chunks are
tuples of state ids). Both are "at every position take the longest chunk in
the vocabulary that matches here; if none matches, take the single item".
The authors' ground-truth parse was not longest-match; ours is.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """One token of a parse: items ``seq[start:end]`` form ``chunk``."""

    start: int
    end: int
    chunk: tuple

    def __len__(self) -> int:
        return self.end - self.start


def longest_match_parse(seq: Sequence[Hashable], vocabulary: Iterable[Sequence[Hashable]]) -> list[Piece]:
    """Greedy left-to-right longest-match parse.

    ``vocabulary`` holds chunks (sequences of items; strings work for symbol
    sequences). An item that starts no chunk becomes a one-item piece, so the
    parse always covers ``seq`` exactly.
    """
    chunks = {tuple(c) for c in vocabulary if len(c) > 0}
    # Per first item, the lengths of the multi-item chunks that start with it, longest first:
    # each position tries only those (O(len(seq) * lengths per item)).
    by_first: dict[Hashable, list[int]] = {}
    for c in chunks:
        if len(c) > 1:
            by_first.setdefault(c[0], []).append(len(c))
    for first, lengths in by_first.items():
        by_first[first] = sorted(set(lengths), reverse=True)
    items = tuple(seq)
    n = len(items)
    pieces: list[Piece] = []
    i = 0
    while i < n:
        length = 1
        for cand in by_first.get(items[i], ()):
            if i + cand <= n and items[i : i + cand] in chunks:
                length = cand
                break
        pieces.append(Piece(i, i + length, items[i : i + length]))
        i += length
    return pieces
