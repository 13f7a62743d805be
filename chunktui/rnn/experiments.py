"""The reflection experiments, each a function returning a JSON-able dict.

* :func:`train_experiment`  -- train one network, its learning curve.
* :func:`reflect_experiment` -- decoding / states / chunks / parse, trained vs untrained.
* :func:`graft_experiment`  -- chunk-prefix state + next input -> continuation.
* :func:`transfer_experiment` -- learning a new composition of known words with
  and without grafting the known word's state at the junction, over many seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from chunktui.rnn import graft as graft_mod
from chunktui.rnn.dsc import ChunkParams, Discretiser
from chunktui.rnn.model import ReflectionRNN
from chunktui.rnn.reflect import reflect
from chunktui.rnn.sequences import (FLAT_WORDS, context_sequence, flat_sequence, planted_sequence)
from chunktui.rnn.train import (Alphabet, TrainConfig, clip_per_replica, record, replica_loss,
                                sample_windows, set_threads, train)


def memory_init(model: ReflectionRNN, gain: float = 0.9, seed: int = 0) -> ReflectionRNN:
    """Set every replica's recurrent block to an orthogonal matrix times ``gain``
    (for a GRU, the candidate's block). Everything else keeps its init.

    At PyTorch's default (small) init a network forgets within a step or two,
    so its state is little more than an embedding of the current input, and
    discretising it decodes the input almost perfectly before any training.
    With an orthogonal recurrent block of gain 0.9 the untrained state carries
    its history, as the paper's untrained network plausibly did.
    """
    gen = torch.Generator().manual_seed(seed)
    V, H = model.n_symbols, model.hidden
    rows = slice(2 * H, 3 * H) if model.cell == "gru" else slice(0, H)
    with torch.no_grad():
        for r in range(model.replicas):
            q, _ = torch.linalg.qr(torch.randn(H, H, generator=gen))
            model.W_h[r, rows, V:] = q * gain
    return model


def train_experiment(n_words: int = 600, seed: int = 0, config: TrainConfig | None = None) -> dict:
    cfg = config or TrainConfig(seed=seed)
    seq = flat_sequence(n_words, seed=seed)
    t0 = time.perf_counter()
    result = train(seq, cfg)
    out = result.summary()
    out["seconds"] = time.perf_counter() - t0
    out["chance_majority"] = max(seq.symbols.count(c) for c in set(seq.symbols)) / len(seq.symbols)
    return out


REFLECT_WEIGHT_DECAY = 0.5


def _reflect_one(net: ReflectionRNN, ids: np.ndarray, test_seq, k: int, params: ChunkParams | None,
                 kmeans: str = "exact") -> dict:
    ref, dsc = reflect(record(net, ids), test_seq, k, params, kmeans=kmeans)
    entry = ref.to_json()
    entry["top_chunks"] = [{"chunk": list(c), "count": n} for c, n in list(dsc.chunks.vocabulary.items())[:10]]
    return entry


def _summarise_arm(per_seed: list[dict], arm: str) -> dict:
    """Across seeds: the figures the issue asks for, under keys that say what they are."""
    rows = [p[arm] for p in per_seed]
    dec = np.array([r["decoding_accuracy"] for r in rows])
    ratio = np.array([r["parse_to_planted"] for r in rows])
    return {"decoding_accuracy": float(dec.mean()), "decoding_accuracy_min": float(dec.min()),
            "decoding_accuracy_per_seed": dec.tolist(),
            "parse_length_per_seed": [r["parse_length"] for r in rows],
            "parse_to_planted_per_seed": ratio.tolist(), "parse_to_planted_mean": float(ratio.mean()),
            "seeds_parse_within_10pct_of_planted": int((np.abs(ratio - 1) <= 0.1).sum()),
            "unique_states_per_seed": [r["unique_states"] for r in rows],
            "recurring_states_per_seed": [r["recurring_states"] for r in rows],
            "learned_chunks_per_seed": [r["learned_chunks"] for r in rows],
            "next_symbol_accuracy_per_seed": [r["next_symbol_accuracy"] for r in rows]}


def reflect_experiment(seed: int = 0, n_train_words: int = 600, n_test_words: int = 1000,
                       k: int = 3, params: ChunkParams | None = None,
                       config: TrainConfig | None = None, recurrent_gain: float = 0.9,
                       compare_default_init: bool = True, seeds: int = 1, kmeans: str = "exact") -> dict:
    """For each of ``seeds`` seeds (``seed``, ``seed + 1``, ...): train on one flat
    sequence, reflect on a fresh one (seed + 1000). All seeds train as replicas
    of one batched network; each replica trains exactly as it would alone.

    Like for like: a network starts from an orthogonal recurrent block times
    ``recurrent_gain`` (:func:`memory_init`, seeded); ``untrained`` is an exact
    copy of that starting point, ``trained`` the same network after training.
    With ``compare_default_init`` the same pairs are also reported at
    PyTorch's default init (``default_init``), where an untrained state is
    nearly a copy of the current input.
    """
    cfg = config or TrainConfig(seed=seed, weight_decay=REFLECT_WEIGHT_DECAY)
    cfg = replace(cfg, seed=seed)
    seed_list = [seed + i for i in range(seeds)]
    train_seqs = [flat_sequence(n_train_words, seed=s) for s in seed_list]
    test_seqs = [flat_sequence(n_test_words, seed=s + 1000) for s in seed_list]
    alphabet = Alphabet.of(*train_seqs, *test_seqs)
    V = len(alphabet)
    starts = [memory_init(ReflectionRNN(V, cfg.hidden, cfg.cell, seed=s), recurrent_gain, s) for s in seed_list]
    untrained = ReflectionRNN.stack(starts)              # the trained networks' starting points
    t0 = time.perf_counter()
    trained = train(train_seqs, cfg, alphabet=alphabet, model=ReflectionRNN.stack(starts)).model
    train_seconds = time.perf_counter() - t0
    per_seed = []
    for i, (s, test_seq) in enumerate(zip(seed_list, test_seqs)):
        ids = alphabet.encode(test_seq.symbols)
        per_seed.append({"seed": s, "ground_truth_parse_length": len(test_seq.parse),
                         "planted_words": test_seq.n_planted, "sequence_length": len(test_seq.symbols),
                         "trained": _reflect_one(trained.replica(i), ids, test_seq, k, params, kmeans),
                         "untrained": _reflect_one(untrained.replica(i), ids, test_seq, k, params, kmeans)})
    out = {"k": k, "kmeans": kmeans, "chunk_params": asdict(params or ChunkParams()), "seeds": seed_list,
           "init": {"scheme": "orthogonal_recurrent", "recurrent_gain": recurrent_gain,
                    "description": f"recurrent block = orthogonal x {recurrent_gain}, other weights "
                                   "PyTorch-default uniform, seeded per seed; untrained = the trained "
                                   "network's starting point"},
           "train_config": asdict(cfg), "train_seconds": train_seconds,
           "trained": _summarise_arm(per_seed, "trained"),
           "untrained": _summarise_arm(per_seed, "untrained"),
           "per_seed": per_seed}
    if compare_default_init:
        plain = [ReflectionRNN(V, cfg.hidden, cfg.cell, seed=s) for s in seed_list]
        d_untrained = ReflectionRNN.stack(plain)
        d_trained = train(train_seqs, cfg, alphabet=alphabet, model=ReflectionRNN.stack(plain)).model
        d_seed = []
        for i, test_seq in enumerate(test_seqs):
            ids = alphabet.encode(test_seq.symbols)
            d_seed.append({"trained": _reflect_one(d_trained.replica(i), ids, test_seq, k, params, kmeans),
                           "untrained": _reflect_one(d_untrained.replica(i), ids, test_seq, k, params, kmeans)})
        out["default_init"] = {"init": {"scheme": "pytorch_default",
                                        "description": "all weights uniform(+-1/sqrt(fan_in)); untrained = "
                                                       "the trained network's starting point"},
                               "trained": _summarise_arm(d_seed, "trained"),
                               "untrained": _summarise_arm(d_seed, "untrained")}
    return out


def graft_experiment(seed: int = 0, task: str = "flat", n_train_words: int = 600,
                     n_test_words: int = 400, k: int = 4, config: TrainConfig | None = None) -> dict:
    """Train, discretise a fresh run, graft every chunk prefix's state."""
    cfg = config or TrainConfig(seed=seed)
    make = flat_sequence if task == "flat" else context_sequence
    train_seq, test_seq = make(n_train_words, seed=seed), make(n_test_words, seed=seed + 1000)
    result = train(train_seq, cfg)
    traj = record(result.model, result.alphabet.encode(test_seq.symbols))
    disc = Discretiser.fit(traj.states, k)
    out = graft_mod.summarise(graft_mod.graft_words(result.model, traj, test_seq, result.alphabet, disc))
    out.update({"task": task, "k": k, "words": list(test_seq.words)})
    return out


# ---------------------------------------------------------------- transfer
@dataclass
class TransferConfig:
    seeds: int = 20
    known: tuple[str, ...] = FLAT_WORDS
    first: str = "ABCD"            # the new word is first + second
    second: str = "GHI"
    pretrain_steps: int = 300
    steps: int = 60                # training steps on the new composition
    eval_every: int = 1
    threshold: float = 0.95        # accuracy on within-word transitions to reach
    window: int = 100
    batch: int = 8
    lr: float = 0.005
    k: int = 4
    seed: int = 0


def _new_task(cfg: TransferConfig, n_words: int, seed: int):
    """The new composition next to the known words that do not take part in it."""
    others = [w for w in cfg.known if w not in (cfg.first, cfg.second)]
    return planted_sequence([cfg.first + cfg.second, *others], n_words, seed=seed)


def _within_word_targets(seq) -> np.ndarray:
    """(T,) bool: step t's prediction (of symbol t+1) is fixed by the planted word."""
    mask = np.zeros(len(seq.symbols), dtype=bool)
    for p in seq.parse:
        if "".join(p.chunk) in seq.words:
            mask[p.start : p.end - 1] = True
    return mask


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test (ties dropped): P(a split at least this uneven | p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = max(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def transfer_experiment(cfg: TransferConfig | None = None, threads: int = 1) -> dict:
    """Per seed: pretrain on the known words, then learn first+second, twice from
    the same weights on the same windows -- once plain (control), once with the
    known word's entry state grafted into h_{t-1} at the junction (the step that
    reads ``second[0]`` right after ``first``). All seeds and both arms run as
    replicas of one batched network (replica 2s = control, 2s+1 = graft)."""
    cfg = cfg or TransferConfig()
    set_threads(threads)
    S = cfg.seeds
    pre_seqs = [flat_sequence(600, words=cfg.known, seed=cfg.seed + s) for s in range(S)]
    new_train = [_new_task(cfg, 600, cfg.seed + 5000 + s) for s in range(S)]
    new_eval = _new_task(cfg, 150, cfg.seed + 9999)
    alphabet = Alphabet.of(*pre_seqs, *new_train, new_eval)
    V = len(alphabet)

    # 1. Pretrain S networks (replicas) on the known words, each on its own sequence.
    net = ReflectionRNN(V, 12, "linear", replicas=S, seed=cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rngs = [np.random.default_rng(cfg.seed + s) for s in range(S)]
    pre_ids = [alphabet.encode(q.symbols) for q in pre_seqs]
    for _ in range(cfg.pretrain_steps):
        win = torch.from_numpy(np.stack([sample_windows(pre_ids[s], cfg.batch, cfg.window, rngs[s]) for s in range(S)]))
        logits, _ = net(win[..., :-1])
        opt.zero_grad()
        replica_loss(logits, win[..., 1:]).sum().backward()
        clip_per_replica(list(net.parameters()), 1.0)
        opt.step()

    # 2. The graft vector per seed: the known second word's entry state, from DSC on a fresh run.
    graft_vecs = []
    probe = flat_sequence(300, words=cfg.known, seed=cfg.seed + 7777)
    probe_ids = alphabet.encode(probe.symbols)
    for s in range(S):
        traj = record(net, probe_ids, replica=s)
        disc = Discretiser.fit(traj.states, cfg.k)
        graft_vecs.append(disc.vector(graft_mod.entry_state(traj, probe, disc, cfg.second)))
    graft_vecs = torch.tensor(np.array(graft_vecs), dtype=net.W_h.dtype)            # (S,H)

    # 3. Two arms per seed, identical weights and identical windows.
    arms = ReflectionRNN(V, 12, "linear", replicas=2 * S)
    with torch.no_grad():
        for name, p in arms.named_parameters():
            p.copy_(getattr(net, name).repeat_interleave(2, dim=0))
    is_graft = torch.tensor([r % 2 == 1 for r in range(2 * S)])                    # (2S,)
    arm_graft_vecs = graft_vecs.repeat_interleave(2, dim=0)                        # (2S,H)
    opt = torch.optim.Adam(arms.parameters(), lr=cfg.lr)
    first_id, second_id = alphabet.symbols.index(cfg.first[-1]), alphabet.symbols.index(cfg.second[0])

    def junction(win: torch.Tensor) -> torch.Tensor:
        """(R,B,T) -> (R,B,T) bool: steps reading second[0] right after first[-1], graft arm only."""
        at = torch.zeros_like(win, dtype=torch.bool)
        at[..., 1:] = (win[..., 1:] == second_id) & (win[..., :-1] == first_id)
        return at & is_graft[:, None, None]

    eval_ids = torch.from_numpy(alphabet.encode(new_eval.symbols))
    eval_x = eval_ids[None, None].expand(2 * S, 1, -1)
    eval_mask = torch.from_numpy(_within_word_targets(new_eval))[:-1]

    @torch.no_grad()
    def evaluate() -> np.ndarray:
        logits, _ = arms(eval_x, graft_mask=junction(eval_x), graft_state=arm_graft_vecs)
        hit = (logits[:, 0, :-1].argmax(-1) == eval_ids[1:])                        # (2S,T-1)
        return hit[:, eval_mask].float().mean(1).numpy()

    new_ids = [alphabet.encode(q.symbols) for q in new_train]
    rngs = [np.random.default_rng(cfg.seed + 100 + s) for s in range(S)]
    curve_steps, curves = [0], [evaluate()]
    for step in range(1, cfg.steps + 1):
        per_seed = np.stack([sample_windows(new_ids[s], cfg.batch, cfg.window, rngs[s]) for s in range(S)])
        win = torch.from_numpy(per_seed).repeat_interleave(2, dim=0)               # same windows, both arms
        x = win[..., :-1]
        logits, _ = arms(x, graft_mask=junction(x), graft_state=arm_graft_vecs)
        opt.zero_grad()
        replica_loss(logits, win[..., 1:]).sum().backward()
        clip_per_replica(list(arms.parameters()), 1.0)
        opt.step()
        if step % cfg.eval_every == 0:
            curve_steps.append(step)
            curves.append(evaluate())
    acc = np.stack(curves, axis=1)                                                 # (2S, n_evals)

    def steps_to(row: np.ndarray) -> tuple[int, bool]:
        hit = np.nonzero(row >= cfg.threshold)[0]
        return (curve_steps[hit[0]], True) if hit.size else (cfg.steps, False)

    out = {"config": asdict(cfg), "curve_steps": curve_steps}
    for arm, offset in (("control", 0), ("graft", 1)):
        rows = acc[offset::2]
        reached = [steps_to(r) for r in rows]
        steps = np.array([s for s, _ in reached], dtype=float)
        out[arm] = {"steps_to_threshold": steps.tolist(),
                    "reached": int(sum(ok for _, ok in reached)),
                    "mean_steps": float(steps.mean()), "sd_steps": float(steps.std(ddof=1)),
                    "mean_curve": rows.mean(0).tolist(), "sd_curve": rows.std(0, ddof=1).tolist()}
    diff = np.array(out["control"]["steps_to_threshold"]) - np.array(out["graft"]["steps_to_threshold"])
    faster, slower = int((diff > 0).sum()), int((diff < 0).sum())
    out["paired_difference"] = {"mean": float(diff.mean()), "sd": float(diff.std(ddof=1)),
                                "se": float(diff.std(ddof=1) / np.sqrt(S)),
                                "graft_faster": faster, "ties": int((diff == 0).sum()), "graft_slower": slower,
                                "sign_test_p": sign_test(faster, slower)}
    out["n_seeds"] = S
    return out
