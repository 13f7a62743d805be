"""The RNN learns; runs repeat exactly; grafting, streaming and the CLI work end to end."""

import json
from dataclasses import replace

import numpy as np
import torch
import pytest
from click.testing import CliRunner

from chunktui.rnn.dsc import Discretiser, DSC
from chunktui.rnn.model import ReflectionRNN
from chunktui.rnn.sequences import flat_sequence
from chunktui.rnn.stream import chunk_per_step, stream
from chunktui.rnn.train import Alphabet, TrainConfig, record, train

SMALL = TrainConfig(steps=100, window=60, batch=8, seed=0)


def test_training_learns_well_above_chance():
    seq = flat_sequence(200, seed=0)
    res = train(seq, SMALL)
    s = res.summary()
    assert s["loss_last"] < 0.6 * s["loss_first"]
    # Chance: uniform guessing over 13 symbols ~0.08; always-'E' gets ~0.53. Within-word
    # transitions are deterministic, so a network that learned gets clearly above both.
    traj = record(res.model, res.alphabet.encode(flat_sequence(100, seed=5).symbols))
    assert traj.accuracy > 0.75


def test_training_repeats_exactly():
    seq = flat_sequence(100, seed=0)
    cfg = TrainConfig(steps=5, window=40, batch=4, seed=7)
    a, b = train(seq, cfg), train(seq, cfg)
    assert a.loss == b.loss
    assert torch.equal(a.model.W_h, b.model.W_h)


def test_linear_cell_is_the_papers_update():
    net = ReflectionRNN(3, hidden=2, cell="linear", seed=0)
    x = torch.tensor([[[2, 0]]])
    logits, states = net(x)
    W, b = net.W_h[0].detach(), net.b_h[0].detach()
    h1 = W @ torch.tensor([0.0, 0, 1, 0, 0]) + b        # [x_0 = one-hot(2); h_{-1} = 0]
    h2 = W @ torch.cat([torch.tensor([1.0, 0, 0]), h1]) + b
    assert torch.allclose(states[0, 0], torch.stack([h1, h2]), atol=1e-6)
    # Prediction at step 1 reads [x_1; h_0], not h_1.
    y = net.W_y[0].detach() @ torch.cat([torch.tensor([1.0, 0, 0]), h1]) + net.b_y[0].detach()
    assert torch.allclose(logits[0, 0, 1], y, atol=1e-6)


def test_replicas_are_independent():
    net = ReflectionRNN(4, hidden=3, cell="gru", replicas=2, seed=1)
    x = torch.randint(0, 4, (2, 2, 5), generator=torch.Generator().manual_seed(0))
    logits, _ = net(x)
    one, _ = net.replica(1)(x[1:])
    assert torch.allclose(logits[1:], one, atol=1e-6)


def test_graft_mask_replaces_previous_state():
    net = ReflectionRNN(3, hidden=2, seed=0)
    g = torch.tensor([[0.5, -0.5]])
    mask = torch.tensor([[[False, True]]])
    logits, _ = net(torch.tensor([[[0, 1]]]), graft_mask=mask, graft_state=g)
    assert torch.allclose(torch.softmax(logits[0, 0, 1], -1), net.predict_from(g[0], 1), atol=1e-6)


def test_stream_matches_batch_run_and_chunks():
    seq = flat_sequence(30, seed=1)
    alphabet = Alphabet.of(seq)
    net = ReflectionRNN(len(alphabet), seed=0)
    steps = list(stream(net, seq.symbols[:20], alphabet))
    traj = record(net, alphabet.encode(seq.symbols[:20]))
    assert [s.symbol for s in steps] == list(seq.symbols[:20])
    assert np.allclose(np.stack([s.state for s in steps]), traj.states, atol=1e-6)
    assert abs(sum(steps[3].next_probs.values()) - 1) < 1e-5
    dsc = DSC.run(traj.states, k=3)
    chunks = chunk_per_step(dsc, traj.states)
    assert len(chunks) == 20 and all(c is not None for c in chunks)


