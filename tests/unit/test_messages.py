"""Messages: specific for damaged model files, each id once on a fingerprint mismatch, printed as written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from chunktui.shared.errors import IncompatibleDictionaryError, ModelLoadError
from chunktui.engine.models import check_gguf_file, load_model


def _gguf(path, n=4096):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((n // 64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_truncated_and_foreign_gguf_files(tmp_path):
    good = tmp_path / "m.gguf"
    _gguf(good)
    check_gguf_file(good)  # whole: passes the check
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated|damaged"):
        load_model(str(cut))
    (tmp_path / "head.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="header is cut short"):
        load_model(str(tmp_path / "head.gguf"))
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="magic bytes"):
        load_model(str(tmp_path / "zip.gguf"))


def _folder(tmp_path, config="{\"model_type\": \"llama\"}", weights: bytes | None = None, tokenizer=True):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.ones(256, 16)})


@pytest.mark.parametrize("kind, message", [
    ("garbage config", "config.json is damaged: not valid JSON"),
    ("empty config", "does not say which architecture"),
    ("no weights", "no weights"),
    ("truncated weights", "model.safetensors is truncated"),
    ("damaged weights", "safetensors header cannot be read"),
    ("no tokenizer", "no tokenizer"),
])
def test_damaged_model_folders(tmp_path, kind, message):
    full = _safetensors_bytes()
    folder = {
        "garbage config": lambda: _folder(tmp_path, config="nonsense{", weights=full),
        "empty config": lambda: _folder(tmp_path, config="{}", weights=full),
        "no weights": lambda: _folder(tmp_path),
        "truncated weights": lambda: _folder(tmp_path, weights=full[:-100]),
        "damaged weights": lambda: _folder(tmp_path, weights=b"\xff" * 64),
        "no tokenizer": lambda: _folder(tmp_path, weights=full, tokenizer=False),
    }[kind]()
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(folder))


def test_fingerprint_mismatch_names_each_side_once(tiny_dict):
    dictionary, _ = tiny_dict
    identity = dict(dictionary.model)
    identity["fingerprint"] = [v * 1.5 for v in identity["fingerprint"]]  # other weights, same coarse digest
    problem = dictionary.compatibility_problem(identity)
    assert problem.count(dictionary.model["name"]) == 1
    assert problem.count(dictionary.model["fingerprint_digest"]) == 1
    with pytest.raises(IncompatibleDictionaryError, match="differ by more than the 2% fingerprint tolerance"):
        dictionary.check_compatible(identity)


def test_error_text_is_printed_as_written(tmp_path):
    from chunktui.cli import main

    r = CliRunner().invoke(main, ["report", str(tmp_path / "[bold]:x: [0, 3].json"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "[bold]:x: [0, 3].json does not exist" in " ".join(r.output.split())
    spans = tmp_path / "s.jsonl"
    spans.write_text(json.dumps({"text": "abc", "spans": [[0, 3]]}) + "\n")
    r = CliRunner().invoke(main, ["build", "--model", "random:llama-tiny", "--spans", str(spans), "--out",
                                  str(tmp_path / "x.chunks.safetensors")])
    assert r.exit_code == 2
    assert 'a span must be [start, end, "label"], got [0, 3]' in " ".join(r.output.split())
