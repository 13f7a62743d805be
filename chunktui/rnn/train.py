"""Training the reflection RNN on next-symbol prediction, and recording states.

Adam (lr 0.005 by default, as in the paper) on random windows of a few hundred
symbols, each window starting from the zero state. Everything is seeded: the
weights by a ``torch.Generator``, the window starts by ``numpy.default_rng``,
so a run repeats exactly. One torch thread by default: a 12-unit network is
far too small to gain from more, and the machine has 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from chunktui.rnn.model import ReflectionRNN
from chunktui.rnn.sequences import PlantedSequence


def set_threads(n: int = 1) -> None:
    """Keep torch from oversubscribing a small machine."""
    torch.set_num_threads(max(1, n))


@dataclass
class Alphabet:
    """Symbol <-> id mapping; ids follow sorted symbol order."""

    symbols: list[str]

    @classmethod
    def of(cls, *seqs: PlantedSequence) -> "Alphabet":
        return cls(sorted(set().union(*(s.alphabet for s in seqs))))

    def encode(self, text: str) -> np.ndarray:
        index = {s: i for i, s in enumerate(self.symbols)}
        return np.array([index[c] for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        return "".join(self.symbols[int(i)] for i in ids)

    def __len__(self) -> int:
        return len(self.symbols)


@dataclass
class TrainConfig:
    hidden: int = 12
    cell: str = "linear"
    lr: float = 0.005
    window: int = 200        # symbols per training window
    batch: int = 16          # windows per step
    steps: int = 250         # optimiser steps
    clip: float = 1.0        # per-replica gradient-norm clip (linear RNNs can blow up)
    weight_decay: float = 0.0  # decoupled (AdamW) decay; 0 is the paper's plain Adam
    seed: int = 0
    threads: int = 1


@dataclass
class TrainResult:
    model: ReflectionRNN
    alphabet: Alphabet
    config: TrainConfig
    loss: list[float] = field(default_factory=list)       # per step, mean over replicas
    accuracy: list[float] = field(default_factory=list)   # per step, argmax next-symbol accuracy

    def summary(self) -> dict:
        k = max(1, len(self.loss) // 10)
        return {"config": asdict(self.config), "alphabet": self.alphabet.symbols,
                "loss_first": float(np.mean(self.loss[:k])), "loss_last": float(np.mean(self.loss[-k:])),
                "accuracy_first": float(np.mean(self.accuracy[:k])),
                "accuracy_last": float(np.mean(self.accuracy[-k:])),
                "loss": self.loss, "accuracy": self.accuracy}


def sample_windows(ids: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random windows of ``length + 1`` consecutive ids (inputs + shifted targets)."""
    if len(ids) < length + 1:
        raise ValueError(f"sequence of {len(ids)} symbols is shorter than a window of {length + 1}")
    starts = rng.integers(0, len(ids) - length, size=n)
    return np.stack([ids[s : s + length + 1] for s in starts])           # (n, length+1)


def clip_per_replica(params: list[torch.Tensor], max_norm: float) -> None:
    """Clip each replica's gradient norm separately (replicas must stay independent)."""
    sq = sum(p.grad.pow(2).flatten(1).sum(1) for p in params if p.grad is not None)  # (R,)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.view(-1, *([1] * (p.dim() - 1))))


def replica_loss(logits: torch.Tensor, targets: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-replica mean cross-entropy: logits (R,B,T,V), targets (R,B,T) -> (R,)."""
    ce = nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
    ce = ce.view(targets.shape)
    if weight is None:
        return ce.flatten(1).mean(1)
    return (ce * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)


def make_optimiser(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or AdamW when ``weight_decay`` > 0 (decay is per element, so replicas stay independent)."""
    if weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr)


def train(seq: PlantedSequence | list[PlantedSequence], config: TrainConfig | None = None,
          alphabet: Alphabet | None = None, model: ReflectionRNN | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train one network (or continue training ``model``) on ``seq``; ``on_step(i)`` after step i (1-based).

    ``seq`` may be a list with one sequence per replica of ``model``: replica
    ``r`` then draws its windows from its own sequence with
    ``default_rng(config.seed + r)``, so it trains exactly as a one-replica
    run with seed ``config.seed + r`` would (several seeds in one batched run).
    """
    cfg = config or TrainConfig()
    set_threads(cfg.threads)
    per_replica = isinstance(seq, (list, tuple))
    seqs = list(seq) if per_replica else [seq]
    alphabet = alphabet or Alphabet.of(*seqs)
    if model is None:
        model = ReflectionRNN(len(alphabet), cfg.hidden, cfg.cell, replicas=len(seqs), seed=cfg.seed)
    R = model.replicas
    if per_replica and len(seqs) != R:
        raise ValueError(f"{len(seqs)} sequences for {R} replicas")
    ids = [alphabet.encode(q.symbols) for q in seqs]
    rngs = [np.random.default_rng(cfg.seed + r) for r in range(len(seqs))]
    opt = make_optimiser(model, cfg.lr, cfg.weight_decay)
    result = TrainResult(model, alphabet, cfg)
    params = list(model.parameters())
    for _ in range(cfg.steps):
        if per_replica:
            win = np.stack([sample_windows(ids[r], cfg.batch, cfg.window, rngs[r]) for r in range(R)])
        else:
            win = sample_windows(ids[0], R * cfg.batch, cfg.window, rngs[0])
        win = torch.from_numpy(win).view(R, cfg.batch, cfg.window + 1)
        logits, _ = model(win[..., :-1])
        loss = replica_loss(logits, win[..., 1:])                       # (R,)
        opt.zero_grad()
        loss.sum().backward()
        clip_per_replica(params, cfg.clip)
        opt.step()
        result.loss.append(float(loss.detach().mean()))
        result.accuracy.append(float((logits.argmax(-1) == win[..., 1:]).float().mean()))
        if on_step is not None:
            on_step(len(result.loss))
    return result


@dataclass
class Trajectory:
    """A network's run over a whole sequence: the hidden-state trajectory."""

    symbols: np.ndarray      # (T,) input ids
    states: np.ndarray       # (T,H) h_t after reading symbol t
    probs: np.ndarray        # (T,V) predicted distribution of symbol t+1

    @property
    def accuracy(self) -> float:
        """Next-symbol argmax accuracy over the run."""
        return float((self.probs[:-1].argmax(1) == self.symbols[1:]).mean())


@torch.no_grad()
def record(model: ReflectionRNN, ids: np.ndarray, replica: int = 0) -> Trajectory:
    """Run replica ``replica`` over ``ids`` from the zero state, keeping every h_t."""
    net = model if model.replicas == 1 else model.replica(replica)
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None, None]   # (1,1,T)
    logits, states = net(x)
    return Trajectory(np.asarray(ids), states[0, 0].numpy(), torch.softmax(logits[0, 0], -1).numpy())
