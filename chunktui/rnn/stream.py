"""Engine-style API: run the RNN like a language model, one step at a time.

``stream(model, symbols, alphabet)`` yields a :class:`Step` per input symbol:
the symbol, the hidden state before and after it, and the predicted
distribution of the next symbol. ``chunk_per_step`` names the DSC chunk each
step's state belongs to. No UI imports here: a terminal app consumes these.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from chunktui.rnn.dsc import DSC, ChunkParams
from chunktui.rnn.model import ReflectionRNN
from chunktui.rnn.parse import longest_match_parse
from chunktui.rnn.train import Alphabet


@dataclass
class Step:
    t: int
    symbol: str
    state_before: np.ndarray        # (H,) h_{t-1}
    state: np.ndarray               # (H,) h_t, after reading the symbol
    next_probs: dict[str, float]    # P(symbol t+1), from [x_t; h_{t-1}]

    @property
    def predicted(self) -> str:
        return max(self.next_probs, key=self.next_probs.get)


@torch.no_grad()
def stream(model: ReflectionRNN, symbols: Iterable[str], alphabet: Alphabet,
           state: np.ndarray | None = None, replica: int = 0) -> Iterator[Step]:
    """Feed ``symbols`` one by one (lazily: works on an endless iterator)."""
    net = model if model.replicas == 1 else model.replica(replica)
    h = net.init_state(1) if state is None else torch.as_tensor(state, dtype=net.W_h.dtype).view(1, 1, -1)
    for t, sym in enumerate(symbols):
        h_next, logits = advance(net, alphabet.symbols.index(sym), h)
        probs = torch.softmax(logits, -1)
        yield Step(t, sym, h[0, 0].numpy().copy(), h_next[0, 0].numpy().copy(),
                   {s: float(p) for s, p in zip(alphabet.symbols, probs)})
        h = h_next


@torch.no_grad()
def advance(net: ReflectionRNN, symbol_id: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of one replica: read symbol `symbol_id` in state h (1,1,H) -> (new state (1,1,H), next logits (V,)).

    The one step function of the live RNN: `stream` here and the app's backend (`rnn.runtime.rnn_stream`) both use it.
    """
    logits, states = net(torch.tensor([[[symbol_id]]]), h0=h)  # x: (1,1,1)
    return states[:, :, 0], logits[0, 0, 0]


def chunk_per_step(dsc: DSC, states: np.ndarray) -> list[tuple[int, ...] | None]:
    """For states (T,H) of a new run: discretise with ``dsc``'s fit, parse the
    state sequence by longest match against ``dsc``'s learned chunks, and
    return for each step the chunk (tuple of DSC state ids) it falls in.
    A state DSC never saw has no id; its step gets ``None``."""
    index = {s: i for i, s in enumerate(dsc.states)}
    ids = [index.get(t, None) for t in dsc.discretiser.tuples(states)]
    out: list[tuple[int, ...] | None] = []
    # Unknown states split the run; parse each known stretch on its own.
    i = 0
    while i < len(ids):
        if ids[i] is None:
            out.append(None)
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] is not None:
            j += 1
        for piece in longest_match_parse(ids[i:j], dsc.chunks.vocabulary.keys() | set(dsc.chunks.learned)):
            out.extend([piece.chunk] * len(piece))
        i = j
    return out


def fit_chunks(states: np.ndarray, k: int = 4, params: ChunkParams | None = None) -> DSC:
    """DSC on a reference run (T,H), for use with :func:`chunk_per_step`."""
    return DSC.run(states, k, params)
