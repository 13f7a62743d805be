"""The RNN as a model of the app: load, stream and scan like a language model.

A spec ``rnn:TASK[:SEED[:STEPS]]`` (TASK ``flat`` or ``context``; 250 steps
by default) trains the paper's 12-unit linear RNN on that task (about 8 s on
a CPU, with progress), records a
reference run over a fresh sequence and learns its DSC chunks there. Each
chunk becomes one column, labelled by the symbols it spans in the reference
run (``ABCD``, ``EEGHI``, ...); chunks spelling the same symbols share a label.

Streaming then works as for a language model: one step per symbol (prompt
symbols first, then sampled ones), the hidden state of every step (one
"layer": the 12 units), the top next symbols, and the chunk the step falls in
under a longest-match parse of the discretised states so far (a live parse:
the piece holding the newest step is the longest chunk that fits the states
seen up to it). When a stream ends, :func:`relabel` gives every step the
chunk of the full parse. A scan parses the whole text at once, as
``chunk_per_step``.

No UI imports; the app calls :func:`load_rnn`, :func:`rnn_stream`, :func:`rnn_scan`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from chunktui.engine.dictionary import Chunk, ChunkDictionary
from chunktui.shared.errors import CorpusError, ModelLoadError
from chunktui.engine.matching import MatchResult
from chunktui.engine.streaming import ScanResult, TokenEvent
from chunktui.shared.settings import ProgressFn, Sampling
from chunktui.rnn.dsc import DSC, ChunkParams
from chunktui.rnn.experiments import REFLECT_WEIGHT_DECAY, memory_init
from chunktui.rnn.model import ReflectionRNN
from chunktui.rnn.stream import advance
from chunktui.rnn.parse import longest_match_parse
from chunktui.rnn.sequences import context_sequence, flat_sequence
from chunktui.rnn.train import Alphabet, TrainConfig, record, train

SPEC = re.compile(r"^rnn:(?P<task>flat|context)(?::(?P<seed>\d+)(?::(?P<steps>\d+))?)?$")
TASKS = {"flat": flat_sequence, "context": context_sequence}
MAX_COLUMNS = 48          # chunk labels shown as columns (the most used in the reference run)
# Fewer, more frequent chunks than the reflect experiment's learn-to-convergence default: readable
# highlights (ABCDE, GHIEE, JKLMNEE, EEEE ...) rather than hundreds of long one-off compositions.
APP_CHUNK_PARAMS = ChunkParams(rounds=20, min_count=20, per_round=8)


def is_rnn_spec(spec: str) -> bool:
    return spec.strip().lower().startswith("rnn:")


@dataclass
class RNNLayout:
    n_states: int = 1     # one "layer": the hidden state


class RNNDictionary:
    """The DSC chunks of the reference run, as the app's dictionary (duck-typed)."""

    path = None
    name = "DSC chunks"

    def __init__(self, chunks: list[Chunk]):
        self.chunks = chunks

    # They only read self.chunks: the same lookups as a dictionary file's.
    labels = ChunkDictionary.labels
    by_id = ChunkDictionary.by_id


