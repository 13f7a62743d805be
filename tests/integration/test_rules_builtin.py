"""Rules on the built-in model: `scan --rule "when cheese -> stop"` stops where the unguarded run first matches."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from chunktui.cli import main

pytestmark = pytest.mark.integration

PROMPT = "What goes well with crackers and wine at a party?"


@pytest.fixture
def cli(smol, monkeypatch):
    """The CLI with the module's model (loaded once for these tests)."""
    import chunktui.cli.scan as scan

    monkeypatch.setattr(scan, "load_with_progress", lambda *args, **kwargs: smol)
    runner = CliRunner()
    return lambda args: runner.invoke(main, args)


def test_stop_rule_stops_at_the_first_cheese_token_of_the_unguarded_run(cli, tmp_path):
    plain, guarded = tmp_path / "plain.json", tmp_path / "guarded.json"
    common = ["scan", "--prompt", PROMPT, "--generate", "40"]
    r = cli(common + ["--json", str(plain)])
    assert r.exit_code == 0, r.output
    r = cli(common + ["--rule", "when cheese -> stop", "--json", str(guarded)])
    assert r.exit_code == 0, r.output
    a, b = json.loads(plain.read_text()), json.loads(guarded.read_text())
    first = next(t for t, g in zip(a["tokens"], a["generated"])
                 if g and any(m["label"] == "cheese" for ms in t["matches_by_layer"].values() for m in ms))
    cut = first["index"]
    assert [t["token_id"] for t in b["tokens"]] == [t["token_id"] for t in a["tokens"][:cut + 1]]
    assert b["text"] == "".join(t["text"] for t in a["tokens"][:cut + 1])
    assert b["finished"] == "rule"
    layers = sorted(int(layer) for layer, ms in first["matches_by_layer"].items()
                    if any(m["label"] == "cheese" for m in ms))
    assert b["firings"] == [{"rule": "when cheese -> stop", "token": cut, "layers": layers, "action": "stop",
                             "text": first["text"]}]
    assert "stopped by rule" in r.output


@pytest.mark.parametrize("rule, words", [
    ("when cheese@ -> stop", "column 14"),
    ("when chese -> stop", "nearest: cheese"),
    ("when cheese@31 -> stop", "layer 31 is out of range"),
    ("when cheese -> squash cheese", "unknown action 'squash'"),
])
def test_bad_rules_exit_2_with_a_specific_message(rule, words):
    r = CliRunner().invoke(main, ["scan", "--prompt", "hi", "--rule", rule])
    assert r.exit_code == 2
    assert words in r.output and "Traceback" not in r.output


def test_the_readme_rules_example_runs(smol, capsys):
    """The README's rules snippet (the second Python block of "Use from Python"), on the shared model."""
    import re
    from pathlib import Path

    from chunktui.api import Engine

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    namespace = {"engine": Engine.from_loaded(smol, "sample")}
    exec(compile(code, "README.md", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.finished == "rule" and trace.stopped_by == "when cheese -> stop"
    stop = trace.firings[-1]
    assert stop["action"] == "stop" and stop["token"] == trace.steps[-1].index and stop["layers"]
    assert "rule when cheese -> stop" in capsys.readouterr().out


def test_a_prompt_guard_acts_before_the_first_answer_token(smol_engine):
    """`on_prompt="act"`: where the guard fires on the prompt, the prompt is read again with the edit and the
    first answer token's distribution moves; where it does not fire, and with `watch`, that token is untouched.
    (Whether the concept falls is a population question: benchmarks/rules.py guard.)"""
    from chunktui.engine.perturb import next_token_logprobs
    from chunktui.engine.rules import first_token_logprobs

    loaded = smol_engine.loaded
    prompts = ["Swiss cheese has holes. Cheddar is a hard", "Grate some parmesan"]
    rule = ["guard: when cheese -> suppress cheese@24-29 x0.5 for 8"]
    base = next_token_logprobs(loaded, prompts, None, chat=False)
    watched = first_token_logprobs(loaded, smol_engine.rules(rule, on_prompt="watch"), prompts, chat=False)
    assert torch.allclose(watched, base, atol=1e-4)
    firings: list = []
    acted = first_token_logprobs(loaded, smol_engine.rules(rule, on_prompt="act"), prompts, chat=False,
                                 firings=firings)
    assert len(firings) == len(prompts) and firings[0], "the prompt's cheese tokens should match"
    for row, found in enumerate(firings):
        moved = float((acted[row] - base[row]).abs().max())
        assert moved > 1e-2 if found else moved < 1e-4, (row, len(found), moved)
    assert all(f.rule == "guard" and f.layers and f.extra == {"on_prompt": True} for fs in firings for f in fs)


def test_next_word_guard_lowers_the_word_in_the_same_pass(smol):
    """The shipped next-word dictionary (mean-difference, --step 1) and the guard demonstration's `now` rule: on
    an inviting completion the rule fires on the prompt's last token, and the edit made in that same pass lowers
    the concept's first-token probability; watching the prompt leaves it alone."""
    from chunktui.api import Engine
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.perturb import first_token_ids, next_token_logprobs
    from chunktui.engine.rules import first_token_logprobs
    from chunktui.engine.tokens import encode_prompt
    from chunktui.paths import sample_path

    dictionary = load_dictionary(sample_path("smollm2-135m.next-word.chunks.safetensors"), identity=smol.identity())
    assert {c.kind for c in dictionary.chunks} == {"direction"} and {c.step for c in dictionary.chunks} == {1}
    engine = Engine.from_loaded(smol, dictionary)
    cases = [("cheese", "A mouse nibbled a piece of"), ("chocolate", "The cake was covered in dark")]  # dev prompts
    for concept, prompt in cases:
        rule = f"guard: when {concept}@2-19 -> suppress {concept}@20-29 x0.5 now for 4"
        base = next_token_logprobs(smol, [prompt], None, chat=False)
        same = first_token_logprobs(smol, engine.rules([rule], on_prompt="watch"), [prompt], chat=False)
        assert torch.allclose(same, base, atol=1e-5)  # watching the prompt does not edit it
        firings: list = []
        guarded = first_token_logprobs(smol, engine.rules([rule], on_prompt="act"), [prompt], chat=False,
                                       firings=firings)
        last = len(encode_prompt(smol, prompt, False)) - 1
        assert any(f.token == last and f.layers and 2 <= min(f.layers) <= max(f.layers) <= 19 for f in firings[0])
        ids = first_token_ids(smol, concept)
        drop = float(torch.logsumexp(base[0, ids], 0) - torch.logsumexp(guarded[0, ids], 0))
        assert drop > 1.0, (prompt, drop)  # the word's first token at least e times less likely
