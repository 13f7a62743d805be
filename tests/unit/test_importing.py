"""Importing directions from other tools: .npy, .safetensors, llama.cpp control-vector GGUF; and a graft round trip."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from chunktui.engine.dictionary import ChunkDictionary, load_dictionary
from chunktui.engine.importing import (DirectionImportError, import_file, merge_chunks, read_vectors,
                                       write_control_vector)
from chunktui.engine.perturb import Intervention, Positions, next_token_logprobs

WIDTH = 64  # random:llama-tiny
PROMPTS = ["I like the", "The dog ate the cheese in the garden", "We saw"]


def test_npy_one_vector_needs_a_layer(tmp_path, tiny_model):
    v = np.random.default_rng(0).standard_normal(WIDTH).astype(np.float32)
    path = tmp_path / "happy.npy"
    np.save(path, v)
    with pytest.raises(DirectionImportError, match="give --layer"):
        import_file(path, tiny_model.identity())
    result = import_file(path, tiny_model.identity(), layer=2)
    (chunk,) = result.chunks
    assert chunk.kind == "direction" and chunk.layer == 2 and chunk.label == "happy" and chunk.id == "dir:happy@2"
    assert torch.allclose(chunk.direction, torch.from_numpy(v) / float(np.linalg.norm(v)))
    assert chunk.typical == pytest.approx(float(np.linalg.norm(v)), rel=1e-5)
    assert chunk.extra["norm"] == pytest.approx(float(np.linalg.norm(v)), rel=1e-5)


def test_npy_rows_are_layers_and_width_is_checked(tmp_path, tiny_model):
    rows = np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)
    path = tmp_path / "steer.npy"
    np.save(path, rows)
    result = import_file(path, tiny_model.identity())
    assert [c.layer for c in result.chunks] == [0, 1, 2, 3]
    # with --layer: four directions at one layer, numbered
    at2 = import_file(path, tiny_model.identity(), layer=2).chunks
    assert {c.layer for c in at2} == {2} and len({c.id for c in at2}) == 4
    np.save(tmp_path / "wide.npy", np.ones(WIDTH + 1, dtype=np.float32))
    with pytest.raises(DirectionImportError, match="width 64"):
        import_file(tmp_path / "wide.npy", tiny_model.identity(), layer=1)
    np.save(tmp_path / "ints.npy", np.ones(WIDTH, dtype=np.int64))
    with pytest.raises(DirectionImportError, match="floating point"):
        import_file(tmp_path / "ints.npy", tiny_model.identity(), layer=1)


def test_safetensors_keys_name_layers(tmp_path, tiny_model):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"layer.1": torch.randn(WIDTH, generator=g), "layer.3": torch.randn(WIDTH, generator=g)},
              str(tmp_path / "calm.safetensors"))
    result = import_file(tmp_path / "calm.safetensors", tiny_model.identity())
    assert sorted(c.layer for c in result.chunks) == [1, 3]
    assert all(c.method == "imported:safetensors" for c in result.chunks)


def test_gguf_control_vector_maps_block_outputs_to_the_next_layer(tmp_path, tiny_model):
    g = torch.Generator().manual_seed(0)
    dirs = {il: torch.randn(WIDTH, generator=g) for il in (1, 2, 3)}  # il = 3 is the last block's output
    path = write_control_vector(tmp_path / "mood.gguf", dirs, model_hint="llama")
    vectors, meta = read_vectors(path)
    assert meta["model_hint"] == "llama" and meta["layer_count"] == 3 and meta["layer_offset"] == 1
    assert [(v.source_layer, v.layer) for v in vectors] == [(1, 2), (2, 3), (3, 4)]
    result = import_file(path, tiny_model.identity())
    assert sorted(c.layer for c in result.chunks) == [2, 3]  # direction.3 -> H[4], after the final norm: skipped
    assert "direction.3" in result.skipped and "final norm" in result.skipped["direction.3"]
    chunk = {c.layer: c for c in result.chunks}[2]
    assert torch.allclose(chunk.direction, dirs[1] / dirs[1].norm(), atol=1e-6)
    assert chunk.extra["key"] == "direction.1" and chunk.extra["model_hint"] == "llama"
    # an explicit offset of 0 reads direction.il as H[il]
    assert sorted(c.layer for c in import_file(path, tiny_model.identity(), layer_offset=0).chunks) == [1, 2, 3]


def test_a_gguf_model_file_is_not_a_control_vector(tmp_path, tiny_model):
    import gguf

    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_architecture()
    w.add_tensor("token_embd.weight", np.zeros((4, WIDTH), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DirectionImportError, match="not a control vector"):
        import_file(path, tiny_model.identity())
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DirectionImportError, match="unknown direction format"):
        import_file(tmp_path / "x.txt", tiny_model.identity())


def test_calibration_sets_the_threshold_and_typical_from_a_corpus(tmp_path, tiny_model, tiny_corpus):
    from chunktui.engine.corpus import collect

    hs = collect(tiny_model, tiny_corpus, layers=[2])
    v = torch.randn(WIDTH, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "v.npy", v.numpy())
    (chunk,) = import_file(tmp_path / "v.npy", tiny_model.identity(), layer=2, calibration=hs, match_rate=0.1).chunks
    from chunktui.engine.matching import pack

    hit = pack([chunk], WIDTH, tiny_model.layout.n_states, layers=[2]).match(hs.H).hit[:, 0]
    # at least the asked share (ties in this repetitive corpus can add a few), never far more
    assert 0.1 <= float(hit.float().mean()) <= 0.15
    u = v / v.norm()
    assert chunk.typical == pytest.approx(float((hs.H[:, 0] @ u).mean()) + float(v.norm()), rel=1e-4)


def _steering_vector(tiny_model, target: int, layer: int, scale: float = 30.0) -> torch.Tensor:
    """What a steering tool would export to make `target` likelier: its unembedding row, large."""
    row = tiny_model.model.lm_head.weight[target].detach().float()
    return scale * row / row.norm()


def test_control_vector_round_trip_grafting_moves_generation_towards_the_target(tmp_path, tiny_model):
    target = tiny_model.tokenizer(" cheese", add_special_tokens=False)["input_ids"][0]
    il = 2  # llama.cpp block output 2 = the stream entering block 3 = our layer 3
    toward = _steering_vector(tiny_model, target, il + 1)
    write_control_vector(tmp_path / "cheese.gguf", {il: toward}, model_hint="llama")
    write_control_vector(tmp_path / "nocheese.gguf", {il: -toward}, model_hint="llama")
    # into one dictionary file, beside population-averaging chunks if there were any
    d = ChunkDictionary(model=tiny_model.identity())
    for name in ("cheese", "nocheese"):
        merge_chunks(d, import_file(tmp_path / f"{name}.gguf", tiny_model.identity()).chunks)
    back = load_dictionary(d.save(tmp_path / "cv.chunks.safetensors"), tiny_model.identity())
    up, down = back.by_id("dir:cheese@3"), back.by_id("dir:nocheese@3")

    base = next_token_logprobs(tiny_model, PROMPTS, None, chat=False)[:, target]
    all_positions = Positions.parse("all")
    grafted = next_token_logprobs(tiny_model, PROMPTS, Intervention([up], "graft", 1.0, all_positions),
                                  chat=False)[:, target]
    against = next_token_logprobs(tiny_model, PROMPTS, Intervention([down], "graft", 1.0, all_positions),
                                  chat=False)[:, target]
    suppressed = next_token_logprobs(tiny_model, PROMPTS, Intervention([up], "suppress", 1.0, all_positions),
                                     chat=False)[:, target]
    assert bool((grafted > base + 1.0).all()), (base, grafted)
    assert bool((against < base - 1.0).all()), (base, against)
    # removing the component along the direction undoes none of that: it lands between the two
    assert bool((suppressed < grafted).all() and (suppressed > against).all())


def test_import_cli_adds_to_an_existing_dictionary(tmp_path, tiny_dict):
    from chunktui.cli import main

    dictionary, path = tiny_dict
    target = tmp_path / "mixed.chunks.safetensors"
    target.write_bytes(path.read_bytes())
    g = torch.Generator().manual_seed(0)
    write_control_vector(tmp_path / "mood.gguf", {1: torch.randn(WIDTH, generator=g), 2: torch.randn(WIDTH, generator=g)})
    before = target.read_bytes()
    r = CliRunner().invoke(main, ["import", "--model", "random:llama-tiny", str(tmp_path / "mood.gguf"), "--out",
                                  str(target)])
    assert r.exit_code == 2 and "--append" in r.output, r.output  # an existing file is never changed unasked
    assert target.read_bytes() == before
    r = CliRunner().invoke(main, ["import", "--model", "random:llama-tiny", str(tmp_path / "mood.gguf"), "--out",
                                  str(target), "--append"])
    assert r.exit_code == 0, r.output
    d = load_dictionary(target)
    assert sorted(c.layer for c in d.chunks if c.kind == "direction") == [2, 3]
    kinds = {c.kind for c in d.chunks}
    assert kinds == {"pa", "direction"} and len(d) == len(dictionary) + 2
    r = CliRunner().invoke(main, ["import", "--model", "random:llama-tiny", str(tmp_path / "missing.npy"), "--out",
                                  str(target), "--append"])
    assert r.exit_code == 2 and "not found" in r.output
