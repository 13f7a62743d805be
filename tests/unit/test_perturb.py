"""Interventions: exact edits, no-ops, hook hygiene, positions, left padding."""

import pytest
import torch

from chunktui.shared.errors import ChunkError
from chunktui.engine.hooks import ResidualRecorder
from chunktui.engine.perturb import (Intervention, Positions, compare, intervene, next_token_logprobs, occurs,
                                     select_chunks, token_diff)
from chunktui.engine.streaming import PhaseFlag, generate_stream, left_pad
from chunktui.shared.settings import Sampling


def forward_states(model, ids, intervention=None):
    phase = PhaseFlag()
    with intervene(model, intervention, phase):
        with ResidualRecorder(model.layout) as rec:
            out = model.model(input_ids=torch.tensor([ids]))
    return rec.states()[0], out.logits[0]


IDS = [0, 290, 279, 262, 350, 94, 33, 120]


def chunk_at(dictionary, label, layer):
    return dictionary.select([label], layers=[layer])[0]


def test_strength_zero_changes_nothing(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["cheese"], [1, 2])
    base_states, base_logits = forward_states(tiny_model, IDS)
    for mode in ("graft", "freeze", "amplify", "suppress"):
        states, logits = forward_states(tiny_model, IDS, Intervention(chunks, mode, 0.0, Positions("all")))
        assert torch.equal(logits, base_logits), mode
        assert torch.equal(states, base_states), mode


