"""Exports of a hostile session: no live script, no raw terminal escape, no formula, in any format.

The session holds what a prompt, a model or an edited file can: <script>, an attribute break-out with an
onerror handler, ESC sequences (screen clear, OSC 52 clipboard write), NUL, an RTL override, a lone
surrogate, code fences, table pipes, Markdown links to javascript:, and spreadsheet formulas.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from markdown_it import MarkdownIt

from chunktui.shared.reports import normalise, read_input, render, write_report

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "\x1b[2J\x1b]52;c;aGk=\x07", "nul\x00",
           "\u202egnp.exe", "\ud800", "```\n<img src=x onerror=alert(2)>\n```", "a|b|c", "=HYPERLINK(\"http://e\")",
           "[x](javascript:alert(3))", "<javascript:alert(4)>", "+cmd|' /C calc'!A0", "@SUM(1)", "-2+3"]


def _session() -> dict:
    tokens = [{"index": i, "token_id": i, "text": h, "generated": bool(i % 2), "strongest": 0,
               "strongest_label": HOSTILE[(i + 1) % len(HOSTILE)], "strongest_score": 1.0, "logprob": -0.5,
               "matches_by_layer": {"1": [0]}} for i, h in enumerate(HOSTILE)]
    run = {"intervention": {"mode": "graft", "strength": 1.0, "labels": HOSTILE[:3], "layers": [1, 2],
                            "positions": "prompt"},
           "concepts": {h: {"control_rate": 0.0, "perturbed_rate": 1.0, "delta_rate": 1.0, "logprob_control": -1.0,
                            "logprob_perturbed": 0.0, "delta_logprob": 1.0} for h in HOSTILE},
           "pairs": [{"prompt": h, "seed": 0, "control": h, "perturbed": h + "!",
                      "diff": [{"op": "equal", "control": h, "perturbed": h},
                               {"op": "insert", "control": "", "perturbed": HOSTILE[-1 - k]}]}
                     for k, h in enumerate(HOSTILE)]}
    return normalise({"format": "chunktui.session", "version": 1, "created": HOSTILE[2],
                      "model": {"name": HOSTILE[0]}, "dictionary": HOSTILE[1], "labels": HOSTILE,
                      "traces": [{"kind": "stream", "title": HOSTILE[6], "settings": {}, "text": "".join(HOSTILE),
                                  "tokens": tokens}], "runs": [run]})


def _raw_escapes(data: bytes) -> list[bytes]:
    bad = [bytes([c]) for c in range(32) if c not in (9, 10, 13)] + [b"\x7f", "\u202e".encode(), b"\xc2\x9b"]
    return [b for b in bad if b in data]


@pytest.mark.parametrize("fmt", ["md", "html", "csv", "json"])
def test_hostile_session_exports_are_inert(fmt, tmp_path):
    path = write_report(_session(), fmt, tmp_path / f"r.{fmt}")
    data = path.read_bytes()
    text = data.decode("utf-8")  # strict: no lone surrogate reached the file
    if fmt == "json":
        assert json.loads(text)["traces"][0]["tokens"][0]["text"] == HOSTILE[0]  # data kept, JSON-escaped
        assert b"\x1b" not in data and b"\x00" not in data
        return
    assert _raw_escapes(data) == []
    if fmt == "html":
        lowered = text.lower()
        assert "<script" not in lowered and "<img" not in lowered and 'href="javascript' not in lowered
        assert "&lt;script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    if fmt == "md":
        rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(text).lower()
        assert "<script" not in rendered and "<img" not in rendered
        assert 'href="javascript' not in rendered
        # every hit row is one table row with exactly four cells: '|' in a label did not add columns
        rows = [line for line in text.splitlines() if line.startswith("| ") and "strongest chunk" not in line]
        token_rows = rows[:len(HOSTILE)]
        assert all(len(MarkdownIt("commonmark").enable("table").parse(
            "| a | b | c | d |\n|---|---|---|---|\n" + row)) > 0 for row in token_rows)
        table = MarkdownIt("commonmark").enable("table").render(
            "\n".join(["| # | token | strongest chunk | layers matched |", "|---:|---|---|---|", *token_rows]))
        assert table.count("<tr>") == len(HOSTILE) + 1 and all(r.count("<td") == 4 for r in table.split("<tr>")[2:])
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        text_cols = [0, 1, 3, 5, 8]
        for row in rows[1:]:
            for c in text_cols:
                assert not row[c][:1] in ("=", "+", "-", "@"), row
        assert any(row[3] == "'=HYPERLINK(\"http://e\")" for row in rows)


def test_a_report_input_with_a_lone_surrogate_or_deep_nesting(tmp_path):
    from chunktui.shared.errors import ExportError

    src = tmp_path / "s.json"
    src.write_text('{"tokens": [{"text": "a\\ud800b", "strongest_label": "x"}], "text": "a\\ud800b"}')
    session = read_input(src)
    assert session["traces"][0]["tokens"][0]["text"] == "a\ufffdb"  # replaced, as the docs say
    for fmt in ("md", "html", "csv"):
        render(session, fmt).encode("utf-8")
    src.write_text('{"tokens": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ExportError, match="nested too deeply"):
        read_input(src)
