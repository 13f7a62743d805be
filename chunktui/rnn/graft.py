"""Grafting in the RNN: write a chunk's state into the network, read what it predicts.

The state of a chunk prefix (say the state reached after reading 'A' inside
ABCD) is taken from the discretised trajectory: the most common DSC state at
that point of the word, turned back into a vector with each neuron at its
k-means centre. It is written into ``h_{t-1}`` and the CORRECT next input
symbol of the word ('B') is fed; the network should then predict the
continuation ('C'). (The authors' code fed the wrong input symbol here.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch

from chunktui.rnn.dsc import Discretiser
from chunktui.rnn.model import ReflectionRNN
from chunktui.rnn.sequences import PlantedSequence
from chunktui.rnn.train import Alphabet, Trajectory


def prefix_states(traj: Trajectory, seq: PlantedSequence, disc: Discretiser) -> dict[tuple[str, int], tuple]:
    """(word, i) -> the most common discrete state after reading ``word[:i]``,
    over every occurrence of ``word`` in the ground-truth parse."""
    tuples = disc.tuples(traj.states)
    seen: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for piece in seq.parse:
        word = "".join(piece.chunk)
        if word not in seq.words:
            continue
        for i in range(1, len(word) + 1):
            seen[(word, i)][tuples[piece.start + i - 1]] += 1
    return {key: c.most_common(1)[0][0] for key, c in seen.items()}


def entry_state(traj: Trajectory, seq: PlantedSequence, disc: Discretiser, word: str) -> tuple:
    """The most common discrete state just BEFORE ``word`` starts: the state the
    network reads the known word from."""
    tuples = disc.tuples(traj.states)
    c = Counter(tuples[p.start - 1] for p in seq.parse if "".join(p.chunk) == word and p.start > 0)
    if not c:
        raise ValueError(f"{word!r} never occurs after the first step")
    return c.most_common(1)[0][0]


@dataclass
class GraftReadout:
    word: str
    prefix: str        # the chunk prefix whose state is written in
    fed: str           # the next input symbol of the word (the correct one)
    target: str        # the continuation the word demands
    prob: float        # P(target | graft(prefix state), fed)
    top: str           # the most likely next symbol


def graft_words(model: ReflectionRNN, traj: Trajectory, seq: PlantedSequence,
                alphabet: Alphabet, disc: Discretiser) -> list[GraftReadout]:
    """For every planted word and every prefix that leaves a continuation:
    graft the prefix's state, feed the next symbol, read the prediction."""
    states = prefix_states(traj, seq, disc)
    out: list[GraftReadout] = []
    for (word, i), state in sorted(states.items()):
        if i + 1 >= len(word):
            continue
        vec = torch.tensor(disc.vector(state), dtype=model.W_h.dtype)
        fed, target = word[i], word[i + 1]
        probs = model.predict_from(vec, alphabet.symbols.index(fed))
        out.append(GraftReadout(word, word[:i], fed, target,
                                float(probs[alphabet.symbols.index(target)]),
                                alphabet.symbols[int(probs.argmax())]))
    return out


def summarise(readouts: list[GraftReadout]) -> dict:
    probs = np.array([r.prob for r in readouts])
    return {"n": len(readouts), "min_prob": float(probs.min()), "mean_prob": float(probs.mean()),
            "top_correct": float(np.mean([r.top == r.target for r in readouts])),
            "readouts": [asdict(r) for r in readouts]}
