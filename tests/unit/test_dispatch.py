"""A model dispatched by accelerate (device_map="auto" with a memory cap that forces CPU and disk offload)
behaves exactly like the plain load: same greedy tokens, hidden states, intervention effects, build and
evaluate results. On a CPU-only machine the offload is real: weights are read back from the offload
folder (disk) or from accelerate's CPU weights map on every forward pass.
"""

import pytest
import torch
from click.testing import CliRunner

from chunktui.cli import main
from chunktui.engine.build import LabelSource, build_dictionary, evaluate_dictionary
from chunktui.shared.errors import ModelLoadError
from chunktui.engine.corpus import collect
from chunktui.engine.matching import pack
from chunktui.engine.memory import memory_report, weight_bytes
from chunktui.engine.models import load_model, parse_max_memory
from chunktui.engine.perturb import Intervention, Positions, next_token_logprobs, run_arm, select_chunks
from chunktui.engine.streaming import generate_stream, scan_text
from chunktui.shared.settings import Sampling




@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("tiny-folder")
    tiny_model.model.save_pretrained(path)
    tiny_model.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(folder):
    return load_model(str(folder), device="cpu")


# 400KiB keeps the embedding and the first block in CPU memory and sends the rest to disk;
# 40KiB sends everything to disk.
@pytest.fixture(scope="module", params=["400KiB", "40KiB"])
def dispatched(request, folder, tmp_path_factory):
    offload = tmp_path_factory.mktemp("offload")
    return load_model(str(folder), device="cpu", device_map="auto", max_memory={"cpu": request.param},
                      offload_folder=str(offload))


def test_the_cap_really_offloads(dispatched, plain):
    assert dispatched.device_map and "disk" in dispatched.device_map.values()
    assert dispatched.device == torch.device("cpu")  # inputs go to the embedding's execution device
    assert weight_bytes(dispatched).get("disk", 0) > 0
    assert sum(weight_bytes(dispatched).values()) == sum(weight_bytes(plain).values())
    assert any(p.device.type == "meta" for p in dispatched.model.parameters())  # not resident: read on use
    assert dispatched.fingerprint == plain.fingerprint  # so dictionaries made on either fit the other
    assert "disk" in dispatched.card()["placement"]


def test_same_greedy_tokens_and_states(dispatched, plain):
    sampling = Sampling(max_new_tokens=16, stop_at_eos=False)
    a = list(generate_stream(plain, "The dog ate the cheese", sampling))
    b = list(generate_stream(dispatched, "The dog ate the cheese", sampling))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    for x, y in zip(a, b):
        assert torch.allclose(x.hidden, y.hidden, atol=1e-5)
    sa, sb = scan_text(plain, "I like cake and the rain."), scan_text(dispatched, "I like cake and the rain.")
    assert sa.ids == sb.ids and torch.allclose(sa.hidden, sb.hidden, atol=1e-5)


def test_same_intervention_effects(dispatched, plain, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["cheese"], [1, 2])
    prompts = ["I like", "The dog ate"]
    for mode, strength in (("graft", 1.0), ("freeze", 1.0)):
        intervention = Intervention(chunks, mode, strength, Positions("all"))
        lp_plain = next_token_logprobs(plain, prompts, intervention, chat=False)
        lp_disp = next_token_logprobs(dispatched, prompts, intervention, chat=False)
        assert torch.allclose(lp_plain, lp_disp, atol=1e-4)
        assert not torch.allclose(lp_plain, next_token_logprobs(plain, prompts, None, chat=False), atol=1e-3)
        sampling = Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
        rows_plain = run_arm(plain, prompts, 2, sampling, intervention, chat=False)
        rows_disp = run_arm(dispatched, prompts, 2, sampling, intervention, chat=False)
        assert [r.ids for r in rows_plain] == [r.ids for r in rows_disp]


def test_same_build_and_evaluate(dispatched, plain, tiny_corpus):
    source = LabelSource(corpus=tiny_corpus[:3000], words=["cheese", "cake"])
    d_plain, _ = build_dictionary(plain, source, layers=[1, 3])
    d_disp, _ = build_dictionary(dispatched, source, layers=[1, 3])
    for c, e in zip(d_plain.chunks, d_disp.chunks):
        assert (c.label, c.layer) == (e.label, e.layer)
        assert torch.equal(c.subpopulation, e.subpopulation) and torch.allclose(c.template, e.template, atol=1e-5)
    held = LabelSource(corpus=tiny_corpus[3000:6000])
    r_plain, _ = evaluate_dictionary(plain, d_plain, held)
    r_disp, _ = evaluate_dictionary(dispatched, d_plain, held)
    assert [(r["label"], r["layer"], r["tp_rate"], r["fp_rate"]) for r in r_plain] == \
           [(r["label"], r["layer"], r["tp_rate"], r["fp_rate"]) for r in r_disp]
    hs = collect(dispatched, tiny_corpus[:800])
    packed = pack(d_plain.chunks, dispatched.hidden_size, dispatched.layout.n_states, dispatched.device)
    assert packed.match(hs.H).hit.shape[0] == len(hs.tokens)


