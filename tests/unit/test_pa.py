"""Population averaging against a small case worked out by hand."""

import pytest
import torch

from chunktui.shared.errors import CorpusError
from chunktui.engine.pa import confusion_scores, draw_positives, fit_concept

# 6 tokens, 1 layer, 3 neurons. Tokens 0-2 are the concept.
H = torch.tensor([
    [[1.0, 0.0, 5.0]],
    [[1.2, 0.1, 3.0]],
    [[0.8, -0.1, 4.0]],
    [[1.1, 0.0, 9.0]],   # close on neurons 0 and 1, far on neuron 2
    [[3.0, 2.0, 4.0]],
    [[1.0, 0.05, 4.0]],  # close everywhere
])
POS = torch.tensor([True, True, True, False, False, False])


def test_fit_matches_hand_computation():
    # n = 3 takes all three positives. By hand:
    #   mu = (1.0, 0.0, 4.0); |H - mu| max over positives = (0.2, 0.1, 1.0)
    #   tau = 0.5  -> M = {0, 1};  tau = 2.0 -> M = {0, 1, 2}
    #   tau 0.5: dev(t) = mean over {0,1} of (h - mu)^2
    #       t0: 0            t1: (0.04+0.01)/2 = 0.025   t2: 0.025  -> theta = 0.025
    #       t3: (0.01+0)/2 = 0.005 (match, FP)  t4: (4+4)/2 = 4  t5: (0+0.0025)/2 = 0.00125 (match, FP)
    #       TP 3, FP 2 -> accuracy 4/6
    #   tau 2.0: dev = mean over {0,1,2}
    #       t0: 1/3   t1: (0.04+0.01+1)/3 = 0.35   t2: 0.35 -> theta = 0.35
    #       t3: (0.01+0+25)/3 = 8.34  t4: (4+4+0)/3 = 2.67  t5: (0+0.0025+0)/3 = 0.000833 (match, FP)
    #       TP 3, FP 1 -> accuracy 5/6  (best)
    fits, R = fit_concept(H, POS, layers=[7], n=3, seed=0, tolerances=(2.0, 0.5), criterion="accuracy")
    assert R.tolist() == [0, 1, 2]
    (fit,) = fits
    assert fit.layer == 7
    assert fit.tolerance == 2.0
    assert fit.subpopulation.tolist() == [0, 1, 2]
    assert torch.allclose(fit.template, torch.tensor([1.0, 0.0, 4.0]))
    assert fit.threshold == pytest.approx(0.35, abs=1e-6)
    assert (fit.stats["tp"], fit.stats["fp"], fit.stats["tn"], fit.stats["fn"]) == (3, 1, 2, 0)
    assert fit.stats["accuracy"] == pytest.approx(5 / 6)
    assert fit.stats["fp_rate"] == pytest.approx(1 / 3)


def test_smaller_tolerance_by_hand():
    fits, _ = fit_concept(H, POS, layers=[0], n=3, tolerances=(0.5,))
    fit = fits[0]
    assert fit.subpopulation.tolist() == [0, 1]
    assert fit.threshold == pytest.approx(0.025, abs=1e-6)
    assert (fit.stats["tp"], fit.stats["fp"]) == (3, 2)


def test_criterion_changes_the_choice():
    # With a rare concept, accuracy prefers a chunk that matches nothing extra; f1 and balanced prefer recall.
    T = 200
    torch.manual_seed(0)
    Hs = torch.randn(T, 1, 4)
    pos = torch.zeros(T, dtype=torch.bool)
    pos[:6] = True
    Hs[:6, 0, :2] = torch.tensor([5.0, 5.0]) + 0.05 * torch.randn(6, 2)
    scores = {}
    for criterion in ("accuracy", "f1", "balanced"):
        fits, _ = fit_concept(Hs, pos, [0], n=3, seed=1, criterion=criterion)
        scores[criterion] = fits[0].stats
    # every criterion's choice is at least as good on its own measure as the others' choices
    for crit in scores:
        for other in scores:
            assert scores[crit][crit] >= scores[other][crit] - 1e-12


def test_draw_is_seeded_and_shared_across_tolerances():
    pos = torch.zeros(50, dtype=torch.bool)
    pos[::3] = True
    a = draw_positives(pos, 5, seed=11)
    b = draw_positives(pos, 5, seed=11)
    c = draw_positives(pos, 5, seed=12)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert all(pos[i] for i in a)
    Hs = torch.randn(50, 2, 8)
    _, R1 = fit_concept(Hs, pos, [0, 1], n=5, seed=11, tolerances=(100.0,))
    _, R2 = fit_concept(Hs, pos, [0, 1], n=5, seed=11, tolerances=(1.0, 0.5, 0.1))
    assert R1.tolist() == R2.tolist() == a.tolist()


def test_empty_subpopulation_never_matches_and_is_not_chosen():
    fits, _ = fit_concept(H, POS, [0], n=3, tolerances=(0.01,))
    assert fits[0].subpopulation.numel() == 0  # nothing stays within 0.01: the caller drops it
    assert fits[0].stats["tp"] == 0 and fits[0].stats["fp"] == 0


def test_no_positives_is_a_clear_error():
    with pytest.raises(CorpusError, match="No positive"):
        fit_concept(H, torch.zeros(6, dtype=torch.bool), [0])


def test_confusion_scores():
    s = confusion_scores(torch.tensor(3), torch.tensor(1), 4, 16)
    assert float(s["tp_rate"]) == 0.75 and float(s["fp_rate"]) == 1 / 16
    assert float(s["accuracy"]) == pytest.approx((3 + 15) / 20)
    assert float(s["f1"]) == pytest.approx(6 / (6 + 1 + 1))
    assert float(s["balanced"]) == pytest.approx((0.75 + 15 / 16) / 2)


def test_fit_statistics_agree_with_matching_on_the_training_text(tiny_model):
    """The chunk matches its own drawn positives, and its stored fit counts equal what matching finds."""
    from chunktui.engine.build import LabelSource, build_dictionary, collect_for, evaluate_hidden

    # repeated sentences give exactly equal states: the threshold sits on the deviation of many tokens
    text = " ".join(["The cheese and the cake.", "A cat ate cheese.", "The cake was good.", "I like cheese cake."] * 20)
    source = LabelSource(corpus=text, words=["cheese", "cake", "cat"])
    dictionary, _ = build_dictionary(tiny_model, source, n=5, seed=0)
    hs, _ = collect_for(tiny_model, LabelSource(corpus=text, words=["cheese", "cake", "cat"]), None)
    labels = source.labels(hs, None)
    records = {r["id"]: r for r in evaluate_hidden(dictionary, hs, labels, tiny_model.hidden_size)}
    for chunk in dictionary.chunks:
        assert records[chunk.id]["tp"] == chunk.fit["tp"], chunk.id
        assert records[chunk.id]["fp"] == chunk.fit["fp"], chunk.id
