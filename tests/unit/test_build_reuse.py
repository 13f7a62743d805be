"""Pass 3 (the colour rule) reads pass 2's states back instead of running the model again: the same dictionary."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import chunktui.engine.corpus as corpus_module
from chunktui.engine.build import LabelSource, build_dictionary
from chunktui.engine.corpus import BatchStates

WORDS = ["cheese", "cake", "dog", "rain"]


def _dump(dictionary, path):
    dictionary.save(path)
    with safe_open(str(path), "pt") as f:
        return {k: (str(f.get_tensor(k).dtype), f.get_tensor(k).numpy().tobytes()) for k in f.keys()}


def _counting(monkeypatch):
    calls = []
    real = corpus_module.run_batch

    def counted(loaded, corpus, batch, layers):
        calls.append(tuple(batch))
        return real(loaded, corpus, batch, layers)

    monkeypatch.setattr(corpus_module, "run_batch", counted)
    return calls


def _build(tiny_model, tiny_corpus, **kw):
    return build_dictionary(tiny_model, LabelSource(corpus=tiny_corpus, words=WORDS), n=5, batch_size=5, **kw)


def test_reused_states_give_the_same_dictionary_and_rule_without_a_third_forward(tiny_model, tiny_corpus, tmp_path,
                                                                                  monkeypatch):
    calls = _counting(monkeypatch)
    again, _ = _build(tiny_model, tiny_corpus, reuse_states=False)
    again_calls = list(calls)
    calls.clear()
    reused, report = _build(tiny_model, tiny_corpus, reuse_states=True)
    batches = [tuple(b) for b in corpus_module.schedule(corpus_module.prepare_corpus(tiny_model.tokenizer,
                                                                                      tiny_corpus), 5)]
    # every batch ran through the model once: pass 2 read pass 1's batches back, pass 3 read them all back
    assert sorted(calls) == sorted(batches)
    # without reuse: pass 1 ran some of pass 2's own batches, then passes 2 and 3 ran every batch in order
    first = len(again_calls) - 2 * len(batches)
    assert 0 < first < len(batches) and set(again_calls[:first]) <= set(batches)
    assert again_calls[first:] == batches * 2
    assert 0 < report.pass1_reused_tokens == report.pass1_tokens < report.tokens
    assert report.calibrate_seconds > 0 and "token_rule" in reused.notes
    a, b = _dump(reused, tmp_path / "a.chunks.safetensors"), _dump(again, tmp_path / "b.chunks.safetensors")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert json.dumps(reused.notes, sort_keys=True) == json.dumps(again.notes, sort_keys=True)
    assert reused.notes["token_rule"]["per_label"]  # a rule with figures, not an empty one on both sides


def test_batches_not_kept_run_the_model_and_give_the_same_rule(tiny_model, tiny_corpus, monkeypatch):
    again, _ = _build(tiny_model, tiny_corpus, reuse_states=False)
    put = BatchStates.put

    def every_other(self, key, index, states):  # as when the disk fills up, or a resumed build's first batches
        return put(self, key, index, states) if key % 2 else False

    monkeypatch.setattr(BatchStates, "put", every_other)
    calls = _counting(monkeypatch)
    partly, _ = _build(tiny_model, tiny_corpus, reuse_states=True)
    batches = corpus_module.schedule(corpus_module.prepare_corpus(tiny_model.tokenizer, tiny_corpus), 5)
    assert calls[-len(batches) // 2:] == [tuple(b) for b in batches[::2]]  # pass 3 ran the even batches only
    assert json.dumps(partly.notes, sort_keys=True) == json.dumps(again.notes, sort_keys=True)


def test_batch_states_read_back_the_same_bytes_and_clean_up(tmp_path):
    kept = BatchStates(folder=tmp_path)
    index, states = torch.arange(7, 12), torch.randn(5, 3, 8)
    assert kept.put(4, index, states)
    assert kept.get(3) is None
    got_index, got_states = kept.get(4)
    assert torch.equal(got_index, index) and got_states.dtype == states.dtype
    assert got_states.numpy().tobytes() == states.numpy().tobytes()
    kept.close()
    assert list(tmp_path.iterdir()) == [] and kept.get(4) is None


def test_batch_states_keep_nothing_when_the_disk_is_short(tmp_path):
    kept = BatchStates(folder=tmp_path, keep_free_bytes=1 << 62)  # more free space asked for than any disk has
    assert not kept.put(0, torch.arange(3), torch.zeros(3, 2, 4))
    assert kept.full and kept.get(0) is None
    kept.close()


def test_batch_states_keep_any_dtype_and_bound_the_queue(tmp_path, monkeypatch):
    kept = BatchStates(folder=tmp_path, pending=2)
    written = []
    real = BatchStates._write
    monkeypatch.setattr(BatchStates, "_write", staticmethod(lambda path, states: written.append(path) or
                                                            real(path, states)))
    batches = {k: (torch.arange(k, k + 4), torch.randn(4, 2, 6).to(dtype))
               for k, dtype in enumerate([torch.bfloat16, torch.float16, torch.float32, torch.float64])}
    for k, (index, states) in batches.items():
        assert kept.put(k, index, states)
        assert len(kept._queue) <= 2  # at most `pending` batches wait in memory for the writer
    for k, (index, states) in batches.items():
        got_index, got_states = kept.get(k)
        assert torch.equal(got_index, index) and got_states.dtype == states.dtype
        assert got_states.view(torch.uint8).numpy().tobytes() == states.view(torch.uint8).numpy().tobytes()
    assert len(written) == 4
    kept.close()


def test_batch_states_that_failed_to_write_or_were_cut_read_back_as_none(tmp_path, monkeypatch):
    kept = BatchStates(folder=tmp_path)

    def no_space(path, states):
        open(path, "wb").write(b"\0" * 8)  # a partial file, then the disk is full
        raise OSError(28, "No space left on device")

    assert kept.put(0, torch.arange(3), torch.randn(3, 2, 4))
    monkeypatch.setattr(BatchStates, "_write", staticmethod(no_space))
    assert kept.put(1, torch.arange(3), torch.randn(3, 2, 4))
    monkeypatch.undo()
    assert kept.get(1) is None and not kept._path(1).exists()  # the partial file is gone too
    assert kept.get(0) is not None
    with open(kept._path(0), "r+b") as f:  # cut short after it was written
        f.truncate(10)
    assert kept.get(0) is None
    kept.close()
    assert list(tmp_path.iterdir()) == []


def test_states_stay_in_memory_only_when_they_fit_comfortably(tmp_path, monkeypatch):
    import chunktui.engine.corpus as corpus_mod

    monkeypatch.delenv("CHUNKTUI_STATES_DIR", raising=False)
    monkeypatch.setattr(corpus_mod, "available_bytes", lambda device: 30 << 30)
    assert BatchStates.choose_folder(1 << 30) == corpus_mod.MEMORY
    assert BatchStates.choose_folder(11 << 30) is None  # over a third of the memory available: the disk
    assert BatchStates.choose_folder(0) is None  # size unknown: the disk
    monkeypatch.setenv("CHUNKTUI_STATES_DIR", str(tmp_path))
    assert BatchStates.choose_folder(1 << 30) == str(tmp_path)  # the user's choice wins
    monkeypatch.delenv("CHUNKTUI_STATES_DIR")
    kept = BatchStates(expected_bytes=1 << 30)
    assert kept.held and kept.in_memory and kept.folder is None and kept.where == "memory"
    states = torch.randn(2, 2, 3)
    assert kept.put(0, torch.arange(2), states)
    index, got = kept.get(0)
    assert got.data_ptr() == states.data_ptr() and torch.equal(index, torch.arange(2))  # held: no copy
    # when the memory left runs short, later batches are not kept (and read back as None)
    monkeypatch.setattr(corpus_mod, "available_bytes", lambda device: 1 << 20)
    assert not kept.put(1, torch.arange(2), torch.randn(2, 2, 3)) and kept.get(1) is None
    assert kept.get(0) is not None and kept.bytes == states.numel() * 4 + 2 * 8
    kept.close()
    assert kept.get(0) is None


def test_states_on_disk_are_mapped_back_with_their_bytes(tmp_path):
    kept = BatchStates(folder=tmp_path)
    assert not kept.held and kept.where == str(tmp_path)
    states = {torch.float32: torch.randn(3, 2, 5), torch.bfloat16: torch.randn(4, 2, 5).bfloat16()}
    for key, x in enumerate(states.values()):
        assert kept.put(key, torch.arange(len(x)) + 10 * key, x)
    for key, x in enumerate(states.values()):
        index, got = kept.get(key)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert got.view(torch.uint8).numpy().tobytes() == x.view(torch.uint8).numpy().tobytes()
        assert torch.equal(index, torch.arange(len(x)) + 10 * key)
    # a file cut short reads back as None (the caller runs the model), and is forgotten
    path = next(kept.folder.iterdir())
    path.write_bytes(path.read_bytes()[:7])
    key = int(path.stem)
    assert kept.get(key) is None and key not in kept.stored
    kept.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("t", [1, 2, 7, 16, 33, 257, 1000, 4097])
def test_layer_sums_have_the_bits_of_one_float64_sum(t):
    """The build's layer sums (for the layer means) one layer at a time: the same bits as the whole batch at once."""
    from chunktui.engine.build import layer_sums

    g = torch.Generator().manual_seed(t)
    states = torch.randn(t, 5, 33, generator=g) * torch.logspace(-3, 4, 33)  # magnitudes over seven decades
    assert torch.equal(layer_sums(states), states.double().sum(0))
    assert torch.equal(layer_sums(states.bfloat16()), states.bfloat16().double().sum(0))