def test_memory_report_places_weights_and_cache(dispatched):
    rows = {r.device: r for r in memory_report(dispatched, kv_tokens=100, state_tokens=100)}
    assert rows["disk"].weights > 0 and rows["disk"].kv_cache == 0  # offloaded blocks compute on the CPU
    assert rows["cpu"].kv_cache == 100 * 4 * 2 * 2 * 16 * 4  # tokens x blocks x (k, v) x kv heads x head dim x fp32
    assert rows["cpu"].states == 100 * 5 * 64 * 4
    assert rows["cpu"].free is not None and rows["cpu"].total >= rows["cpu"].free


def test_random_models_dispatch_too(tmp_path, tiny_model):
    r = load_model("random:llama-tiny", device_map="auto", max_memory={"cpu": "40KiB"}, offload_folder=str(tmp_path))
    assert "disk" in r.device_map.values() and r.fingerprint == tiny_model.fingerprint
    sampling = Sampling(max_new_tokens=6, stop_at_eos=False)
    assert [e.token_id for e in generate_stream(r, "I like", sampling)] == \
           [e.token_id for e in generate_stream(tiny_model, "I like", sampling)]


def test_placement_errors(folder, tmp_path):
    # a safetensors checkpoint is read from its own files when offloaded; a model built in memory needs a folder
    assert "disk" in load_model(str(folder), device_map="auto", max_memory={"cpu": "40KiB"}).device_map.values()
    with pytest.raises(ModelLoadError, match="--offload-folder DIR"):
        load_model("random:llama-tiny", device_map="auto", max_memory={"cpu": "40KiB"})
    with pytest.raises(ModelLoadError, match="add --device-map auto"):
        load_model(str(folder), max_memory="cpu=1GiB")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(folder), device_map="auto", offload_folder=str(tmp_path / "f"))
    assert parse_max_memory("cpu=120MiB, mps=1GiB") == {"cpu": "120MiB", "mps": "1GiB"}
    for bad, message in (("cpu", "DEVICE=SIZE"), ("cpu=lots", "not a size"), ("cpu=0", "not a size"),
                         ("cpu=-5GiB", "not a size"), ("tpu=1GiB", "unknown device"), ("7=1GiB", "GPU 7")):
        with pytest.raises(ModelLoadError, match=message):
            parse_max_memory(bad)


def test_cli_options(folder, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["scan", "--model", str(folder), "--max-memory", "cpu=1GiB", "--text", "hi"])
    assert r.exit_code == 2 and "add --device-map auto" in r.output
    r = runner.invoke(main, ["scan", "--model", str(folder), "--device-map", "auto", "--max-memory", "cpu=huge",
                             "--text", "hi"])
    assert r.exit_code == 2 and "not a size" in r.output and "Traceback" not in r.output


def test_engine_api_and_app_request_carry_placement(tmp_path):
    """The app's engine process loads with the same placement options (protocol Load -> Engine.load)."""
    from chunktui.api import Engine
    from chunktui.shared import protocol

    request = protocol.Load("random:llama-tiny", device_map="auto", max_memory="cpu=40KiB",
                            offload_folder=str(tmp_path))
    engine = Engine.load(request.spec, device=request.device, dtype=request.dtype, device_map=request.device_map,
                         max_memory=request.max_memory, offload_folder=request.offload_folder,
                         offline=request.offline)
    assert "disk" in engine.card()["placement"]
    rows = {r["device"]: r for r in engine.memory(kv_tokens=10, state_tokens=10)}
    assert rows["disk"]["weights"] > 0 and rows["cpu"]["kv_cache"] > 0 and rows["cpu"]["states"] > 0
    r = CliRunner().invoke(main, ["tui", "--help"])
    assert all(option in r.output for option in ("--device-map", "--max-memory", "--offload-folder", "--offline"))


def test_cli_scan_dispatched_equals_plain_without_a_dictionary(folder, tmp_path):
    """The must-show on the tiny model: same `tokens` from `scan --device-map auto` with a disk-forcing cap.
    The sample dictionary is for the built-in model, so this model scans with no chunks (and says so)."""
    runner = CliRunner()
    common = ["scan", "--model", str(folder), "--prompt", "The dog ate", "--generate", "12", "--no-chat"]
    r = runner.invoke(main, common + ["--json", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    assert "the sample dictionary is for the built-in model" in r.output
    r = runner.invoke(main, common + ["--device-map", "auto", "--max-memory", "cpu=40KiB", "--offload-folder",
                                      str(tmp_path / "off"), "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    import json

    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert sum(b["generated"]) == 12 and a["tokens"] == b["tokens"]
    from chunktui.paths import DEFAULT_DICT_NAME, sample_path

    r = runner.invoke(main, common + ["--dict", str(sample_path(DEFAULT_DICT_NAME))])
    assert r.exit_code == 2  # a dictionary named explicitly must fit
