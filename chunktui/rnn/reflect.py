"""Reflection measures: what the discretised state says about the input.

* decoding: a lookup table state -> symbol, fit on the first part of a run
  (k-means fit there too), predicts the CURRENT input symbol on the rest.
  A state never seen in the fit part has no entry and counts as WRONG.
* number of unique states (and of recurring ones, seen at least twice), DSC
  chunk vocabulary size, DSC parse length versus
  the ground-truth parse length (longest match with the planted words; each
  filler symbol is a one-symbol token) and the number of planted words.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from chunktui.rnn.dsc import DSC, ChunkParams, Discretiser
from chunktui.rnn.sequences import PlantedSequence
from chunktui.rnn.train import Trajectory


@dataclass
class Decoding:
    accuracy: float          # on the held-out part; unseen states count as wrong
    unseen_fraction: float   # held-out steps whose state never occurred in the fit part
    chance: float            # always answering the fit part's most frequent symbol
    n_fit: int
    n_test: int


def decode_current_symbol(states: np.ndarray, symbols: np.ndarray, k: int = 4,
                          fit_fraction: float = 0.5, kmeans: str = "exact") -> Decoding:
    """Fit k-means and a state->symbol table on the first ``fit_fraction`` of
    the run (states (T,H), symbols (T,)), test on the rest."""
    T = len(symbols)
    n_fit = int(T * fit_fraction)
    if not 0 < n_fit < T:
        raise ValueError("fit_fraction must leave steps on both sides")
    disc = Discretiser.fit(states[:n_fit], k, method=kmeans)
    tuples = disc.tuples(states)
    votes: dict[tuple, Counter] = defaultdict(Counter)
    for t in range(n_fit):
        votes[tuples[t]][int(symbols[t])] += 1
    # Most frequent symbol per state; ties to the lower symbol id (deterministic).
    table = {s: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for s, c in votes.items()}
    test = range(n_fit, T)
    correct = sum(table.get(tuples[t]) == int(symbols[t]) for t in test)
    unseen = sum(tuples[t] not in table for t in test)
    majority = Counter(int(s) for s in symbols[:n_fit]).most_common(1)[0][0]
    chance = float(np.mean(symbols[n_fit:] == majority))
    n_test = T - n_fit
    return Decoding(correct / n_test, unseen / n_test, chance, n_fit, n_test)


@dataclass
class Reflection:
    decoding: Decoding
    unique_states: int
    recurring_states: int     # distinct states that occur at least twice in the run
    vocabulary_size: int      # distinct chunks in DSC's final parse
    learned_chunks: int       # chunks DSC added (multi-state)
    parse_length: int         # DSC parse length over the run
    ground_truth_parse_length: int
    planted_words: int
    next_symbol_accuracy: float

    @property
    def parse_ratio(self) -> float:
        """DSC parse length / ground-truth parse length (planted words plus one token per filler)."""
        return self.parse_length / self.ground_truth_parse_length

    @property
    def parse_to_planted(self) -> float:
        """DSC parse length / number of planted words: the paper's comparison (1580 vs 1501)."""
        return self.parse_length / self.planted_words

    def to_json(self) -> dict:
        d = asdict(self)
        d["decoding_accuracy"] = self.decoding.accuracy
        d["parse_ratio"] = self.parse_ratio
        d["parse_to_planted"] = self.parse_to_planted
        return d


def reflect(traj: Trajectory, seq: PlantedSequence, k: int = 4,
            params: ChunkParams | None = None, fit_fraction: float = 0.5,
            kmeans: str = "exact") -> tuple[Reflection, DSC]:
    """All reflection measures for one network's run over ``seq`` (``kmeans``: exact or robust)."""
    dec = decode_current_symbol(traj.states, traj.symbols, k, fit_fraction, kmeans)
    dsc = DSC.run(traj.states, k, params, kmeans=kmeans)
    recurring = int((np.bincount(dsc.ids) >= 2).sum())
    ref = Reflection(dec, dsc.n_states, recurring, len(dsc.chunks.vocabulary), len(dsc.chunks.learned),
                     dsc.chunks.parse_length, len(seq.parse), seq.n_planted, traj.accuracy)
    return ref, dsc
