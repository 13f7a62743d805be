"""The calibrated criterion (fp-budget:B) at its edges: it never yields a chunk its own file format refuses.

A zero budget means "match no training negative". When a negative's state is
exactly the template on every candidate subpopulation (deviation 0: the same
token as a positive at the embedding layer, or constant states), no threshold
>= 0 can exclude it, so that layer gets no chunk and says why.
"""

from __future__ import annotations

import torch

import pytest

from chunktui.engine.dictionary import Chunk, ChunkDictionary, load_dictionary
from chunktui.engine.pa import StreamingFit, parse_criterion

TOLS = (3.0, 1.0, 0.3, 0.1)


def _fit(states: torch.Tensor, positives: torch.Tensor, budget: float):
    """StreamingFit over synthetic states (T, S, d), all positives drawn, in two batches."""
    T = states.shape[0]
    pos_index = positives.nonzero().flatten()
    fit = StreamingFit({"c": positives}, {"c": pos_index}, list(range(states.shape[1])), TOLS,
                       parse_criterion(f"fp-budget:{budget}"))
    fit.set_positives(pos_index, states[pos_index])
    half = T // 2
    fit.update(torch.arange(half), states[:half])
    fit.update(torch.arange(half, T), states[half:])
    return fit, fit.finish()["c"]


def _valid(fits, T=None):
    """Every fit with a subpopulation saves and loads (the file validator accepts it)."""
    chunks = [Chunk(id=f"c@{f.layer}", label="c", layer=f.layer, subpopulation=f.subpopulation, template=f.template,
                    threshold=f.threshold, tolerance=f.tolerance) for f in fits if f.subpopulation.numel()]
    for c in chunks:
        assert c.threshold >= 0 and torch.isfinite(torch.tensor(c.threshold))
    return chunks


def _save_load(chunks, d, L, tmp_path):
    path = tmp_path / "x.chunks.safetensors"
    ChunkDictionary(model={"name": "t", "hidden_size": d, "n_layers": L}, chunks=chunks).save(path)
    return load_dictionary(path)


@pytest.mark.parametrize("budget", [0.0, 0.1])
def test_negatives_all_farther_than_positives(budget, tmp_path):
    g = torch.Generator().manual_seed(0)
    T, S, d = 60, 2, 8
    positives = torch.zeros(T, dtype=torch.bool)
    positives[:20] = True
    states = torch.randn(T, S, d, generator=g) * 0.01
    states[~positives] += 5.0  # every negative far away from the positives' template
    fit, fits = _fit(states, positives, budget)
    chunks = _valid(fits)
    assert len(chunks) == S
    for f in fits:
        assert f.stats["fp"] <= int(budget * 40) and f.stats["tp"] == 20  # every positive in, negatives in budget
    assert len(_save_load(chunks, d, S, tmp_path)) == S


def test_positives_and_negatives_tie():
    """A negative with exactly a positive's state: the threshold sits below both (valid, FP within budget)."""
    g = torch.Generator().manual_seed(1)
    T, S, d = 40, 1, 6
    positives = torch.zeros(T, dtype=torch.bool)
    positives[:10] = True
    states = torch.randn(T, S, d, generator=g) * 0.05
    states[~positives] += 3.0
    states[30] = states[0]  # a negative identical to a positive (but not to the template)
    fit, fits = _fit(states, positives, 0.0)
    chunks = _valid(fits)
    assert len(chunks) == 1
    assert fits[0].stats["fp"] == 0
    assert fits[0].stats["tp"] <= 9  # the tied positive cannot be kept without the negative


def test_constant_states_give_no_chunk_and_say_why():
    T, S, d = 30, 2, 4
    positives = torch.zeros(T, dtype=torch.bool)
    positives[::3] = True
    states = torch.ones(T, S, d)
    fit, fits = _fit(states, positives, 0.0)
    assert _valid(fits) == []
    assert all(f.subpopulation.numel() == 0 and "deviation 0" in f.note and "fp-budget:0" in f.note for f in fits)


def test_a_negative_on_the_template_at_one_layer_only_drops_that_layer():
    """Layer 0 (like an embedding): a negative shares the positives' exact state; layer 1 separates them."""
    g = torch.Generator().manual_seed(2)
    T, d = 40, 6
    positives = torch.zeros(T, dtype=torch.bool)
    positives[:8] = True
    states = torch.randn(T, 2, d, generator=g) + 4.0
    states[:8, 0] = 1.0  # every positive has one state at layer 0 ...
    states[20, 0] = 1.0  # ... and so does one negative (deviation 0 on every subpopulation)
    states[:8, 1] = torch.randn(8, d, generator=g) * 0.01
    fit, fits = _fit(states, positives, 0.0)
    assert fits[0].subpopulation.numel() == 0 and "deviation 0" in fits[0].note
    assert fits[1].subpopulation.numel() > 0 and fits[1].stats["fp"] == 0 and fits[1].threshold >= 0
    # a budget that allows one false positive keeps layer 0 (its threshold is then >= 0 as well)
    fit, fits = _fit(states, positives, 0.05)
    assert _valid(fits) and fits[0].stats["fp"] <= 1


def test_no_negatives_threshold_keeps_every_positive():
    g = torch.Generator().manual_seed(3)
    T, S, d = 12, 1, 5
    positives = torch.ones(T, dtype=torch.bool)
    states = torch.randn(T, S, d, generator=g)
    fit, fits = _fit(states, positives, 0.0)
    chunks = _valid(fits)
    assert len(chunks) == 1 and fits[0].stats["tp"] == T
    assert fits[0].threshold < 1e6  # the largest positive deviation, not a float's maximum


def test_zero_budget_build_on_the_tiny_model_saves_and_loads(tiny_model, tiny_corpus, tmp_path):
    """A build whose layer 0 has negatives on the template (same token, embedding layer) still succeeds."""
    from chunktui.engine.build import LabelSource, build_dictionary

    source = LabelSource(corpus=tiny_corpus, words=["cheese", "cake", "cheesecake*"])
    d, report = build_dictionary(tiny_model, source, criterion="fp-budget:0", batch_size=8)
    assert d.chunks and all(c.threshold >= 0 for c in d.chunks)
    assert all(c.fit["fp"] == 0 for c in d.chunks)
    for where, why in report.unfit.items():
        assert "deviation 0" in why and where not in {c.id for c in d.chunks}
    path = tmp_path / "z.chunks.safetensors"
    d.save(path)
    assert len(load_dictionary(path)) == len(d.chunks)


def test_a_build_with_no_fittable_layer_refuses_with_the_reason(tiny_model, monkeypatch):
    from chunktui.engine.build import LabelSource, build_dictionary
    from chunktui.shared.errors import CorpusError

    text = " ".join(["the cheese is good."] * 30)
    # constant states (a patched model run): every negative lies on the template at every layer
    import chunktui.engine.corpus as corpus_mod

    real = corpus_mod.run_batch

    def constant(loaded, corpus, batch, layers):
        index, states = real(loaded, corpus, batch, layers)
        return index, torch.ones_like(states)

    monkeypatch.setattr(corpus_mod, "run_batch", constant)
    with pytest.raises(CorpusError, match="No chunk could be fitted.*deviation 0"):
        build_dictionary(tiny_model, LabelSource(corpus=text, words=["cheese"], min_count=2), layers=[0, 1],
                         criterion="fp-budget:0")
