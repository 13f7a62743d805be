"""`chunktui evaluate --store`: held-out figures written into the dictionary, read back per chunk (optional)."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from chunktui.cli import main
from chunktui.engine.build import stored_heldout
from chunktui.engine.dictionary import load_dictionary
from tests.conftest import make_corpus


def test_evaluate_store_writes_a_held_out_block_per_chunk(tiny_dict, tmp_path):
    _, path = tiny_dict
    copy = tmp_path / "d.chunks.safetensors"
    shutil.copy(path, copy)
    assert all(stored_heldout(c) is None for c in load_dictionary(copy).chunks)  # none before: reads as before
    corpus = tmp_path / "held.txt"
    corpus.write_text(make_corpus(seed=3, sentences=40))
    out = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["evaluate", "--model", "random:llama-tiny", "--device", "cpu", "--dict", str(copy),
                                  "--corpus", str(corpus), "--json", str(out), "--store"])
    assert r.exit_code == 0, r.output
    records = {x["id"]: x for x in json.loads(out.read_text())["chunks"]}
    stored = load_dictionary(copy)
    assert f"stored held-out figures of {len(stored.chunks)} of {len(stored.chunks)} chunks" in r.output
    for chunk in stored.chunks:
        block = stored_heldout(chunk)
        assert block["corpus"] == "held.txt" and block["tokens"] == records[chunk.id]["tokens"]
        assert block["tp_rate"] == records[chunk.id]["tp_rate"] and block["fp_rate"] == records[chunk.id]["fp_rate"]
    original = load_dictionary(path)  # everything else unchanged
    assert [(c.id, c.threshold, c.fit) for c in stored.chunks] == [(c.id, c.threshold, c.fit) for c in original.chunks]


def test_a_malformed_block_is_ignored(tiny_dict):
    dictionary, _ = tiny_dict
    chunk = dictionary.chunks[0]
    saved = chunk.evaluation
    try:
        for block in ({"tp_rate": "x", "fp_rate": 0.1}, {"tp_rate": 1.5, "fp_rate": 0.0}, ["not", "a", "dict"], {}):
            chunk.evaluation = {"heldout": block}
            assert stored_heldout(chunk) is None
        chunk.evaluation = {"heldout": {"tp_rate": 0.9, "fp_rate": 0.001, "corpus": "h.txt"}}
        assert stored_heldout(chunk)["tp_rate"] == 0.9
    finally:
        chunk.evaluation = saved


def test_store_refuses_a_dictionary_it_cannot_replace(tiny_dict, tmp_path, monkeypatch):
    import os

    _, path = tiny_dict
    copy = tmp_path / "d.chunks.safetensors"
    shutil.copy(path, copy)
    corpus = tmp_path / "held.txt"
    corpus.write_text(make_corpus(seed=3, sentences=10))
    before = copy.read_bytes()
    real_access = os.access
    def access(p, mode, **kw):  # no write permission on the dictionary (click still reads it)
        return False if str(p) == str(copy) and mode == os.W_OK else real_access(p, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    r = CliRunner().invoke(main, ["evaluate", "--model", "random:llama-tiny", "--dict", str(copy), "--corpus",
                                  str(corpus), "--store"])
    assert r.exit_code == 2 and "cannot be replaced" in r.output  # said before the model loads
    assert "loaded" not in r.output and copy.read_bytes() == before