class RNNLoaded:
    """A trained RNN with its DSC fit, standing where the app expects a LoadedModel."""

    kind = "rnn"

    def __init__(self, spec: str, task: str, seed: int, net: ReflectionRNN, alphabet: Alphabet, dsc: DSC,
                 chunk_labels: dict[tuple, str], columns: list[str], train_seconds: float,
                 train_accuracy: float, reference_length: int):
        self.spec, self.task, self.seed = spec, task, seed
        self.net, self.alphabet, self.dsc = net, alphabet, dsc
        self.chunk_labels = chunk_labels            # DSC chunk (tuple of state ids) -> symbol label
        self.column_of = {label: i for i, label in enumerate(columns)}
        self.vocabulary = set(dsc.chunks.vocabulary) | set(dsc.chunks.learned)
        self.state_index = {s: i for i, s in enumerate(dsc.states)}
        self.name = spec
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.layout = RNNLayout()
        self.n_layers = 1
        self.hidden_size = net.hidden
        self.train_seconds, self.train_accuracy, self.reference_length = train_seconds, train_accuracy, reference_length
        self.dictionary = RNNDictionary([Chunk(id=f"dsc/{i}/{label}", label=label, layer=0, kind="dsc",
                                               method="discrete-sequence-chunking", seed=seed)
                                         for i, label in enumerate(columns)])
        self.lock = threading.Lock()

    def card(self) -> dict:
        """The keys of LoadedModel.card(), plus the RNN's own."""
        n_params = sum(p.numel() for p in self.net.parameters())
        return {"name": self.spec, "architecture": f"ReflectionRNN ({self.net.cell}, {self.net.hidden} units)",
                "model_type": "reflection-rnn", "layers": 1, "width": self.net.hidden, "parameters": n_params,
                "device": "cpu", "dtype": "float32", "memory_mb": n_params * 4 / 2**20,
                "load_seconds": self.train_seconds, "chat_template": False,
                "source": f"trained at load ({self.task} task, seed {self.seed}); {self.dsc.n_states} DSC states, "
                          f"{len(self.dsc.chunks.learned)} chunks on a {self.reference_length}-step reference run",
                "alphabet": "".join(self.alphabet.symbols), "task": self.task, "seed": self.seed,
                "next_symbol_accuracy": round(self.train_accuracy, 4)}

    # ---------------------------------------------------------------- chunks
    def encode(self, text: str) -> list[int]:
        """Symbols -> ids; spaces are ignored; anything outside the alphabet is refused."""
        symbols = [c for c in text if not c.isspace()]
        bad = sorted({c for c in symbols if c not in self.alphabet.symbols})
        if bad:
            raise CorpusError(f"{''.join(bad)!r} not in this RNN's alphabet "
                              f"({''.join(self.alphabet.symbols)}); type symbols such as ABCDEE.")
        if not symbols:
            raise CorpusError("No symbols to feed: type some, such as ABCDEEGHI.")
        return [self.alphabet.symbols.index(c) for c in symbols]

    def state_ids(self, states: np.ndarray) -> list[int | None]:
        return [self.state_index.get(t) for t in self.dsc.discretiser.tuples(states)]

    def columns_of_steps(self, ids: list[int | None]) -> list[int]:
        """Column of the chunk each step falls in (longest-match parse; unknown states split it), -1 if none."""
        out: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] is None:
                out.append(-1)
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] is not None:
                j += 1
            for piece in longest_match_parse(ids[i:j], self.vocabulary):
                col = self.column_of.get(self.chunk_labels.get(piece.chunk, ""), -1)
                out.extend([col] * len(piece))
            i = j
        return out

    def matches(self, columns: list[int]) -> MatchResult:
        """A MatchResult over T steps: a hit (score 1) on the column of the step's chunk."""
        T, C = len(columns), len(self.column_of)
        hit = torch.zeros(T, C, dtype=torch.bool)
        for t, c in enumerate(columns):
            if c >= 0:
                hit[t, c] = True
        score = torch.where(hit, torch.tensor(1.0), torch.tensor(-1.0))
        col = torch.tensor(columns, dtype=torch.long)
        token_score = torch.where(col >= 0, torch.tensor(1.0), torch.tensor(float("-inf")))
        return MatchResult(value=hit.float(), score=score, hit=hit, layer_score=token_score[:, None],
                           layer_chunk=col[:, None], token_chunk=col, token_score=token_score)


def _label_chunks(dsc: DSC, symbols: str) -> dict[tuple, str]:
    """Each DSC chunk -> the symbols it spans most often in the reference parse."""
    spelled: dict[tuple, Counter] = {}
    for piece in dsc.chunks.parse:
        spelled.setdefault(piece.chunk, Counter())[symbols[piece.start : piece.end]] += 1
    return {chunk: c.most_common(1)[0][0] for chunk, c in spelled.items()}


