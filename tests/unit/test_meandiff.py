"""Mean-difference direction chunks: the direction is the concept mean minus the corpus mean, the cosine threshold
keeps the training false positives within the budget, and the CLI refuses what the method cannot do."""

from __future__ import annotations

import math

import pytest
import torch

from chunktui.engine.build import LabelSource, collect_for
from chunktui.engine.matching import PackedDictionary
from chunktui.engine.meandiff import build_mean_difference

WORDS = ["cheese", "cake", "dog", "rain"]


@pytest.fixture(scope="module")
def built(tiny_model, tiny_corpus):
    source = LabelSource(corpus=tiny_corpus, words=WORDS, step=1)
    dictionary, report = build_mean_difference(tiny_model, source, budget=0.01, batch_size=4)
    hs, _ = collect_for(tiny_model, LabelSource(corpus=tiny_corpus, words=WORDS, step=1), None, batch_size=4)
    labels = LabelSource(corpus=tiny_corpus, words=WORDS, step=1).labels(hs, None)
    return dictionary, report, hs, labels


def test_directions_are_the_normalised_difference_of_means(built):
    dictionary, report, hs, labels = built
    assert {c.kind for c in dictionary.chunks} == {"direction"}
    assert {c.step for c in dictionary.chunks} == {1} and all("+s1" in c.id for c in dictionary.chunks)
    H = hs.H.double()  # (T, S, d)
    checked = 0
    for chunk in dictionary.chunks:
        s = hs.layers.index(chunk.layer)
        mask = labels.masks[chunk.label]
        diff = H[mask, s].mean(0) - H[:, s].mean(0)
        expected = (diff / diff.norm()).float()
        assert torch.allclose(chunk.direction, expected, atol=1e-5), chunk.id
        assert abs(float(chunk.direction.norm()) - 1.0) < 1e-5
        # typical: the positives' mean projection on the direction
        assert chunk.typical == pytest.approx(float((H[mask, s] @ expected.double()).mean()), rel=1e-4, abs=1e-4)
        checked += 1
    assert checked == len(WORDS) * len(hs.layers)
    layer_means = dictionary.layer_means[hs.layers]
    assert torch.allclose(layer_means, H.mean(0).float(), atol=1e-5)


def test_threshold_keeps_training_false_positives_within_budget(built):
    dictionary, report, hs, labels = built
    packed = PackedDictionary(dictionary.chunks, hs.H.shape[-1], hs.layers)
    result = packed.match(hs.H)
    hit, value = result.hit, result.value  # (T, C): matched, cosine
    for c, chunk in enumerate(packed.chunks):
        mask = labels.masks[chunk.label]
        allowed = math.floor(0.01 * int((~mask).sum()))
        fp = int((hit[:, c] & ~mask).sum())
        tp = int((hit[:, c] & mask).sum())
        assert fp <= allowed, chunk.id
        assert fp == chunk.fit["fp"] and tp == chunk.fit["tp"], chunk.id  # the stored counts are the matcher's
        assert chunk.fit["tp_rate"] == tp / int(mask.sum()) and chunk.fit["fp_rate"] == fp / int((~mask).sum())
        assert chunk.criterion == "fp-budget:0.01" and chunk.method == "mean-difference"
        # the threshold sits just above the first negative it keeps out (ties go out together), not far above it
        out = value[~mask & ~hit[:, c], c]
        assert chunk.threshold - 3e-5 <= float(out.max()) < chunk.threshold, chunk.id


def test_the_build_calibrates_a_colour_rule(built):
    dictionary, report, hs, labels = built
    rule = dictionary.token_rule()
    assert rule.budget == 0.01 and "calibrated" in rule.describe()
    assert report.calibrate_seconds > 0


def test_suppress_removes_the_direction(tiny_model, built):
    from chunktui.engine.perturb import _LayerEdit

    dictionary, _, hs, _ = built
    chunk = next(c for c in dictionary.chunks if c.label == "cheese" and c.layer == 2)
    edit = _LayerEdit([chunk], "suppress", 1.0, None, "cpu", torch.float32)
    h = hs.H[:7, 2][None]  # (1, 7, d)
    out = edit.apply(h, None)
    u = chunk.direction
    assert torch.allclose(out[0] @ u, torch.zeros(7), atol=1e-4)  # the component is gone
    rest = h[0] - (h[0] @ u)[:, None] * u
    assert torch.allclose(out[0], rest, atol=1e-5)  # and nothing else moved


def _checks_then_build(tmp_path, tiny_corpus):
    """The CLI's refusals for mean-difference, then a one-process build (returned)."""
    from click.testing import CliRunner

    from chunktui.cli import main as cli

    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny_corpus, encoding="utf-8")
    base = ["build", "--model", "random:llama-tiny", "--corpus", str(corpus), "--words", "cheese,dog",
            "--method", "mean-difference", "--out", str(tmp_path / "d.chunks.safetensors")]
    runner = CliRunner()
    for extra, message in ((["--n", "5"], "uses every positive"), (["--criterion", "accuracy"], "fp-budget:B"),
                           (["--resume"], "keeps none")):
        result = runner.invoke(cli, base + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output
    assert not (tmp_path / "d.chunks.safetensors").exists()
    result = runner.invoke(cli, base + ["--layers", "1-2"])
    assert result.exit_code == 0, result.output
    assert "mean-difference, fp-budget:0.001" in " ".join(result.output.split())
    from chunktui.engine.dictionary import load_dictionary

    d = load_dictionary(tmp_path / "d.chunks.safetensors")
    assert {c.kind for c in d.chunks} == {"direction"} and {c.layer for c in d.chunks} == {1, 2}
    return d


def test_cli_method_checks(tmp_path, tiny_corpus):
    d = _checks_then_build(tmp_path, tiny_corpus)
    assert d.notes["method"] == "mean-difference" and "token_rule" in d.notes


def test_cli_two_processes_build_the_same_dictionary(tmp_path, tiny_corpus):
    import subprocess
    import sys

    one = _checks_then_build(tmp_path, tiny_corpus)
    corpus = tmp_path / "c.txt"
    out = tmp_path / "two.chunks.safetensors"
    # no --criterion: the default budget must reach the workers too
    result = subprocess.run([sys.executable, "-m", "chunktui", "build", "--model", "random:llama-tiny", "--corpus",
                             str(corpus), "--words", "cheese,dog", "--method", "mean-difference", "--layers", "1-2",
                             "--procs", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    from chunktui.engine.dictionary import load_dictionary

    two = load_dictionary(out)
    assert [c.id for c in two.chunks] == [c.id for c in one.chunks]
    for a, b in zip(one.chunks, two.chunks):
        assert a.threshold == b.threshold and a.fit["tp"] == b.fit["tp"] and a.fit["fp"] == b.fit["fp"], a.id
        assert torch.allclose(a.direction, b.direction, atol=1e-6)
