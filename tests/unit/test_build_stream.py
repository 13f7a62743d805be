"""The streaming build: the same dictionary as the in-memory reference, the calibrated criterion, resuming."""

from __future__ import annotations

import math

import pytest
import torch

from chunktui.engine.build import (Checkpoint, LabelSource, build_dictionary, build_dictionary_in_memory, collect_for,
                                   evaluate_dictionary, evaluate_hidden)
from chunktui.shared.errors import CorpusError, GenerationCancelled
from chunktui.engine.matching import PackedDictionary
from chunktui.engine.pa import PAPER_TOLERANCES, ConceptTemplate, parse_criterion

WORDS = ["cheese", "cake", "dog", "rain"]


def chunk_record(chunk):
    return (chunk.id, chunk.subpopulation.tolist(), chunk.template.tolist(), chunk.threshold, chunk.tolerance,
            {k: v for k, v in chunk.fit.items()})


def assert_same_chunks(a, b):
    assert [c.id for c in a.chunks] == [c.id for c in b.chunks]
    for x, y in zip(a.chunks, b.chunks):
        assert chunk_record(x) == chunk_record(y), x.id


@pytest.mark.parametrize("batch_size", [1, 5])
def test_streaming_equals_in_memory_reference(tiny_model, tiny_corpus, monkeypatch, batch_size):
    # pass 1 runs pass 2's own batches, which are the reference's: every state has the same bits at any batch size
    ref, _ = build_dictionary_in_memory(tiny_model, LabelSource(corpus=tiny_corpus, words=WORDS), n=5,
                                        batch_size=batch_size)
    import chunktui.engine.corpus as hidden

    def no_collect(*a, **k):
        raise AssertionError("the streaming build must not collect the corpus's states")

    monkeypatch.setattr(hidden, "collect", no_collect)
    streamed, report = build_dictionary(tiny_model, LabelSource(corpus=tiny_corpus, words=WORDS), n=5,
                                        batch_size=batch_size)
    assert len(streamed.chunks) == len(ref.chunks) > 10
    assert_same_chunks(streamed, ref)
    assert torch.allclose(streamed.layer_means, ref.layer_means, atol=1e-6)
    assert report.pass1_tokens < report.tokens / (3 if batch_size == 1 else 1)  # only the batches holding R


def test_streaming_evaluation_equals_in_memory(tiny_model, tiny_dict):
    from tests.conftest import make_corpus

    dictionary, _ = tiny_dict
    heldout = make_corpus(seed=5, sentences=40)
    records, corpus = evaluate_dictionary(tiny_model, dictionary, LabelSource(corpus=heldout))
    source = LabelSource(corpus=heldout, words=dictionary.labels(), min_count=1)
    hs, _ = collect_for(tiny_model, source, dictionary.layers())
    reference = evaluate_hidden(dictionary, hs, source.labels(hs, None), tiny_model.hidden_size)
    assert len(corpus.tokens) == len(hs.tokens)
    assert records == reference
    assert any(r.get("tp", 0) > 0 for r in records)


def test_fp_budget_threshold_is_the_order_statistic(tiny_model, tiny_corpus):
    budget = 0.002
    d, _ = build_dictionary(tiny_model, LabelSource(corpus=tiny_corpus, words=WORDS), criterion=f"fp-budget:{budget}",
                            batch_size=5)
    assert d.notes["criterion"] == "fp-budget:0.002" and d.notes["n"] == "all"
    source = LabelSource(corpus=tiny_corpus, words=WORDS)
    hs, _ = collect_for(tiny_model, source, None, batch_size=5)
    labels = source.labels(hs, None)
    packed = PackedDictionary(d.chunks, tiny_model.hidden_size, hs.layers)
    hit = packed.match(hs.H).hit
    checked = 0
    for c, chunk in enumerate(packed.chunks):
        mask = labels.masks[chunk.label]
        n_neg = int((~mask).sum())
        allowed = math.floor(budget * n_neg)
        assert chunk.criterion == "fp-budget:0.002"
        assert chunk.fit["n"] == int(mask.sum())  # the template is the mean of all positives
        assert chunk.fit["fp"] <= allowed
        # the stored counts are what matching the stored chunk gives on the training text
        assert int((hit[:, c] & mask).sum()) == chunk.fit["tp"], chunk.id
        assert int((hit[:, c] & ~mask).sum()) == chunk.fit["fp"], chunk.id
        # by brute force (one layer, to stay quick): theta sits just below the (allowed + 1)-th smallest
        # negative deviation
        if chunk.layer != hs.layers[-1]:
            continue
        checked += 1
        s = hs.layers.index(chunk.layer)
        X = hs.H[mask.nonzero().flatten()]
        k = min(range(len(PAPER_TOLERANCES)), key=lambda i: abs(PAPER_TOLERANCES[i] - chunk.tolerance))
        tpl = ConceptTemplate(chunk.label, mask.nonzero().flatten(), X, torch.tensor(PAPER_TOLERANCES), "cpu")
        negatives = tpl.deviations64(hs.H[~mask])[s, :, k].sort().values
        first_out = float(negatives[allowed])
        assert chunk.threshold == pytest.approx(first_out * (1 - 1e-6), rel=1e-7) or (
            first_out == 0 and False)  # a negative on the template: no chunk at that layer (see test_fp_budget_edges)
    assert checked == len(WORDS)