def load_rnn(spec: str, progress: ProgressFn | None = None,
             steps: int | None = None, train_words: int = 600, reference_words: int = 600) -> RNNLoaded:
    """Train the RNN named by ``spec`` and fit DSC on a reference run (seconds on a CPU)."""
    match = SPEC.match(spec.strip().lower())
    if match is None:
        raise ModelLoadError(f"Unknown RNN spec {spec!r}: use rnn:flat or rnn:context, optionally with a seed "
                             "and training steps (rnn:flat:3, rnn:context:0:400).")
    task, seed = match["task"], int(match["seed"] or 0)
    steps = steps or int(match["steps"] or 250)
    if steps < 1:
        raise ModelLoadError("An RNN needs at least 1 training step.")
    say = progress or (lambda stage, fraction, text: None)
    make = TASKS[task]
    train_seq, ref_seq = make(train_words, seed=seed), make(reference_words, seed=seed + 1000)
    alphabet = Alphabet.of(train_seq, ref_seq)
    cfg = TrainConfig(seed=seed, steps=steps, weight_decay=REFLECT_WEIGHT_DECAY)
    net = memory_init(ReflectionRNN(len(alphabet), cfg.hidden, cfg.cell, seed=seed), 0.9, seed)
    t0 = time.perf_counter()

    def step_done(i: int) -> None:
        if i % 10 == 0 or i == steps:
            say("train", 0.9 * i / steps, f"training {task} RNN: step {i}/{steps}")

    train(train_seq, cfg, alphabet=alphabet, model=net, on_step=step_done)
    say("dsc", 0.92, "discrete sequence chunking on a reference run")
    traj = record(net, alphabet.encode(ref_seq.symbols))
    dsc = DSC.run(traj.states, k=3, params=APP_CHUNK_PARAMS)
    labels = _label_chunks(dsc, ref_seq.symbols)
    coverage = Counter()
    for piece in dsc.chunks.parse:
        coverage[labels[piece.chunk]] += len(piece)
    columns = [label for label, _ in coverage.most_common(MAX_COLUMNS)]
    loaded = RNNLoaded(spec, task, seed, net, alphabet, dsc, labels, columns, time.perf_counter() - t0,
                       traj.accuracy, len(ref_seq.symbols))
    say("done", 1.0, f"trained in {loaded.train_seconds:.1f} s; {dsc.n_states} states, "
                     f"{len(dsc.chunks.learned)} chunks")
    return loaded


def _top(probs: torch.Tensor, alphabet: Alphabet, k: int = 5) -> list[tuple[str, float]]:
    p, i = probs.topk(min(k, probs.numel()))
    return [(alphabet.symbols[int(j)], float(q)) for q, j in zip(p, i)]


@torch.no_grad()
def rnn_stream(loaded: RNNLoaded, prompt: str, sampling: Sampling,
               cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
    """Feed the prompt's symbols, then sample ``max_new_tokens`` more; one event per symbol."""
    ids = loaded.encode(prompt)
    net, alphabet = loaded.net, loaded.alphabet
    gen = torch.Generator().manual_seed(int(sampling.seed))
    h = net.init_state(1)
    states: list[np.ndarray] = []
    logprob: float | None = None
    t0 = time.perf_counter()
    total = len(ids) + sampling.max_new_tokens
    current = ids[0]
    for t in range(total):
        if cancel is not None and cancel.is_set():
            return
        h, next_logits = advance(net, current, h)
        probs = torch.softmax(next_logits, -1)
        states.append(h[0, 0].numpy().copy())
        cols = loaded.columns_of_steps(loaded.state_ids(np.stack(states)))
        generated = t >= len(ids)
        last = t == total - 1
        finished = "length" if last else None
        yield TokenEvent(index=t, token_id=current, text=alphabet.symbols[current], hidden=h[0, 0][None].clone(),
                         top=_top(probs, alphabet), logprob=logprob, matches=loaded.matches(cols[-1:]),
                         generated=generated, finished=finished, elapsed=time.perf_counter() - t0)
        if last:
            return
        if t + 1 < len(ids):
            nxt = ids[t + 1]
        elif sampling.temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(next_logits / sampling.temperature, -1), 1,
                                        generator=gen))
        else:
            nxt = int(probs.argmax())
        logprob = float(torch.log(probs[nxt]))
        current = nxt


def relabel(loaded: RNNLoaded, steps: list) -> None:
    """Give streamed steps (session.TokenStep) the chunks of the full parse, as a scan of their
    text would: the live parse only knew the states up to each step. The RNN is deterministic,
    so re-running it over the text gives the same states."""
    from chunktui.engine.steps import steps_from_scan

    if not steps:
        return
    fresh = steps_from_scan(rnn_scan(loaded, "".join(s.text for s in steps)))
    for old, new in zip(steps, fresh):
        old.strongest, old.strongest_score = new.strongest, new.strongest_score
        old.layer_chunk, old.layer_score = new.layer_chunk, new.layer_score
        old.hits = new.hits


@torch.no_grad()
def rnn_scan(loaded: RNNLoaded, text: str) -> ScanResult:
    """Teacher-forced run over ``text``: every step's state and its chunk under the full parse."""
    ids = loaded.encode(text)
    traj = record(loaded.net, np.array(ids))
    cols = loaded.columns_of_steps(loaded.state_ids(traj.states))
    logprobs: list[float | None] = [None] + [float(np.log(max(traj.probs[t - 1, ids[t]], 1e-30)))
                                             for t in range(1, len(ids))]
    return ScanResult(ids=ids, texts=[loaded.alphabet.symbols[i] for i in ids],
                      hidden=torch.from_numpy(traj.states)[:, None, :].float(), matches=loaded.matches(cols),
                      logprobs=logprobs)


