"""The token-level colour rule: calibration meets its budget, matching applies it, dictionaries store it."""

import math

import pytest
import torch
from click.testing import CliRunner

from chunktui.engine.calibrate import calibrate_required
from chunktui.shared.evidence import TokenRule, confidence_text


def _synthetic(seed=0, T=4000, K=3):
    g = torch.Generator().manual_seed(seed)
    positives = torch.zeros(T, K, dtype=torch.bool)
    for k in range(K):
        positives[torch.randperm(T, generator=g)[:60], k] = True
    E = torch.randn(T, K, generator=g, dtype=torch.float64) * 3 - 4  # negatives: mostly below 0, a tail above
    E[positives] = torch.randn(int(positives.sum()), generator=g, dtype=torch.float64) * 3 + 10
    return E, positives


@pytest.mark.parametrize("budget", [0.0, 0.002, 0.01, 0.05])
def test_calibration_meets_the_budget_for_each_concept_and_all_together(budget):
    E, positives = _synthetic()
    rule = calibrate_required(E, positives, ["a", "b", "c"], budget=budget)
    required = torch.tensor([rule.required[k] for k in "abc"], dtype=torch.float64)
    passes = E >= required
    non_concept = ~positives.any(1)
    assert int((passes.any(1) & non_concept).sum()) <= math.floor(budget * int(non_concept.sum()))
    for k in range(3):
        assert int((passes[:, k] & ~positives[:, k]).sum()) <= math.floor(budget * int((~positives[:, k]).sum()))
    assert rule.overall["coloured_non_concept"] == int((passes.any(1) & non_concept).sum())


def test_a_looser_budget_never_raises_a_requirement():
    E, positives = _synthetic(seed=1)
    tight = calibrate_required(E, positives, ["a", "b", "c"], budget=0.001)
    loose = calibrate_required(E, positives, ["a", "b", "c"], budget=0.02)
    assert all(loose.required[k] <= tight.required[k] for k in "abc")


def test_confidence_is_the_training_precision_at_that_evidence():
    rule = TokenRule(required={"x": 1.0}, per_label={"x": {"positives": 4, "pos_evidence": [2.0, 3.0, 5.0, 9.0],
                                                           "neg_evidence": [1.5, 2.5, 6.0]}})
    assert rule.confidence("x", 1.0) == (4 / 7, 7)  # every training token that passed
    assert rule.confidence("x", 5.0) == (2 / 3, 3)  # 5, 9 against 6
    assert rule.confidence("x", 100.0) == (1.0, 1)  # beyond the training range: the top level
    assert rule.confidence("y", 5.0) is None
    assert confidence_text(rule, "x", 5.0, 20, 30) == "20/30 layers · 67% right in training (n 3)"
    assert TokenRule.from_json(rule.to_json()) == rule
    with pytest.raises(ValueError):
        TokenRule.from_json({"kind": "magic"})


def _brute_force(packed, rule, score, hit):
    """The rule, token by token, in plain Python: what `PackedDictionary` must decide."""
    out = []
    for t in range(score.shape[0]):
        best = None
        for label in packed.concepts:
            cols = [c for c, ch in enumerate(packed.chunks) if ch.label == label and ch.layer in rule.voting(packed.layers)]
            ev = sum(max(-rule.cap, min(rule.cap, float(score[t, c]))) for c in cols)
            if not any(bool(hit[t, c]) for c in cols) or ev < rule.required[label]:
                continue
            margin = ev - rule.required[label]
            if best is None or margin > best[0]:
                best = (margin, label)
        out.append(None if best is None else best[1])
    return out


def test_matching_applies_the_rule_and_layer_0_never_votes_by_default(tiny_model, tiny_dict):
    from chunktui.engine.matching import PackedDictionary

    dictionary, _ = tiny_dict
    S = tiny_model.layout.n_states
    rule = TokenRule(required={label: -3.0 for label in dictionary.labels()})  # a loose rule: layers 1+ vote
    packed = PackedDictionary(dictionary.chunks, tiny_model.hidden_size, list(range(S)), rule=rule)
    assert packed.voting_layers == list(range(1, S))
    g = torch.Generator().manual_seed(0)
    H = torch.randn(40, S, tiny_model.hidden_size, generator=g)
    # a state equal to cheese's layer-0 template at layer 0 only: it matches there, and is not coloured for it
    cheese0 = next(c for c in packed.chunks if c.label == "cheese" and c.layer == 0)
    H[0, 0, cheese0.subpopulation] = cheese0.template
    m = packed.match(H)
    assert bool(m.hit[0, packed.chunks.index(cheese0)])
    labels = [packed.chunks[c].label if c >= 0 else None for c in m.token_chunk.tolist()]
    assert labels == _brute_force(packed, rule, m.score, m.hit)
    for t, c in enumerate(m.token_chunk.tolist()):
        if c >= 0:  # the chunk standing for the concept is a voting hit of that concept
            assert bool(m.hit[t, c]) and packed.chunks[c].layer != 0
            assert int(m.token_agree[t]) == sum(bool(m.hit[t, k]) for k, ch in enumerate(packed.chunks)
                                                if ch.label == packed.chunks[c].label and ch.layer != 0)
        else:
            assert math.isnan(float(m.token_evidence[t])) and int(m.token_agree[t]) == 0


