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
