"""Reports: session, scan and perturb JSON to md/html/csv/json, and the `report` command."""

import json

import pytest
from click.testing import CliRunner

from chunktui.cli import main
from chunktui.palette import label_colours
from chunktui.shared.errors import ExportError
from chunktui.shared.reports import normalise, read_input, render, write_report
from chunktui.shared.session import ChunkColumns, Session, Trace
from chunktui.engine.steps import steps_from_scan


@pytest.fixture(scope="module")
def session_json(tiny_model, tiny_dict):
    from chunktui.engine.matching import pack
    from chunktui.engine.streaming import scan_text

    dictionary, path = tiny_dict
    packed = pack(dictionary.chunks, tiny_model.hidden_size, tiny_model.layout.n_states)
    trace = Trace("scan", "dogs", ChunkColumns.from_pack(packed))
    trace.extend(steps_from_scan(scan_text(tiny_model, "The dog ate the cheese <b>by</b> the river", packed)))
    run = {"settings": {"seed": 0}, "intervention": {"mode": "graft", "strength": 1.0, "positions": "prompt",
                                                     "layers": [1, 2], "labels": ["cheese"]},
           "concepts": {"cheese": {"control_rate": 0.0, "perturbed_rate": 1.0, "delta_rate": 1.0,
                                   "logprob_control": -5.0, "logprob_perturbed": -3.0, "delta_logprob": 2.0}},
           "pairs": [{"prompt": "Q?", "seed": 0, "control": "a b c", "perturbed": "a cheese c",
                      "diff": [{"op": "equal", "control": "a ", "perturbed": "a "},
                               {"op": "replace", "control": "b", "perturbed": "cheese"},
                               {"op": "equal", "control": " c", "perturbed": " c"}]}]}
    session = Session(model=tiny_model.card(), dictionary=str(path), labels=dictionary.labels(), traces=[trace],
                      runs=[run])
    return json.loads(json.dumps(session.to_json()))


def test_session_round_trips_and_records_matches(session_json):
    assert session_json["format"] == "chunktui.session"
    tokens = session_json["traces"][0]["tokens"]
    assert "cheese" in [t["strongest_label"] for t in tokens]
    assert all(len(t["layer_chunk"]) == 5 and len(t["norms"]) == 5 for t in tokens)
    assert normalise(session_json) == session_json


def test_html_is_self_contained_with_app_colours(session_json):
    body = render(session_json, "html")
    colour = label_colours(session_json["labels"])["cheese"]
    assert f"background:{colour}" in body
    assert "<style>" in body and "<script" not in body and "http" not in body.split("</style>")[0]
    assert "&lt;b&gt;" in body  # text is escaped
    assert "<del>b</del>" in body and "<ins>cheese</ins>" in body


def test_markdown_csv_json(session_json):
    md = render(session_json, "md")
    assert md.startswith("# chunktui session") and "| cheese |" in md and "**cheese**" in md
    rows = render(session_json, "csv").splitlines()
    assert rows[0] == "source,kind,index,text,generated,label,score,logprob,layers,agree,voters,precision"
    assert any(",concept," in r and "cheese" in r for r in rows)
    assert json.loads(render(session_json, "json")) == session_json
    with pytest.raises(ExportError, match="Unknown report format"):
        render(session_json, "pdf")


def test_scan_and_perturb_outputs_are_accepted(tmp_path, tiny_dict):
    _, dict_path = tiny_dict
    scan = {"model": "random:llama-tiny", "dictionary": str(dict_path), "text": "a cheese",
            "tokens": [{"index": 0, "token_id": 1, "text": "a", "strongest": None, "strongest_label": None},
                       {"index": 1, "token_id": 2, "text": " cheese", "strongest": "cheese@0",
                        "strongest_label": "cheese", "matches_by_layer": {"0": []}}],
            "generated": [False, False]}
    session = normalise(scan)
    assert session["traces"][0]["tokens"][1]["strongest_label"] == "cheese"
    assert len(session["labels"]) > 1  # read from the dictionary, so colours match the app
    with pytest.raises(ExportError, match="neither"):
        normalise({"hello": 1})


def test_report_command_and_atomic_failure(tmp_path, session_json):
    src = tmp_path / "s.json"
    src.write_text(json.dumps(session_json))
    runner = CliRunner()
    out = tmp_path / "r.html"
    r = runner.invoke(main, ["report", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    r = runner.invoke(main, ["report", str(src), "--format", "csv", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "directory" in r.output
    r = runner.invoke(main, ["report", str(tmp_path / "missing.json"), "--out", str(out)])
    assert r.exit_code == 2 and "not exist" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert runner.invoke(main, ["report", str(bad), "--out", str(out)]).exit_code == 2
    before = out.read_text()
    with pytest.raises(ExportError):
        write_report(session_json, "html", "/proc/no-such/dir/x.html")
    assert out.read_text() == before
    assert read_input(src)["traces"]