def test_graft_strength_one_sets_the_subpopulation_to_its_template(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunk = chunk_at(dictionary, "cheese", 2)
    states, _ = forward_states(tiny_model, IDS, Intervention([chunk], "graft", 1.0, Positions("prompt-last", 3)))
    base, _ = forward_states(tiny_model, IDS)
    M = chunk.subpopulation
    edited = states[:, 2]  # (T, d): the stream entering block 2, as the block saw it
    assert torch.allclose(edited[-3:, M], chunk.template.expand(3, -1), atol=1e-6)
    # untouched: earlier positions, other neurons, and earlier layers
    assert torch.equal(edited[:-3], base[:-3, 2])
    others = torch.ones(edited.shape[-1], dtype=torch.bool)
    others[M] = False
    assert torch.equal(edited[-3:, others], base[-3:, 2][:, others])
    assert torch.equal(states[:, :2], base[:, :2])
    # and the edit is carried forward by the residual stream
    assert not torch.allclose(states[-1, 3], base[-1, 3])


def test_freeze_zeroes_the_subpopulation(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunk = chunk_at(dictionary, "dog", 1)
    states, _ = forward_states(tiny_model, IDS, Intervention([chunk], "freeze", 1.0, Positions("all")))
    assert torch.count_nonzero(states[:, 1][:, chunk.subpopulation]) == 0
    half, _ = forward_states(tiny_model, IDS, Intervention([chunk], "suppress", 0.5, Positions("all")))
    base, _ = forward_states(tiny_model, IDS)
    assert torch.allclose(half[:, 1][:, chunk.subpopulation], 0.5 * base[:, 1][:, chunk.subpopulation], atol=1e-6)


def test_mean_ablate_uses_the_corpus_mean(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunk = chunk_at(dictionary, "rain", 3)
    iv = Intervention([chunk], "mean-ablate", 1.0, Positions("all"), layer_means=dictionary.layer_means)
    states, _ = forward_states(tiny_model, IDS, iv)
    target = dictionary.layer_means[3][chunk.subpopulation]
    assert torch.allclose(states[:, 3][:, chunk.subpopulation], target.expand(len(IDS), -1), atol=1e-6)
    with pytest.raises(ChunkError, match="mean-ablate needs"):
        Intervention([chunk], "mean-ablate", 1.0)


def test_hooks_are_removed_after_an_exception(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["cheese"], [0, 1, 2, 3])
    blocks = tiny_model.layout.blocks
    before = [len(b._forward_pre_hooks) for b in blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(tiny_model, Intervention(chunks, "graft"), PhaseFlag()):
            assert sum(len(b._forward_pre_hooks) for b in blocks) > sum(before)
            raise RuntimeError("boom")
    assert [len(b._forward_pre_hooks) for b in blocks] == before
    # and after a generator is abandoned half-way
    gen = None
    with intervene(tiny_model, Intervention(chunks, "graft"), PhaseFlag()):
        gen = generate_stream(tiny_model, "I like", Sampling(max_new_tokens=20))
        next(gen)
    gen.close()
    assert [len(b._forward_pre_hooks) for b in blocks] == before


def test_positions_generated_leaves_the_prompt_alone(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["cheese"], [1, 2])
    s = Sampling(max_new_tokens=6, stop_at_eos=False)
    base = list(generate_stream(tiny_model, "I like the", s))
    phase = PhaseFlag()
    with intervene(tiny_model, Intervention(chunks, "amplify", 3.0, Positions("generated")), phase):
        pert = list(generate_stream(tiny_model, "I like the", s, phase=phase))
    n_prompt = sum(not e.generated for e in base)
    for a, b in zip(base[:n_prompt], pert[:n_prompt]):
        assert torch.equal(a.hidden, b.hidden)
    assert base[n_prompt].token_id == pert[n_prompt].token_id  # chosen from unedited prompt logits
    assert not torch.allclose(base[n_prompt].hidden[2], pert[n_prompt].hidden[2])  # first generated token edited


def test_left_padded_batch_equals_single_rows(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["dog"], [1, 2])
    iv = Intervention(chunks, "graft", 1.0, Positions("prompt-last", 2))
    prompts = ["I like", "The dog ate the cheese in the garden"]
    batched = next_token_logprobs(tiny_model, prompts, iv, chat=False, batch_size=2)
    single = torch.cat([next_token_logprobs(tiny_model, [p], iv, chat=False) for p in prompts])
    assert torch.allclose(batched, single, atol=1e-4)
    plain = next_token_logprobs(tiny_model, prompts, None, chat=False)
    assert not torch.allclose(batched, plain, atol=1e-4)


def test_compare_uses_identical_sampling(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["cheese"], [1])
    iv = Intervention(chunks, "graft", 0.0)  # a no-op: both arms must then be identical
    report = compare(tiny_model, iv, ["I like", "The dog"], samples=3,
                     sampling=Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1), chat=False)
    assert len(report.pairs) == 6
    assert all(p["control"] == p["perturbed"] for p in report.pairs)
    assert report.concepts["cheese"]["delta_logprob"] == pytest.approx(0.0, abs=1e-6)
    assert len({p["seed"] for p in report.pairs}) == 3


def test_selection_and_positions_errors(tiny_dict):
    dictionary, _ = tiny_dict
    with pytest.raises(ChunkError, match="No chunk named 'zebra'"):
        select_chunks(dictionary, ["zebra"], None)
    with pytest.raises(ChunkError, match="Bad positions"):
        Positions.parse("prompt-last:0")
    assert str(Positions.parse("prompt-last:4")) == "prompt-last:4"
    with pytest.raises(ChunkError, match="Unknown mode"):
        Intervention(dictionary.chunks[:1], "explode")


def test_occurs_is_whole_word_case_insensitive():
    assert occurs("cheese", "Some Cheese, please")
    assert not occurs("cheese", "a cheeseburger")
    assert not occurs("cake", "cupcakes")


def test_token_diff(tiny_model):
    ops = token_diff(tiny_model.tokenizer, [1, 2, 3, 4], [1, 2, 9, 4])
    assert [o["op"] for o in ops] == ["equal", "replace", "equal"]


# --------------------------------------------------------------------------- error bars, fluency, control, sweep

from chunktui.engine.perturb import (continuation_nll, control_chunks, control_intervention,  # noqa: E402
                                     random_direction, run_arm)
from chunktui.shared import perturb_stats as stats  # noqa: E402


def test_wilson_and_newcombe_match_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857-872: Wilson 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775;
    # difference 56/70 - 48/80 by the hybrid score method (10): 0.0524 to 0.3339
    assert stats.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert stats.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert stats.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-5)
    assert stats.newcombe_difference(48, 80, 56, 70) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson(5, 4)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"), ("... !!", "empty"),
    ("cheese cheese cheese", "loop"), ("I like the cake, the cake, the cake and tea", "loop"),
    ("a b a b a b", "loop"),
    ("no no yes no no yes maybe no no yes no yes no", "low variety"),
    ("a. mention. Your. Your.", None),  # garbage, but not repetitive: perplexity is the measure for it
    ("Cheese, bread and a glass of milk make a simple lunch on a cold day.", None),
    ("It rained, and it rained again the next day.", None),
])
def test_degenerate_rule(text, reason):
    assert stats.degenerate_reason(text) == reason