def test_build_stores_a_rule_that_meets_its_budget_on_the_training_text(tiny_model, tiny_corpus, tmp_path):
    from chunktui.engine.build import LabelSource, build_dictionary
    from chunktui.engine.corpus import prepare_corpus, run_batch, schedule
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.matching import PackedDictionary

    words = ["cheese", "cake", "bread", "dog", "rain"]
    dictionary, report = build_dictionary(tiny_model, LabelSource(corpus=tiny_corpus, words=words), layers=[0, 2, 3, 4],
                                          colour_budget=0.02)
    rule = dictionary.token_rule()
    assert rule.calibrated and rule.voting_layers == [2, 3, 4] and rule.budget == 0.02
    assert set(rule.required) == set(dictionary.labels()) and report.calibrate_seconds > 0
    path = dictionary.save(tmp_path / "d.chunks.safetensors")
    assert load_dictionary(path).token_rule() == rule
    # an independent pass: the stored rule colours at most 2% of the training tokens that are no concept
    source = LabelSource(corpus=tiny_corpus, words=words)
    corpus = prepare_corpus(tiny_model.tokenizer, tiny_corpus, "sentence")
    labels = source.labels(corpus, None)
    packed = PackedDictionary(dictionary.chunks, tiny_model.hidden_size, [0, 2, 3, 4], rule=rule)
    shown = torch.full((len(corpus.tokens),), -1)
    for batch in schedule(corpus, 16):
        index, states = run_batch(tiny_model, corpus, batch, [0, 2, 3, 4])
        shown[index] = packed.match(states).token_chunk
    non_concept = ~torch.stack(list(labels.masks.values())).any(0)
    coloured = int(((shown >= 0) & non_concept).sum())
    assert coloured == rule.overall["coloured_non_concept"] <= 0.02 * int(non_concept.sum())


def test_an_old_dictionary_gets_the_uncalibrated_rule_and_calibrate_adds_one(tiny_dict, tiny_corpus, tmp_path):
    from chunktui.cli import main
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.errors import DictionaryError

    dictionary, _ = tiny_dict
    old = load_dictionary(dictionary.save(tmp_path / "copy.chunks.safetensors"))
    old.notes = {k: v for k, v in old.notes.items() if k != "token_rule"}
    old_path = old.save(tmp_path / "old.chunks.safetensors")
    rule = load_dictionary(old_path).token_rule()
    assert not rule.calibrated and "calibrate" in rule.note and rule.voting_layers == [1, 2, 3, 4]
    corpus = tmp_path / "train.txt"
    corpus.write_text(tiny_corpus)
    out = tmp_path / "new.chunks.safetensors"
    r = CliRunner().invoke(main, ["calibrate", "--model", "random:llama-tiny", "--dict", str(old_path), "--corpus",
                                  str(corpus), "--budget", "0.01", "--out", str(out)])
    assert r.exit_code == 0, r.output
    new = load_dictionary(out).token_rule()
    assert new.calibrated and new.budget == 0.01 and new.overall["rate"] <= 0.01
    bad = load_dictionary(out)
    bad.notes["token_rule"] = {"kind": "magic"}
    bad_path = bad.save(tmp_path / "bad.chunks.safetensors")
    with pytest.raises(DictionaryError, match="colour rule is malformed"):
        load_dictionary(bad_path)
    r = CliRunner().invoke(main, ["calibrate", "--model", "random:llama-tiny", "--dict", str(old_path), "--corpus",
                                  str(corpus), "--budget", "1.5", "--out", str(tmp_path / "x.chunks.safetensors")])
    assert r.exit_code == 2 and "budget" in r.output


def test_evaluate_reports_the_colour_rule_on_held_out_text(tiny_dict, tmp_path):
    import json

    from chunktui.cli import main
    from tests.conftest import make_corpus

    _, path = tiny_dict
    held_out = tmp_path / "held.txt"
    held_out.write_text(make_corpus(seed=7, sentences=30))
    out = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["evaluate", "--model", "random:llama-tiny", "--dict", str(path), "--corpus",
                                  str(held_out), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "colour rule on this text" in r.output
    figures = json.loads(out.read_text())["colour_rule"]
    assert figures["calibrated"] and 0 <= figures["coloured_non_concept"] <= figures["non_concept"]
    assert figures["shown_own"] == sum(v["shown_own"] for v in figures["by_label"].values())
    assert figures["concept_tokens"] == sum(v["positives"] for v in figures["by_label"].values()) > 0
    # this fixture's rule is layer 0 alone: the embedding of a concept word is its template, so every one shows
    assert figures["recall"] == 1.0
