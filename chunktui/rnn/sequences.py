"""Seeded generators of symbol sequences with planted words.

Three kinds, all built by the same loop (pick a word, write it, then write a
run of 0..max_filler filler symbols 'E'):

* flat: independent words, e.g. ABCD, GHI, JKLMN, chosen uniformly;
* context: words that share a sub-word (e.g. BC inside ABCD and XBCY), chosen
  with given probabilities, so what follows the shared part depends on context;
* hierarchical: new words made by concatenating earlier ones, up to a depth.

Each returns a :class:`PlantedSequence` holding the symbols and the
ground-truth parse: the LONGEST-match parse with the planted words (plus
single symbols) as vocabulary. Where consecutive planted words happen to spell
a longer planted word (possible in the hierarchical task), the longest-match
parse reads the longer word.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from chunktui.rnn.parse import Piece, longest_match_parse

FILLER = "E"
FLAT_WORDS: tuple[str, ...] = ("ABCD", "GHI", "JKLMN")
CONTEXT_WORDS: tuple[str, ...] = ("ABCD", "XBCY", "GBCH")
CONTEXT_PROBS: tuple[float, ...] = (0.4, 0.3, 0.3)


@dataclass
class PlantedSequence:
    symbols: str
    words: tuple[str, ...]            # the planted vocabulary (every level for hierarchical)
    generated: list[str]              # the words in the order they were written
    filler: str = FILLER
    parse: list[Piece] = field(default_factory=list)  # longest-match ground truth

    @property
    def alphabet(self) -> list[str]:
        return sorted(set(self.symbols) | set("".join(self.words)) | {self.filler})

    @property
    def n_planted(self) -> int:
        """How many planted words the generator wrote."""
        return len(self.generated)

    @property
    def parse_words(self) -> list[str]:
        """Ground-truth parse as strings (filler symbols are one-symbol tokens)."""
        return ["".join(p.chunk) for p in self.parse]

    @property
    def word_counts(self) -> dict[str, int]:
        """How often each planted word appears in the ground-truth parse."""
        counts = Counter(w for w in self.parse_words if w in self.words)
        return dict(sorted(counts.items()))


def _write(words: list[str], probs: np.ndarray, n_words: int, max_filler: int,
           rng: np.random.Generator, filler: str) -> tuple[str, list[str]]:
    parts: list[str] = []
    generated: list[str] = []
    for _ in range(n_words):
        word = words[int(rng.choice(len(words), p=probs))]
        generated.append(word)
        parts.append(word)
        parts.append(filler * int(rng.integers(0, max_filler + 1)))  # 0..max_filler inclusive
    return "".join(parts), generated


def planted_sequence(words: tuple[str, ...] | list[str], n_words: int, *, probs=None,
                     max_filler: int = 9, seed: int = 0, filler: str = FILLER,
                     vocabulary=None) -> PlantedSequence:
    """Words drawn i.i.d. (uniform unless ``probs``), each followed by 0..max_filler fillers.

    ``vocabulary`` (default: ``words``) is what the ground-truth parse knows.
    """
    words = list(words)
    if any(filler in w for w in words):
        raise ValueError(f"filler {filler!r} must not occur inside a planted word")
    p = np.full(len(words), 1.0 / len(words)) if probs is None else np.asarray(probs, float)
    if p.shape != (len(words),) or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError("probs must be one non-negative probability per word, summing to 1")
    rng = np.random.default_rng(seed)
    symbols, generated = _write(words, p / p.sum(), n_words, max_filler, rng, filler)
    vocab = tuple(vocabulary) if vocabulary is not None else tuple(words)
    seq = PlantedSequence(symbols, vocab, generated, filler)
    seq.parse = longest_match_parse(symbols, list(vocab))
    return seq


def flat_sequence(n_words: int = 400, *, words=FLAT_WORDS, max_filler: int = 9,
                  seed: int = 0) -> PlantedSequence:
    """The paper's task: ABCD, GHI, JKLMN chosen at random, each followed by 0-9 'E'."""
    return planted_sequence(words, n_words, max_filler=max_filler, seed=seed)


def context_sequence(n_words: int = 400, *, words=CONTEXT_WORDS, probs=CONTEXT_PROBS,
                     max_filler: int = 9, seed: int = 0) -> PlantedSequence:
    """Words sharing a sub-word (default 'BC' in ABCD, XBCY, GBCH) with given probabilities."""
    return planted_sequence(words, n_words, probs=probs, max_filler=max_filler, seed=seed)


def hierarchical_words(base=("AB", "CD", "GH"), depth: int = 2, per_level: int = 2,
                       seed: int = 0) -> list[list[str]]:
    """Levels of words: level 0 is ``base``; each later level adds ``per_level`` new words,
    each the concatenation of two distinct-or-not words drawn from all earlier levels."""
    rng = np.random.default_rng(seed)
    levels = [list(base)]
    known = list(base)
    for _ in range(depth):
        level: list[str] = []
        tries = 0
        while len(level) < per_level:
            tries += 1
            if tries > 1000:
                raise ValueError("could not make enough distinct new words")
            a, b = rng.choice(len(known), size=2)
            word = known[int(a)] + known[int(b)]
            if word not in known and word not in level:
                level.append(word)
        levels.append(level)
        known.extend(level)
    return levels


def hierarchical_sequence(n_words: int = 400, *, base=("AB", "CD", "GH"), depth: int = 2,
                          per_level: int = 2, max_filler: int = 9, seed: int = 0) -> PlantedSequence:
    """Words from every level (uniform over all of them) separated by fillers; the
    ground-truth parse knows every level, so it reads the deepest word that fits."""
    levels = hierarchical_words(base, depth, per_level, seed)
    words = [w for level in levels for w in level]
    return planted_sequence(words, n_words, max_filler=max_filler, seed=seed + 1)