def test_without_a_colour_rule_pass_2_lets_each_kept_batch_go_once_read(tiny_model, tiny_corpus, tmp_path,
                                                                         monkeypatch):
    """No pass 3: each batch pass 1 kept is discarded as soon as pass 2 has read it, nothing is put in pass 2,
    and the dictionary is the one built without reuse."""
    again, _ = _build(tiny_model, tiny_corpus, reuse_states=False, colour_budget=None)
    discarded, put = [], BatchStates.put
    monkeypatch.setattr(BatchStates, "discard", lambda self, key: discarded.append(key) or _real_discard(self, key))
    puts = []
    monkeypatch.setattr(BatchStates, "put", lambda self, key, index, states: puts.append(key) or put(self, key, index,
                                                                                                       states))
    reused, report = _build(tiny_model, tiny_corpus, reuse_states=True, colour_budget=None)
    assert sorted(discarded) == sorted(puts) and len(puts) > 0  # every batch put in pass 1, let go in pass 2
    assert report.pass1_reused_tokens == report.pass1_tokens
    a, b = _dump(reused, tmp_path / "a.chunks.safetensors"), _dump(again, tmp_path / "b.chunks.safetensors")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


_real_discard = BatchStates.discard


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_discarded_batch_is_gone(tmp_path, on_disk):
    kept = BatchStates(folder=tmp_path) if on_disk else BatchStates(expected_bytes=1 << 20)
    for key in range(3):
        assert kept.put(key, torch.arange(2) + 2 * key, torch.randn(2, 2, 3))
    kept.discard(1)
    assert kept.get(1) is None and kept.get(0) is not None and kept.get(2) is not None
    if on_disk:
        assert len(list(kept.folder.iterdir())) == 2  # its file is removed
    assert kept.put(3, torch.arange(2), torch.randn(2, 2, 3)) and kept.get(3) is not None  # the queue still works
    kept.close()
