"""`chunktui perturb --protocol paper` on the built-in model: its JSON states every setting of the protocol."""

import json

import pytest
from click.testing import CliRunner

from chunktui.cli import main

pytestmark = pytest.mark.integration


def test_perturb_protocol_paper_on_the_builtin_model(smol, tmp_path, monkeypatch):
    monkeypatch.setattr("chunktui.cli.perturb.load_with_progress", lambda *a, **k: smol)  # the shared model
    out = tmp_path / "paper.json"
    r = CliRunner().invoke(main, ["perturb", "--protocol", "paper", "--chunk", "cheese", "--prompt",
                                  "My favourite thing to eat on a long walk is", "--max-new-tokens", "12",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    iv, protocol = rep["intervention"], rep["protocol"]
    assert iv["site"] == "residual" and protocol["site"] == "residual"
    assert iv["positions"] == "prompt[-4:-1]" and protocol["positions_meaning"].startswith(
        "the 3 prompt tokens before the last")
    assert iv["strength"] == 1.0 and iv["mode"] == "graft"
    assert iv["layers"] == list(range(2, 10)) and protocol["layers"] == "2-9"
    assert {c.split("@")[-1] for c in iv["chunks"]} == {str(l) for l in range(2, 10)}  # chunk of layer l at block l
    assert rep["settings"]["top_p"] == 0.9 and rep["settings"]["identical_sampling_both_arms"]
    assert rep["settings"]["chat"] is False and not protocol["paper_confounds"]
    assert protocol["overridden"] == ["max_new_tokens"]
    assert "protocol paper" in r.output and "prompt[-4:-1]" in r.output
    diff = rep["pairs"][0]["layer_diff"]  # what the graft changed, token by token and layer by layer
    assert 0 < len(diff["tokens"]) <= 12, "a completion prompt: both runs write something, at most 12 tokens"
    assert set(diff["tokens"][0]) == {"index", "control", "perturbed", "aligned", "layers"}
    cut = diff["diverged_at"] if diff["diverged_at"] is not None else len(diff["tokens"])
    for token in diff["tokens"]:
        assert token["aligned"] == (token["index"] < cut)
        if token["aligned"]:
            assert token["control"] == token["perturbed"]
        for layer, d in token["layers"].items():
            assert set(d["appeared"]) == set(d["perturbed"]) - set(d["control"])
            assert set(d["disappeared"]) == set(d["control"]) - set(d["perturbed"])
            assert all(c.endswith(f"@{layer}") for c in d["control"] + d["perturbed"])
    if cut < len(diff["tokens"]):
        assert diff["tokens"][cut]["control"] != diff["tokens"][cut]["perturbed"]
