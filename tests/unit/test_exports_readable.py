"""Exports a person can use: one colour per label, labels in text, layer evidence and settings, Markdown that
renders, and `scan` without colours marking matches with their labels."""

import json
import re

from click.testing import CliRunner

from chunktui.cli import main
from chunktui.palette import PALETTE, label_colours, palette
from chunktui.shared.reports import render


def _sample_labels():
    from chunktui.paths import sample_path

    return [w.strip() for w in open(sample_path("concepts.txt")) if w.strip() and not w.startswith("#")]


def test_every_label_of_a_dictionary_gets_its_own_colour():
    labels = _sample_labels()
    assert len(labels) == 34
    colours = label_colours(labels)
    assert len(set(colours.values())) == len(labels)  # cake and school, book and red used to share one
    assert len(set(palette(300))) == 300
    assert palette(5) == PALETTE[:5]  # the first colours stay as they were (small dictionaries look the same)
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in palette(100))


def _session():
    tokens = [{"index": 0, "text": "The", "strongest_label": None, "layer_chunk": [None, None]},
              {"index": 1, "text": " cheese", "strongest_label": "cheese", "agree": 27, "voters": 30,
               "precision": {"value": 0.96, "n": 45, "on": "training"}, "layer_chunk": ["cheese@0", "cheese@1"]},
              {"index": 2, "text": " fell", "strongest_label": None, "layer_chunk": [None, None]}]
    run = {"settings": {"temperature": 0.8, "top_p": 0.9, "seed": 3, "samples": 4},
           "intervention": {"mode": "graft", "strength": 1.0, "positions": "prompt", "layers": [2, 9],
                            "labels": ["cheese"]},
           "concepts": {"cheese": {"control_rate": 0.0, "perturbed_rate": 0.5, "delta_rate": 0.5,
                                   "logprob_control": -5.0, "logprob_perturbed": -3.0, "delta_logprob": 2.0}},
           "pairs": [{"prompt": "Q?", "seed": 0, "control": "I like the cat a lot", "perturbed": "I like the cheese",
                      "diff": [{"op": "equal", "control": "I like the", "perturbed": "I like the"},
                               {"op": "replace", "control": " cat a lot", "perturbed": " cheese"}]}]}
    return {"format": "chunktui.session", "version": 1, "model": {"name": "m"}, "dictionary": None,
            "labels": ["cheese", "cake"], "runs": [run],
            "traces": [{"kind": "stream", "title": "t", "text": "The cheese fell", "tokens": tokens,
                        "settings": {"temperature": 0.7, "top_p": 0.95, "seed": 1, "max_new_tokens": 20},
                        "rule": "a token shows a concept when its layers agree"}]}


def test_markdown_renders_labels_evidence_and_settings():
    md = re.sub(r"\\(.)", r"\1", render(_session(), "md"))  # as read: md_text's backslash escapes removed
    assert "The cheese[cheese] fell" in md  # labels in text, not by colour alone
    assert "27/30 layers, 96% right in training (n 45)" in md and "| 0, 1 |" in md  # layer evidence per token
    assert "temperature 0.7" in md and "top-p 0.95" in md and "seed 1" in md  # the trace's sampling settings
    assert "temperature 0.8" in md and "samples 4" in md  # the run's
    assert "~~cat a lot~~" in md and "**cheese**" in md
    # the markers hug their words ('~~ cat a lot~~' is not strikethrough in CommonMark)
    assert "- perturbed: I like the ~~cat a lot~~ **cheese**" in md


def test_html_shows_labels_as_text_and_evidence():
    body = render(_session(), "html")
    assert '<span class="lab">cheese</span>' in body
    assert "27/30 layers, 96% right in training (n 45)" in body
    assert "temperature 0.7" in body and "temperature 0.8" in body


def test_csv_has_the_evidence_columns():
    rows = render(_session(), "csv").splitlines()
    header = rows[0].split(",")
    cheese = next(r for r in rows if "cheese" in r and ",stream," in r).split(",")
    assert cheese[header.index("agree")] == "27" and cheese[header.index("voters")] == "30"
    assert cheese[header.index("precision")] == "0.96"


def test_scan_without_colours_marks_matches_with_labels(tmp_path, tiny_dict, monkeypatch):
    _, path = tiny_dict
    monkeypatch.setenv("NO_COLOR", "1")
    r = CliRunner().invoke(main, ["scan", "--model", "random:llama-tiny", "--dict", str(path), "--text",
                                  "The dog ate the cheese.", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "s.json").read_text())
    shown = {t["text"].strip(): t["strongest_label"] for t in data["tokens"] if t["strongest_label"]}
    assert shown  # something is shown with a concept, and each such token carries its label in the text
    for text, label in shown.items():
        assert f"{text}[{label}]" in r.output
    assert "The[" not in r.output and "legend: [" in r.output
