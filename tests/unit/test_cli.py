"""The CLI end to end on the tiny model, and its messages for bad input."""

import json

import pytest
from click.testing import CliRunner

from chunktui.cli import main


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, tiny_corpus):
    path = tmp_path_factory.mktemp("c") / "corpus.txt"
    path.write_text(tiny_corpus)
    return path


def test_build_evaluate_inspect(runner, tmp_path, corpus_file):
    out = tmp_path / "d.chunks.safetensors"
    r = runner.invoke(main, ["build", "--model", "random:llama-tiny", "--corpus", str(corpus_file),
                             "--words", "cheese,dog,zebra", "--layers", "1-3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "2 concepts x 3 layers" in r.output
    assert "zebra" in r.output and "never occurs" in r.output
    j = tmp_path / "e.json"
    r = runner.invoke(main, ["evaluate", "--model", "random:llama-tiny", "--dict", str(out), "--corpus",
                             str(corpus_file), "--json", str(j)])
    assert r.exit_code == 0, r.output
    records = json.loads(j.read_text())["chunks"]
    assert {(x["label"], x["layer"]) for x in records} == {(w, l) for w in ("cheese", "dog") for l in (1, 2, 3)}
    for x in records:
        assert {"label", "layer", "tp_rate", "fp_rate", "accuracy"} <= set(x)
        assert 0 <= x["tp_rate"] <= 1 and 0 <= x["fp_rate"] <= 1
    r = runner.invoke(main, ["inspect", str(out), "--chunks"])
    assert r.exit_code == 0 and "cheese@2" in r.output and "random:llama-tiny" in r.output


def test_scan_and_perturb_json(runner, tmp_path, tiny_dict):
    _, path = tiny_dict
    j = tmp_path / "s.json"
    r = runner.invoke(main, ["scan", "--model", "random:llama-tiny", "--dict", str(path), "--text",
                             "The dog ate the cheese.", "--json", str(j)])
    assert r.exit_code == 0, r.output
    data = json.loads(j.read_text())
    by_text = {t["text"].strip(): t for t in data["tokens"]}
    # the colour rule (this fixture lets layer 0 alone vote, tests/conftest.py): agreement, precision on training
    assert by_text["cheese"]["strongest_label"] == "cheese" and by_text["dog"]["strongest_label"] == "dog"
    assert by_text["dog"]["agree"] == by_text["dog"]["voters"] == 1
    assert by_text["dog"]["precision"]["on"] == "training" and 0 < by_text["dog"]["precision"]["value"] <= 1
    assert by_text["The"]["strongest_label"] is None and by_text["The"]["agree"] is None
    assert "agree" in data["rule"]
    assert any(m["label"] == "dog" for ms in by_text["dog"]["matches_by_layer"].values() for m in ms)
    assert "colour rule" in data["rule"] or "agree" in data["rule"]
    # the same decision as the app's (a Trace from the Engine facade): strongest_label is what the app colours
    from chunktui.api import Engine
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.models import load_model

    engine = Engine.from_loaded(load_model("random:llama-tiny", device="cpu"), load_dictionary(path))
    assert engine.scan_trace("The dog ate the cheese.").labels() == [t["strongest_label"] for t in data["tokens"]]
    assert "legend" in r.output
    p = tmp_path / "p.json"
    r = runner.invoke(main, ["perturb", "--model", "random:llama-tiny", "--dict", str(path), "--chunk", "cheese",
                             "--layers", "1-2", "--prompt", "I like", "--samples", "2", "--max-new-tokens", "5",
                             "--no-chat", "--json", str(p)])
    assert r.exit_code == 0, r.output
    rep = json.loads(p.read_text())
    assert {"control_rate", "perturbed_rate", "delta_logprob"} <= set(rep["concepts"]["cheese"])
    assert len(rep["pairs"]) == 2
    assert "sweep" not in rep and rep["control_intervention"] is None  # only when asked


def test_perturb_json_has_the_control_arm_and_the_sweep_and_progress_goes_to_stderr(runner, tmp_path, tiny_dict):
    _, path = tiny_dict
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"concept": "cheese", "prompt": "I like"}\n{"concept": "dog", "prompt": "The dog"}\n')
    p = tmp_path / "p.json"
    r = runner.invoke(main, ["perturb", "--model", "random:llama-tiny", "--dict", str(path), "--chunk", "cheese",
                             "--layers", "1-2", "--prompts", str(prompts), "--samples", "2", "--max-new-tokens", "5",
                             "--no-chat", "--control", "direction", "--control-seed", "3", "--sweep", "0.5,1",
                             "--json", str(p)])
    assert r.exit_code == 0, r.output
    rep = json.loads(p.read_text())
    assert rep["control_intervention"]["kind"] == "direction" and rep["control_intervention"]["seed"] == 3
    assert [e["strength"] for e in rep["sweep"]] == [0.5, 1.0]
    for entry in rep["sweep"]:
        c = entry["concepts"]["cheese"]
        assert {"control_ci", "perturbed_ci", "random_rate", "random_ci", "delta_ci"} <= set(c)
        assert set(entry["fluency"]) == {"control", "perturbed", "random"}
        assert len(entry["pairs"]) == 4 and all("random" in pair for pair in entry["pairs"])
    assert rep["settings"]["samples"] == 2 and rep["settings"]["prompts"] == 2
    # stderr is not a terminal here: plain lines, at least one per prompt of every arm, none on stdout
    for arm in ("control", "perturbed x0.5", "random x0.5", "perturbed x1", "random x1"):
        for k in (1, 2):
            assert f"{arm}: prompt {k}/2 done" in r.stderr
    assert "prompt 1/2 done" not in r.stdout
    # one table for the sweep: a row per strength, rates with intervals, and the fluency table
    assert "Wilson 95%" in r.stdout and "perplexity" in r.stdout and "random" in r.stdout
    assert any(line.lstrip().startswith("0.5") for line in r.stdout.splitlines())
    assert any(line.lstrip().startswith("1 ") for line in r.stdout.splitlines())


def test_perturb_samples_default_is_the_apps(runner, tmp_path, tiny_dict):
    from chunktui.shared.settings import DEFAULT_SAMPLES

    _, path = tiny_dict
    p = tmp_path / "p.json"
    r = runner.invoke(main, ["perturb", "--model", "random:llama-tiny", "--dict", str(path), "--chunk", "cheese",
                             "--layers", "1", "--prompt", "I like", "--max-new-tokens", "3", "--no-chat",
                             "--json", str(p)])
    assert r.exit_code == 0, r.output
    assert DEFAULT_SAMPLES >= 4 and json.loads(p.read_text())["settings"]["samples"] == DEFAULT_SAMPLES


@pytest.mark.parametrize("args, message", [
    (["scan", "--model", "nonsense-model", "--text", "x"], "Unknown model 'nonsense-model'"),
    (["scan", "--model", "random:gpt2-tiny", "--dict", "{dict}", "--text", "x"], "was made for random:llama-tiny"),
    (["scan", "--model", "random:llama-tiny", "--dict", "{garbage}", "--text", "x"], "damaged or not a safetensors"),
    (["build", "--model", "random:llama-tiny", "--corpus", "{empty}", "--words", "a", "--out", "{out}"], "is empty"),
    (["build", "--model", "random:llama-tiny", "--corpus", "{corpus}", "--words", "zebra", "--out", "{out}"],
     "No concept has enough occurrences .*zebra: never occurs"),
    (["perturb", "--model", "random:llama-tiny", "--dict", "{dict}", "--chunk", "zebra", "--layers", "1-2",
      "--prompt", "x"],
     "No chunk named 'zebra'"),
    (["evaluate", "--model", "random:llama-tiny", "--dict", "{dict}", "--corpus", "{corpus}", "--json",
      "{unwritable}"], "Could not write"),
])
def test_bad_input_gets_a_specific_message(runner, tmp_path, tiny_dict, corpus_file, args, message):
    _, path = tiny_dict
    (tmp_path / "garbage.chunks.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "blocker").write_text("x")
    subs = {"{dict}": str(path), "{garbage}": str(tmp_path / "garbage.chunks.safetensors"),
            "{empty}": str(tmp_path / "empty.txt"), "{out}": str(tmp_path / "o.chunks.safetensors"),
            "{corpus}": str(corpus_file), "{unwritable}": str(tmp_path / "blocker" / "x.json")}
    r = runner.invoke(main, [subs.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    import re

    assert re.search(message, " ".join(r.output.split())), r.output
    assert "Traceback" not in r.output


def test_models_lists_specs(runner):
    r = runner.invoke(main, ["models"])
    assert r.exit_code == 0
    assert "smollm2-135m" in r.output and "random:llama-tiny" in r.output


def test_inspect_prints_the_cards_of_discovered_chunks(runner, tmp_path, corpus_file):
    out = tmp_path / "u.chunks.safetensors"
    r = runner.invoke(main, ["discover", "--model", "random:llama-tiny", "--corpus", str(corpus_file), "--layers", "2",
                             "--k", "6", "--seed", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["inspect", str(out), "--cards"])
    assert r.exit_code == 0, r.output
    assert "most frequent:" in r.output and "layer 2" in r.output