def test_control_chunks_have_the_same_size_and_are_seeded(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["cheese", "dog"], [1, 2])
    width = tiny_model.hidden_size
    a = control_chunks(chunks, width, seed=3)
    again = control_chunks(chunks, width, seed=3)
    other = control_chunks(chunks, width, seed=4)
    for real, r, r2, o in zip(chunks, a, again, other):
        assert r.layer == real.layer and r.label == real.label and r.id == f"random:{real.id}"
        assert r.subpopulation.numel() == real.subpopulation.numel()
        assert len(set(r.subpopulation.tolist())) == r.subpopulation.numel()
        assert 0 <= int(r.subpopulation.min()) and int(r.subpopulation.max()) < width
        # the same template values, shuffled onto the random subpopulation
        assert torch.equal(r.template.sort().values, real.template.float().sort().values)
        assert torch.equal(r.subpopulation, r2.subpopulation) and torch.equal(r.template, r2.template)
    assert any(not torch.equal(r.template, o.template) or not torch.equal(r.subpopulation, o.subpopulation)
               for r, o in zip(a, other))
    with pytest.raises(ChunkError, match="Unknown control"):
        control_intervention(Intervention(chunks, "graft"), "shuffle", 0, width)


def test_direction_control_keeps_each_edit_norm_along_a_random_direction(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunk = chunk_at(dictionary, "cheese", 2)
    real = Intervention([chunk], "graft", 0.7, Positions("prompt-last", 3))
    ctrl = control_intervention(real, "direction", 5, tiny_model.hidden_size)
    assert ctrl.describe()["control"] == {"kind": "direction", "seed": 5}
    base, _ = forward_states(tiny_model, IDS)
    edited, _ = forward_states(tiny_model, IDS, real)
    redirected, _ = forward_states(tiny_model, IDS, ctrl)
    real_delta = edited[:, 2] - base[:, 2]  # (T, d): the stream entering block 2, as the block saw it
    ctrl_delta = redirected[:, 2] - base[:, 2]
    assert torch.equal(redirected[:-3], base[:-3])  # positions outside the edit are untouched
    assert torch.allclose(ctrl_delta.norm(dim=-1), real_delta.norm(dim=-1), atol=1e-4)
    u = random_direction(tiny_model.hidden_size, 5, 2)
    for row in ctrl_delta[-3:]:
        assert torch.allclose(row, row.norm() * u, atol=1e-4)
    assert not torch.allclose(ctrl_delta[-3:], real_delta[-3:], atol=1e-3)


def test_continuation_nll_is_the_teacher_forced_log_likelihood(tiny_model):
    from chunktui.engine.perturb import Continuation
    from chunktui.engine.tokens import encode_prompt

    s = Sampling(max_new_tokens=6, temperature=1.0, seed=2, stop_at_eos=False)
    rows = run_arm(tiny_model, ["I like", "The dog ate the cheese in the"], 2, s, None, chat=False, batch_size=4)
    rows.append(Continuation(prompt="I like", seed=0, ids=[], text=""))
    batched = continuation_nll(tiny_model, rows, chat=False, batch_size=3)
    assert batched[-1] == (0.0, 0)
    for row, (nll, n) in zip(rows[:-1], batched):
        ids = encode_prompt(tiny_model, row.prompt, False) + row.ids
        with torch.no_grad():
            logits = tiny_model.model(input_ids=torch.tensor([ids])).logits[0].float()
        p = len(ids) - len(row.ids)
        manual = -sum(float(logits[p - 1 + i].log_softmax(-1)[t]) for i, t in enumerate(row.ids))
        assert n == len(row.ids)
        assert nll == pytest.approx(manual, rel=1e-4, abs=1e-4)


def test_compare_sweep_with_control_arm(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    iv = Intervention(select_chunks(dictionary, ["cheese"], [1, 2]), "graft", 0.0, Positions("prompt"))
    heard = []
    report = compare(tiny_model, iv, ["I like", "The dog", "Some"], samples=2,
                     sampling=Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=1), chat=False,
                     batch_size=4, control_kind="subpopulation", control_seed=7, strengths=[0.0, 1.0],
                     progress=lambda stage, frac, msg: heard.append((stage, frac, msg)))
    out = report.to_json()
    assert [e["strength"] for e in out["sweep"]] == [0.0, 1.0]
    assert out["intervention"]["strength"] == 0.0 and out["control_intervention"]["kind"] == "subpopulation"
    assert out["control_intervention"]["seed"] == 7
    zero, one = out["sweep"]
    # strength 0 edits nothing: every arm equals the control, row for row
    c0 = zero["concepts"]["cheese"]
    assert c0["control_hits"] == c0["perturbed_hits"] == c0["random_hits"]
    assert c0["delta_logprob"] == pytest.approx(0.0, abs=1e-6)
    assert zero["fluency"]["perturbed"]["perplexity"] == pytest.approx(zero["fluency"]["control"]["perplexity"])
    assert all(p["control"] == p["perturbed"] == p["random"] for p in zero["pairs"])
    # strength 1 writes the template: the perturbed arm's text changes and so does its fluency
    assert any(p["control"] != p["perturbed"] for p in one["pairs"])
    assert one["fluency"]["perturbed"]["perplexity"] != pytest.approx(one["fluency"]["control"]["perplexity"])
    for entry in out["sweep"]:
        for arm in ("control", "perturbed", "random"):
            c, f = entry["concepts"]["cheese"], entry["fluency"][arm]
            lo, hi = c[f"{arm}_ci"]
            assert c[f"{arm}_hits"] == round(c[f"{arm}_rate"] * 6) and lo <= c[f"{arm}_rate"] <= hi
            assert f["rows"] == 6 and f["tokens"] > 0 and f["perplexity"] > 1
            assert f["degenerate"] == sum(p["fluency"][arm]["degenerate"] is not None for p in entry["pairs"])
    assert len(out["pairs"]) == 6 and "diff" in out["pairs"][0]
    # progress: every arm starts, and every prompt of every arm is reported done
    stages = {s for s, _, _ in heard}
    assert {"control", "perturbed x0", "random x0", "perturbed x1", "random x1", "fluency"} <= stages
    for stage in ("control", "perturbed x1", "random x1"):
        done = [m for s, _, m in heard if s == stage and " done " in m]
        assert [m.split(" done")[0].split("prompt ")[1] for m in done] == ["1/3", "2/3", "3/3"]


def test_compare_without_sweep_or_control_keeps_the_old_keys(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    iv = Intervention(select_chunks(dictionary, ["cheese"], [1]), "graft", 1.0)
    out = compare(tiny_model, iv, ["I like"], samples=2, sampling=Sampling(max_new_tokens=4, seed=0),
                  chat=False).to_json()
    assert "sweep" not in out and out["control_intervention"] is None
    c = out["concepts"]["cheese"]
    assert {"control_rate", "perturbed_rate", "delta_rate", "logprob_control", "logprob_perturbed",
            "delta_logprob", "control_ci", "perturbed_ci", "delta_ci"} <= set(c)
    assert not any(k.startswith("random") for k in c)
    assert set(out["fluency"]) == {"control", "perturbed"}
    assert "Wilson" in out["settings"]["interval"] and "unperturbed" in out["settings"]["fluency_measure"]