def test_fp_budget_takes_drawn_template_when_n_given(tiny_model, tiny_corpus):
    d, _ = build_dictionary(tiny_model, LabelSource(corpus=tiny_corpus, words=["cheese"]), n=5,
                            criterion="fp-budget:0.01")
    assert {c.fit["n"] for c in d.chunks} == {5}


@pytest.mark.parametrize("spec, message", [("fp-budget", "as a number"), ("fp-budget:-0.1", "at least 0"),
                                           ("fp-budget:1", "below 1"), ("fp-budget:nan", "below 1"),
                                           ("precision", "Unknown criterion")])
def test_bad_criteria(spec, message):
    with pytest.raises(CorpusError, match=message):
        parse_criterion(spec)


def test_resume_after_interruption_gives_the_same_dictionary(tiny_model, tiny_corpus, tmp_path):
    source = lambda: LabelSource(corpus=tiny_corpus, words=WORDS)  # noqa: E731
    full, _ = build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.003")
    counted = {"batches": 0}

    def progress(stage, fraction, message):
        counted["batches"] += stage == "build"

    def kill_after_some_batches():  # stops like a kill: between batches, partway through pass 2
        return counted["batches"] >= 25

    folder = tmp_path / "x.partial"
    with pytest.raises(GenerationCancelled):
        build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.003", should_stop=kill_after_some_batches,
                         progress=progress, checkpoint=Checkpoint(folder, every=8))
    # the tensors sit in a file named by their digest, which the JSON names (see test_checkpoint_kill_safety)
    assert len(list(folder.glob("rank0.*.safetensors"))) == 1 and (folder / "rank0.json").is_file()
    # other settings are refused, not mixed in
    with pytest.raises(CorpusError, match="other settings"):
        build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.01",
                         checkpoint=Checkpoint(folder, every=8, resume=True))
    resumed, report = build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.003",
                                       checkpoint=Checkpoint(folder, every=8, resume=True))
    assert report.resumed_batches > 0
    assert_same_chunks(resumed, full)
    assert torch.allclose(resumed.layer_means, full.layer_means)


def test_state_cache_on_disk_reads_back_each_layer(tiny_model, tiny_corpus, tmp_path):
    from chunktui.engine.corpus import cache_states, collect, prepare_corpus

    corpus = prepare_corpus(tiny_model.tokenizer, tiny_corpus)
    cache = cache_states(tiny_model, corpus, [1, 3], tmp_path, batch_size=16, shard_bytes=50_000)
    assert len(cache.shards) > 3 and all(p.suffix == ".safetensors" for p in cache.shards)
    hs = collect(tiny_model, tiny_corpus, layers=[1, 3], batch_size=16)
    assert torch.equal(cache.layer(1), hs.H[:, 0]) and torch.equal(cache.layer(3), hs.H[:, 1])


def test_checkpoint_kill_safety_and_tampering(tiny_model, tiny_corpus, tmp_path):
    """A kill between writing the tensors and the JSON leaves the previous checkpoint resumable; an edited
    checkpoint (batches_done 999999, a changed count, other shapes) is refused instead of resumed."""
    import json

    from safetensors.torch import save_file

    source = lambda: LabelSource(corpus=tiny_corpus, words=WORDS)  # noqa: E731
    full, _ = build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.003")
    counted = {"batches": 0}

    def progress(stage, fraction, message):
        counted["batches"] += stage == "build"

    folder = tmp_path / "y.partial"
    with pytest.raises(GenerationCancelled):
        build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.003", progress=progress,
                         should_stop=lambda: counted["batches"] >= 25, checkpoint=Checkpoint(folder, every=8))
    meta_path = folder / "rank0.json"
    meta = json.loads(meta_path.read_text())
    # a kill after the next save wrote its tensors, before its JSON: a stray newer tensor file
    (tensors_file,) = folder.glob("rank0.*.safetensors")
    kept = tensors_file.read_bytes()  # the checkpoint as it was, for the tampering checks below
    save_file({"junk": torch.zeros(3)}, str(folder / "rank0.ffffffffffffffff.safetensors"))
    resumed, report = build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.003",
                                       checkpoint=Checkpoint(folder, every=1000, resume=True))
    assert report.resumed_batches == meta["batches_done"] > 0
    assert_same_chunks(resumed, full)
    # tampering: the count, the tensors' shapes
    for edit, message in (({"batches_done": 999999}, "edited after it was written"),
                          ({"batches_done": 999999, "seal": None}, "edited|batches were done"),
                          ({"digest": "0" * 64}, "edited|does not match")):
        folder.mkdir(exist_ok=True)  # a finished build clears its checkpoint: put the kept one back, edited
        tensors_file.write_bytes(kept)
        meta_path.write_text(json.dumps(dict(meta, **edit)))
        with pytest.raises(CorpusError, match=message):
            build_dictionary(tiny_model, source(), batch_size=4, criterion="fp-budget:0.003",
                             checkpoint=Checkpoint(folder, every=1000, resume=True))
