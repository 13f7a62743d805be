"""Property-based fuzzing of every loader: arbitrary JSON in place of any field.

The only allowed outcomes are a ChunkError subclass with a message, or a valid
object that the code after the loader can use without a traceback.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunktui.shared.errors import ChunkError

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) |
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=6)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small_dict(tmp_path_factory):
    from chunktui.engine.dictionary import Chunk, ChunkDictionary

    chunks = [Chunk(id="cheese@1", label="cheese", layer=1, subpopulation=torch.tensor([0, 3, 5]),
                    template=torch.tensor([0.5, -1.0, 2.0]), threshold=0.25, tolerance=0.3, fit={"tp_rate": 0.5}),
              Chunk(id="dir:dog@2", label="dog", layer=2, kind="direction", direction=torch.ones(8) / 8 ** 0.5,
                    threshold=0.5, typical=1.0, method="ucd")]
    d = ChunkDictionary(model={"name": "t", "hidden_size": 8, "n_layers": 2, "fingerprint": [1.0, 2.0],
                               "fingerprint_digest": "ab"}, chunks=chunks, notes={"command": "x"},
                        layer_means=torch.zeros(3, 8))
    path = tmp_path_factory.mktemp("fz") / "s.chunks.safetensors"
    d.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["chunktui"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return meta, tensors


def _use(d):
    """What inspect, scan and the app do with a loaded dictionary."""
    for c in d.chunks:
        f"{c.label} {c.layer} {c.kind} {c.size} {c.threshold:.3g}"
        f"{c.tolerance:.3g}" if c.tolerance is not None else "-"
        from chunktui.cli.dictionaries import _rate

        _rate(c.fit.get("tp_rate"), 3), _rate(c.fit.get("fp_rate"), 4)
    d.labels(), d.layers()
    d.compatibility_problem({"name": "t", "hidden_size": 8, "n_layers": 2, "fingerprint": [1.0, 2.0]})
    str(d.notes.get("command", ""))


@FUZZ
@given(where=st.sampled_from(["header", "model", "chunk0", "chunk1", "fit"]), key=st.text(max_size=10),
       value=JSON, data=st.data())
def test_fuzz_dictionary_header(small_dict, tmp_path_factory, where, key, value, data):
    from safetensors.torch import save_file

    from chunktui.engine.dictionary import load_dictionary

    meta, tensors = small_dict
    meta = json.loads(json.dumps(meta))
    target = {"header": meta, "model": meta["model"], "chunk0": meta["chunks"][0], "chunk1": meta["chunks"][1],
              "fit": meta["chunks"][0]["fit"]}[where]
    target[data.draw(st.sampled_from(sorted(target) + [key]))] = value
    path = tmp_path_factory.mktemp("fz") / "f.chunks.safetensors"
    save_file(tensors, str(path), metadata={"chunktui": json.dumps(meta)})
    try:
        d = load_dictionary(path)
    except ChunkError as err:
        assert str(err)
        return
    _use(d)


@FUZZ
@given(record=st.dictionaries(st.sampled_from(["text", "spans", "id"]), JSON, max_size=3) |
       st.fixed_dictionaries({"text": st.text(max_size=20), "spans": JSON}) |
       st.fixed_dictionaries({"text": st.text(max_size=20), "spans": st.lists(st.lists(JSON, max_size=4), max_size=3)}))
def test_fuzz_spans(tmp_path_factory, record):
    from chunktui.engine.labels import read_spans

    path = tmp_path_factory.mktemp("sp") / "s.jsonl"
    path.write_text(json.dumps(record) + "\n")
    try:
        spans = read_spans(path)
    except ChunkError as err:
        assert str(err)
        return
    for a, b, label in spans.spans:
        assert 0 <= a < b <= len(spans.source) and isinstance(label, str)


@FUZZ
@given(record=st.dictionaries(st.sampled_from(["text", "id"]), JSON, max_size=2))
def test_fuzz_sequences(tmp_path_factory, record):
    from chunktui.shared.texts import read_sequences

    path = tmp_path_factory.mktemp("sq") / "s.jsonl"
    path.write_text(json.dumps(record) + "\n")
    try:
        rows = read_sequences(path)
    except ChunkError as err:
        assert str(err)
        return
    assert all(isinstance(i, str) and isinstance(t, str) for i, t in rows)


@FUZZ
@given(kind=st.sampled_from(["scan", "perturb", "session"]), key=st.text(max_size=8), value=JSON, data=st.data())
def test_fuzz_report_inputs(tmp_path_factory, kind, key, value, data):
    from chunktui.shared.reports import read_input, render

    run = {"intervention": {"mode": "graft", "strength": 1.0, "labels": ["a"], "layers": [1], "positions": "prompt"},
           "concepts": {"a": {"control_rate": 0.0, "perturbed_rate": 1.0, "delta_rate": 1.0, "logprob_control": -1.0,
                              "logprob_perturbed": 0.0, "delta_logprob": 1.0}},
           "pairs": [{"prompt": "p", "seed": 0, "control": "c", "perturbed": "d", "diff": []}], "settings": {}}
    token = {"index": 0, "token_id": 1, "text": "a", "strongest_label": "a", "strongest_score": 1.0,
             "matches_by_layer": {"1": [0]}}
    doc = {"scan": {"tokens": [token], "text": "a", "generated": [False]},
           "perturb": dict(run),
           "session": {"format": "chunktui.session", "version": 1, "traces": [{"kind": "scan", "title": "t",
                                                                              "text": "a", "tokens": [token]}],
                       "runs": [run]}}[kind]
    containers = [doc] + [v for v in doc.values() if isinstance(v, dict)] + \
        [v[0] for v in doc.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
    target = data.draw(st.sampled_from(containers))
    target[data.draw(st.sampled_from(sorted(target) + [key]))] = value
    path = tmp_path_factory.mktemp("rp") / "in.json"
    path.write_text(json.dumps(doc))
    try:
        session = read_input(path)
        for fmt in ("md", "html", "csv", "json"):
            render(session, fmt).encode("utf-8")
    except ChunkError as err:
        assert str(err)


@pytest.mark.parametrize("edit, message", [
    (lambda meta, t: meta["chunks"][1].__setitem__("threshold", 5), "cosine, so it must lie in -1..1"),
    (lambda meta, t: t.__setitem__("00001.direction", torch.full((8,), 1e38)), "finite and non-zero"),
    (lambda meta, t: t.__setitem__("00000.neurons", torch.tensor([3, 3, 3], dtype=torch.int16)), "more than once"),
    (lambda meta, t: meta["chunks"][0].__setitem__("step", -3), "'step' must be at least 0"),
])
def test_bad_chunk_values_are_refused(small_dict, tmp_path, edit, message):
    from safetensors.torch import save_file

    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.errors import DictionaryError

    meta, tensors = small_dict
    meta, tensors = json.loads(json.dumps(meta)), dict(tensors)
    edit(meta, tensors)
    path = tmp_path / "b.chunks.safetensors"
    save_file(tensors, str(path), metadata={"chunktui": json.dumps(meta)})
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(path)
