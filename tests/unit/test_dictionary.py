"""Dictionary files: round trip, and a specific refusal for every kind of bad file."""

import json

import pytest
import torch
from safetensors.torch import save_file

from chunktui.engine.dictionary import Chunk, ChunkDictionary, load_dictionary
from chunktui.shared.errors import DictionaryError, IncompatibleDictionaryError
from chunktui.engine.models import load_model


def test_round_trip(tiny_dict, tiny_model):
    original, path = tiny_dict
    loaded = load_dictionary(path, identity=tiny_model.identity())
    assert len(loaded) == len(original) > 0
    for a, b in zip(original.chunks, loaded.chunks):
        assert (a.id, a.label, a.layer, a.kind, a.step, a.criterion, a.seed) == (b.id, b.label, b.layer, b.kind, b.step, b.criterion, b.seed)
        assert torch.equal(a.subpopulation, b.subpopulation)
        assert torch.equal(a.template, b.template)
        assert a.threshold == b.threshold and a.tolerance == b.tolerance
        assert a.fit == b.fit
        assert a.corpus_digest == b.corpus_digest
    assert loaded.model == original.model
    assert loaded.notes["label_mode"] == "exact"
    assert torch.allclose(loaded.layer_means, original.layer_means)


def test_made_for_another_architecture(tiny_dict):
    _, path = tiny_dict
    other = load_model("random:gpt2-tiny")
    with pytest.raises(IncompatibleDictionaryError, match="made for random:llama-tiny .*3 layers"):
        load_dictionary(path, identity=other.identity())


def test_same_shape_different_weights(tiny_dict):
    _, path = tiny_dict
    other = load_model("random:llama-tiny:7")  # same config, other seed
    with pytest.raises(IncompatibleDictionaryError, match="same shape but different weights"):
        load_dictionary(path, identity=other.identity())


def test_fingerprint_survives_dtype(tiny_dict):
    _, path = tiny_dict
    bf16 = load_model("random:llama-tiny", dtype="bfloat16")
    assert load_dictionary(path, identity=bf16.identity()) is not None


def test_missing_file(tmp_path):
    with pytest.raises(DictionaryError, match="not found"):
        load_dictionary(tmp_path / "nope.chunks.safetensors")


def test_garbage_file(tmp_path):
    path = tmp_path / "x.chunks.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(DictionaryError, match="damaged or not a safetensors file"):
        load_dictionary(path)


def test_truncated_file(tiny_dict, tmp_path):
    _, path = tiny_dict
    data = path.read_bytes()
    cut = tmp_path / "cut.chunks.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryError):
        load_dictionary(cut)


def test_plain_safetensors_without_header(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(DictionaryError, match="not a chunk dictionary"):
        load_dictionary(path)


def _rewrite(path, out, edit_meta=None, edit_tensors=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    doc = json.loads(meta["chunktui"])
    if edit_meta:
        edit_meta(doc)
    if edit_tensors:
        edit_tensors(tensors)
    meta["chunktui"] = json.dumps(doc) if not isinstance(doc, str) else doc
    save_file(tensors, str(out), metadata=meta)
    return out


def test_damaged_header_json(tiny_dict, tmp_path):
    from safetensors import safe_open

    _, path = tiny_dict
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    out = tmp_path / "bad.chunks.safetensors"
    save_file(tensors, str(out), metadata={"chunktui": "{not json"})
    with pytest.raises(DictionaryError, match="header is damaged"):
        load_dictionary(out)


def test_newer_version(tiny_dict, tmp_path):
    _, path = tiny_dict
    out = _rewrite(path, tmp_path / "v.chunks.safetensors", edit_meta=lambda d: d.update(version=99))
    with pytest.raises(DictionaryError, match="newer than this chunktui"):
        load_dictionary(out)


def test_neuron_index_out_of_range(tiny_dict, tmp_path):
    _, path = tiny_dict

    def corrupt(tensors):
        tensors["00000.neurons"] = tensors["00000.neurons"].clone()
        tensors["00000.neurons"][0] = 999

    out = _rewrite(path, tmp_path / "n.chunks.safetensors", edit_tensors=corrupt)
    with pytest.raises(DictionaryError, match="neuron indices must lie in 0..63"):
        load_dictionary(out)


def test_missing_tensor(tiny_dict, tmp_path):
    _, path = tiny_dict
    out = _rewrite(path, tmp_path / "m.chunks.safetensors", edit_tensors=lambda t: t.pop("00001.template"))
    with pytest.raises(DictionaryError, match="tensor '00001.template' is missing"):
        load_dictionary(out)


def test_bad_threshold_and_layer(tiny_dict, tmp_path):
    _, path = tiny_dict
    out = _rewrite(path, tmp_path / "l.chunks.safetensors", edit_meta=lambda d: d["chunks"][0].update(layer=40))
    with pytest.raises(DictionaryError, match="layer 40 is outside 0..4"):
        load_dictionary(out)
    out = _rewrite(path, tmp_path / "t.chunks.safetensors", edit_meta=lambda d: d["chunks"][0].update(threshold="x"))
    with pytest.raises(DictionaryError, match="threshold"):
        load_dictionary(out)


def test_unwritable_path_loses_nothing(tiny_dict, tmp_path):
    original, path = tiny_dict
    before = path.read_bytes()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DictionaryError, match="Could not write"):
        original.save(blocker / "sub" / "d.chunks.safetensors")
    assert path.read_bytes() == before


def test_direction_chunks_round_trip(tmp_path, tiny_model):
    u = torch.randn(64)
    d = ChunkDictionary(model=tiny_model.identity(), chunks=[
        Chunk(id="dir:x@2", label="x", layer=2, kind="direction", direction=u / u.norm(), threshold=0.3, typical=1.5,
              method="unsupervised-discovery")])
    path = d.save(tmp_path / "d.chunks.safetensors")
    back = load_dictionary(path, identity=tiny_model.identity())
    assert back.chunks[0].kind == "direction"
    assert torch.allclose(back.chunks[0].direction, u / u.norm())
    assert back.chunks[0].typical == 1.5
