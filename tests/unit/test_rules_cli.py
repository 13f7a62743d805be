"""Rules in the CLI (scan, perturb, monitor) and bulk monitoring, on the tiny model."""

from __future__ import annotations

import html
import json
import re

import pytest
from click.testing import CliRunner

from chunktui.cli import main

TINY = ["--model", "random:llama-tiny"]


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, tiny_corpus):
    path = tmp_path_factory.mktemp("c") / "corpus.txt"
    path.write_text("\n".join(tiny_corpus.splitlines()[:30]))
    return path


def test_scan_text_records_alerts(runner, tmp_path, tiny_dict):
    _, path = tiny_dict
    out = tmp_path / "s.json"
    r = runner.invoke(main, ["scan", *TINY, "--dict", str(path), "--text", "The dog ate the cheese in the rain.",
                             "--rule", "when cheese -> alert", "--rule", "any: when not cake@0 -> alert",
                             "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["rules"][0] == {"name": "when cheese -> alert", "when": "cheese", "then": "alert"}
    cheese_tokens = [t["index"] for t in data["tokens"]
                     if any(m["label"] == "cheese" for ms in t["matches_by_layer"].values() for m in ms)]
    assert [f["token"] for f in data["firings"] if f["rule"] == "when cheese -> alert"] == cheese_tokens
    assert any(f["rule"] == "any" for f in data["firings"])
    for fmt in ("md", "html", "csv"):  # every export format lists the firings
        report = tmp_path / f"r.{fmt}"
        r = runner.invoke(main, ["report", str(out), "--out", str(report)])
        assert r.exit_code == 0, r.output
        text = report.read_text()
        if fmt == "md":  # as read: the backslash escapes of shared.reports.md_text removed
            text = html.unescape(re.sub(r"\\(.)", r"\1", text))
        assert "when cheese -&gt; alert" in text if fmt == "html" else "when cheese -> alert" in text
        assert text.count("any") >= sum(f["rule"] == "any" for f in data["firings"])


def _guarded_perturb(runner, dict_path, out, on_prompt: str):
    """`perturb --rules` with a guard that holds on every prompt token of "The dog ate"."""
    return runner.invoke(main, ["perturb", *TINY, "--dict", str(dict_path), "--prompt", "The dog ate", "--samples",
                                "2", "--max-new-tokens", "6", "--rule",
                                "g: when not cheese -> suppress dog@1-2 x1 for 2", "--json", str(out), "--no-chat",
                                "--on-prompt", on_prompt])


def test_perturb_rules_compares_guarded_and_unguarded(runner, tmp_path, tiny_dict):
    _, path = tiny_dict
    out = tmp_path / "p.json"
    r = _guarded_perturb(runner, path, out, "off")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert set(data["concepts"]) == {"dog"}  # cheese is named only under "not"
    assert data["concepts"]["dog"]["delta_logprob"] == 0.0  # generated tokens only: the first token is untouched
    dog = data["concepts"]["dog"]
    assert dog["rows"] == 2 and dog["control_ci"][0] <= dog["control_rate"] <= dog["control_ci"][1]
    assert dog["delta_ci"][0] <= dog["delta_rate"] <= dog["delta_ci"][1]
    for arm in ("control", "perturbed"):  # fluency as perturb measures it
        assert data["fluency"][arm]["rows"] == 2 and data["fluency"][arm]["perplexity"] > 1
        assert 0 <= data["fluency"][arm]["degenerate_share"] <= 1
    assert data["settings"]["on_prompt"] == "off"
    assert data["settings"]["identical_sampling_both_arms"]
    assert data["rules_summary"]["g"]["rows_fired_guarded"] == 2
    pair = data["pairs"][0]
    assert pair["firings"] and pair["unguarded_firings"]
    # the first token of each arm comes from the same prompt, before any rule could act
    assert pair["diff"][0]["op"] == "equal" or pair["unguarded"][:1] == pair["guarded"][:1]
    r = runner.invoke(main, ["report", str(out), "--out", str(tmp_path / "p.md")])
    assert r.exit_code == 0, r.output
    assert "guarded by g: when (not cheese)" in (tmp_path / "p.md").read_text() or \
        "guarded by g: when not cheese" in (tmp_path / "p.md").read_text()
    r = runner.invoke(main, ["perturb", *TINY, "--dict", str(path), "--prompt", "x", "--chunk", "cheese",
                             "--rule", "when cheese -> stop"])
    assert r.exit_code == 2 and "not both" in r.output
    # with --on-prompt act the guard also acts on the prompt ("not cheese" holds there): the first token moves
    acted = tmp_path / "act.json"
    r = _guarded_perturb(runner, path, acted, "act")
    assert r.exit_code == 0, r.output
    data = json.loads(acted.read_text())
    assert data["settings"]["on_prompt"] == "act" and data["rules_summary"]["g"]["rows_fired_on_prompt"] == 2
    assert data["concepts"]["dog"]["delta_logprob"] != 0.0
    assert all(any(f.get("on_prompt") for f in pair["firings"]) for pair in data["pairs"])


def test_monitor_prompts_writes_one_line_per_firing(runner, tmp_path, tiny_dict):
    _, path = tiny_dict
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The dog ate\n# a comment\nI like cheese\n")
    out, summary = tmp_path / "f.jsonl", tmp_path / "sum.json"
    r = runner.invoke(main, ["monitor", *TINY, "--dict", str(path), "--prompts", str(prompts), "--generate", "5",
                             "--rule", "s: when not cheese for 3 -> stop", "--no-chat", "--out", str(out),
                             "--json", str(summary)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    data = json.loads(summary.read_text())
    assert data["finished"]["rule"] + data["finished"]["eos"] == 2
    for line in lines:
        assert line["rule"] == "s" and line["action"] == "stop" and line["generated_index"] == 2
    assert data["rules_summary"]["s"]["firings"] == len(lines)
    assert data["rules_summary"]["s"]["first_token"] == {str(x["prompt"]): x["token"] for x in lines}


def test_monitor_corpus_alert_scores_agree_with_evaluate(runner, tmp_path, tiny_dict, tiny_model, corpus_file):
    dictionary, path = tiny_dict
    chunk = next(c for c in dictionary.chunks if c.label == "cheese")
    out, summary, ev = tmp_path / "f.jsonl", tmp_path / "sum.json", tmp_path / "ev.json"
    rule = f"one: when cheese@{chunk.layer} -> alert"
    r = runner.invoke(main, ["monitor", *TINY, "--dict", str(path), "--corpus", str(corpus_file), "--rule", rule,
                             "--rule", "two: when cheese>=2 or dog for 2 -> alert", "--out", str(out),
                             "--json", str(summary), "--resume", "--checkpoint-every", "1"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "f.jsonl.partial").exists()  # cleared once everything is written
    r = runner.invoke(main, ["evaluate", *TINY, "--dict", str(path), "--corpus", str(corpus_file), "--json", str(ev)])
    assert r.exit_code == 0, r.output
    evaluated = json.loads(ev.read_text())
    record = next(x for x in evaluated["chunks"] if x["id"] == chunk.id)
    score = json.loads(summary.read_text())["scores"]["one"]
    assert score["tp"] == record["tp"] and score["fp"] == record["fp"]
    assert score["recall"] == pytest.approx(record["tp_rate"])
    assert score["fp_rate"] == pytest.approx(record["fp_rate"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sum(x["rule"] == "one" for x in lines) == score["alerts"]
    assert json.loads(summary.read_text())["tokens"] == evaluated["tokens"]


@pytest.mark.parametrize("args, words", [
    (["--rule", "when cheese@ -> stop"], "column 14"),
    (["--rule", "when chese -> stop"], "nearest: cheese"),
    (["--rule", "when cheese@9 -> alert"], "out of range"),
    (["--rule", "when cheese -> alert", "--rule", "when cheese -> alert"], "Two rules are named"),
])
def test_monitor_bad_rules_exit_2_before_the_model_loads(runner, tmp_path, tiny_dict, args, words):
    _, path = tiny_dict
    r = runner.invoke(main, ["monitor", *TINY, "--dict", str(path), "--corpus", str(tmp_path / "none.txt"), *args,
                             "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output
    assert "loaded" not in r.output


def test_monitor_spans_scores_agree_with_evaluate_spans(runner, tmp_path, tiny_dict, tiny_corpus):
    dictionary, path = tiny_dict
    spans = tmp_path / "spans.jsonl"
    with spans.open("w") as fh:
        for line in tiny_corpus.splitlines()[:25]:
            marks = [[i, i + 6, "cheese"] for i in range(len(line)) if line.startswith("cheese", i)]
            fh.write(json.dumps({"text": line, "spans": marks}) + "\n")
    chunk = next(c for c in dictionary.chunks if c.label == "cheese" and c.layer == 1)
    out, summary, ev = tmp_path / "f.jsonl", tmp_path / "sum.json", tmp_path / "ev.json"
    r = runner.invoke(main, ["monitor", *TINY, "--dict", str(path), "--spans", str(spans),
                             "--rule", "one: when cheese@1 -> alert", "--out", str(out), "--json", str(summary)])
    assert r.exit_code == 0, r.output
    assert "precision" in r.output and "recall" in r.output
    r = runner.invoke(main, ["evaluate", *TINY, "--dict", str(path), "--spans", str(spans), "--json", str(ev)])
    assert r.exit_code == 0, r.output
    record = next(x for x in json.loads(ev.read_text())["chunks"] if x["id"] == chunk.id)
    score = json.loads(summary.read_text())["scores"]["one"]
    assert (score["tp"], score["fp"], score["positives"]) == (record["tp"], record["fp"], record["positives"])
    assert score["positives"] > 0


def test_monitor_resume_continues_from_the_checkpoint(runner, tmp_path, tiny_dict, tiny_model, corpus_file):
    """A run stopped after its first checkpoint, resumed, writes what an uninterrupted run writes."""
    from chunktui.api import Engine
    from chunktui.engine.build import Checkpoint, LabelSource
    from chunktui.engine.labels import labelled_corpus
    from chunktui.engine.monitor import monitor_texts
    from chunktui.engine.rules import generate_rows
    from chunktui.shared.errors import GenerationCancelled
    from chunktui.shared.settings import Sampling

    dictionary, _ = tiny_dict
    engine = Engine.from_loaded(tiny_model, dictionary)
    program = engine.rules(["a: when cheese -> alert", "b: when dog for 2 -> alert"])
    corpus, labels = labelled_corpus(tiny_model, dictionary, LabelSource(corpus=corpus_file.read_text()))
    whole = monitor_texts(tiny_model, program, corpus, labels, batch_size=4)
    folder = tmp_path / "out.partial"
    calls = []
    with pytest.raises(GenerationCancelled):
        monitor_texts(tiny_model, program, corpus, labels, batch_size=4, checkpoint=Checkpoint(folder, every=2),
                      should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert (folder / "rank0.json").is_file()
    resumed = monitor_texts(tiny_model, program, corpus, labels, batch_size=4,
                            checkpoint=Checkpoint(folder, every=2, resume=True))
    assert [f.to_json() for f in resumed.firings] == [f.to_json() for f in whole.firings]
    assert resumed.scores == whole.scores
    other = engine.rules(["a: when cheese>=2 -> alert"])
    with pytest.raises(Exception, match="other settings"):
        monitor_texts(tiny_model, other, corpus, labels, batch_size=4, checkpoint=Checkpoint(folder, resume=True))
    # generated rows: the first batch restored, the rest generated, the same rows as a run without a stop
    sampling = Sampling(max_new_tokens=4, temperature=1.0, seed=1, stop_at_eos=False)
    prompts = ["The dog ate", "I like cheese", "A cat", "The rain"]
    plain = generate_rows(tiny_model, prompts, 1, sampling, program, chat=False, batch_size=2)
    folder2 = tmp_path / "rows.partial"
    generate_rows(tiny_model, prompts[:2], 1, sampling, program, chat=False, batch_size=2)  # warm
    first = generate_rows(tiny_model, prompts, 1, sampling, program, chat=False, batch_size=2,
                          checkpoint=Checkpoint(folder2, every=1))
    again = generate_rows(tiny_model, prompts, 1, sampling, program, chat=False, batch_size=2,
                          checkpoint=Checkpoint(folder2, every=1, resume=True))  # everything restored
    assert [r.ids for r in again] == [r.ids for r in first] == [r.ids for r in plain]
    assert [[f.to_json() for f in r.firings] for r in again] == [[f.to_json() for f in r.firings] for r in plain]