def test_cli_reflect_json(tmp_path):
    from chunktui.cli.rnn import rnn

    out = tmp_path / "r.json"
    res = CliRunner().invoke(rnn, ["reflect", "--steps", "40", "--seed", "1", "--seeds", "2", "--default-init",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert 0 <= data["trained"]["decoding_accuracy"] <= 1
    assert "decoding_accuracy" in data["untrained"]
    assert [p["seed"] for p in data["per_seed"]] == [1, 2] == data["seeds"]
    for arm in ("trained", "untrained"):
        per = [p[arm] for p in data["per_seed"]]
        assert data[arm]["decoding_accuracy_per_seed"] == [r["decoding_accuracy"] for r in per]
        assert data[arm]["parse_to_planted_per_seed"] == [r["parse_length"] / p["planted_words"]
                                                          for r, p in zip(per, data["per_seed"])]
    assert data["train_config"]["weight_decay"] == 0.5 and data["chunk_params"]["min_count"] == 2
    assert data["kmeans"] == "exact"
    # Like for like: both networks share the stated init; the default-init pair is an extra.
    assert data["init"]["scheme"] == "orthogonal_recurrent" and data["init"]["recurrent_gain"] == 0.9
    assert data["k"] == 3
    assert data["default_init"]["init"]["scheme"] == "pytorch_default"
    assert "decoding_accuracy" in data["default_init"]["untrained"]


def test_replicas_with_their_own_sequences_train_as_separate_runs():
    """Several seeds in one batched run: replica r trains exactly like a one-replica run with seed + r."""
    seqs = [flat_sequence(60, seed=s) for s in (3, 4)]
    alphabet = Alphabet.of(*seqs)
    cfg = TrainConfig(steps=6, window=30, batch=4, weight_decay=0.5)
    nets = [ReflectionRNN(len(alphabet), 12, seed=s) for s in (3, 4)]
    both = train(seqs, replace(cfg, seed=3), alphabet=alphabet, model=ReflectionRNN.stack(nets)).model
    for r, s in enumerate((3, 4)):
        alone = train(seqs[r], replace(cfg, seed=s), alphabet=alphabet,
                      model=ReflectionRNN(len(alphabet), 12, seed=s)).model
        for name, p in alone.named_parameters():
            assert torch.allclose(getattr(both, name)[r], p[0], atol=1e-5), name
    with pytest.raises(ValueError, match="3 sequences for 2 replicas"):
        train([*seqs, seqs[0]], cfg, alphabet=alphabet, model=ReflectionRNN.stack(nets))


def test_memory_init_sets_only_the_recurrent_block():
    from chunktui.rnn.experiments import memory_init

    base = ReflectionRNN(5, hidden=4, replicas=2, seed=3)
    net = memory_init(ReflectionRNN(5, hidden=4, replicas=2, seed=3), gain=0.9, seed=3)
    again = memory_init(ReflectionRNN(5, hidden=4, replicas=2, seed=3), gain=0.9, seed=3)
    assert torch.equal(net.W_h, again.W_h)                      # seeded: repeats exactly
    for r in range(2):
        W = net.W_h[r, :, 5:].detach()                          # (H,H) recurrent block
        assert torch.allclose(W.T @ W, 0.81 * torch.eye(4), atol=1e-5)
    assert torch.equal(net.W_h[:, :, :5], base.W_h[:, :, :5])   # input weights untouched
    assert torch.equal(net.W_y, base.W_y) and torch.equal(net.b_h, base.b_h)


def test_line_plot_marks_and_overlap():
    from chunktui.rnn.plot import line_plot

    # Two series, 3 points on a 5x3 grid, range 0..1: both start at 0 (overlap in the
    # bottom-left), end at 1 (overlap top-right); in the middle a=0 (bottom), b=1 (top).
    text = line_plot({"a": [0, 0, 1], "b": [0, 1, 1]}, width=5, height=3, lo=0, hi=1)
    rows = text.splitlines()
    assert rows[0].endswith("│  ○ ◉")
    assert rows[2].endswith("│◉ ●  ")


def test_write_json_atomic(tmp_path):
    from chunktui.cli.rnn import write_json_atomic

    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_sign_test_matches_hand_computed_values():
    from chunktui.rnn.experiments import sign_test

    # 12 wins, 3 losses: 2 * (C(15,12) + C(15,13) + C(15,14) + C(15,15)) / 2^15 = 2 * 576 / 32768
    assert abs(sign_test(12, 3) - 1152 / 32768) < 1e-12
    assert sign_test(3, 12) == sign_test(12, 3)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0


def test_transfer_reports_paired_steps_over_seeds():
    from chunktui.rnn.experiments import TransferConfig, transfer_experiment

    cfg = TransferConfig(seeds=3, pretrain_steps=60, steps=6, batch=4, window=60)
    out = transfer_experiment(cfg)
    n_evals = len(out["curve_steps"])
    assert out["curve_steps"] == list(range(0, 7))
    for arm in ("control", "graft"):
        a = out[arm]
        assert len(a["steps_to_threshold"]) == 3 and len(a["mean_curve"]) == n_evals
        assert all(0 <= s <= 6 for s in a["steps_to_threshold"])
    diff = np.array(out["control"]["steps_to_threshold"]) - np.array(out["graft"]["steps_to_threshold"])
    d = out["paired_difference"]
    assert d["mean"] == pytest.approx(diff.mean())
    assert d["graft_faster"] + d["ties"] + d["graft_slower"] == 3
    # Step 0 is before any training on the new word: the arms differ only by the graft at the junction,
    # which writes the known word's entry state, so 'G' after 'ABCD' predicts 'H' at least as well.
    assert out["graft"]["mean_curve"][0] >= out["control"]["mean_curve"][0] - 1e-9
