"""Where a chunk fires (engine.top, `chunktui top`): the tables against a plain per-context search, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from chunktui.cli import main
from chunktui.engine.corpus import prepare_corpus, run_batch
from chunktui.engine.matching import PackedDictionary
from chunktui.engine.top import all_units, resolve_units, snippet, top_tables
from chunktui.shared.errors import ChunkError
from tests.conftest import make_corpus


@pytest.fixture(scope="module")
def heldout() -> str:
    return make_corpus(seed=7, sentences=30)  # not the text the tiny dictionary was built on


def _plain_best(loaded, dictionary, text, chunks):
    """Per context: (agreeing chunks, best matching score, token) of its best firing token, by a plain loop."""
    corpus = prepare_corpus(loaded.tokenizer, text, dictionary.notes.get("context_mode", "sentence"),
                            context_length=loaded.context_length)
    layers = sorted({c.layer for c in chunks})
    packed = PackedDictionary(chunks, loaded.hidden_size, layers)
    best = {}
    for r in range(len(corpus.rows)):
        index, states = run_batch(loaded, corpus, [r], layers)
        result = packed.match(states)
        for i, t in enumerate(index.tolist()):
            hits = [c for c in range(len(packed.chunks)) if bool(result.hit[i, c])]
            if not hits:
                continue
            inner = [c for c in hits if packed.chunks[c].layer != 0] or hits  # layer 0 only when alone
            key = (len(hits), max(float(result.score[i, c]) for c in inner))
            if r not in best or key > best[r][:2]:  # strictly better: the earliest token wins a tie
                best[r] = (*key, t)
    return best


@pytest.mark.parametrize("name", ["cheese", "dog@2"])
def test_tables_agree_with_a_plain_search(tiny_model, tiny_dict, heldout, name):
    dictionary, _ = tiny_dict
    chunks = resolve_units(dictionary, name)
    tables = top_tables(tiny_model, dictionary, heldout, {name: chunks}, batch_size=1)
    plain = _plain_best(tiny_model, dictionary, heldout, chunks)
    u = tables.index(name)
    fired = {r for r in range(len(tables.corpus.rows)) if math.isfinite(float(tables.key[r, u]))}
    assert fired == set(plain) and fired  # the same contexts fire
    for r, (agree, score, token) in plain.items():
        assert int(tables.agree[r, u]) == agree
        assert float(tables.score[r, u]) == pytest.approx(score, abs=1e-5)
        assert int(tables.token[r, u]) == token
    examples = tables.examples(name, k=4)
    assert 0 < len(examples) <= 4
    keys = [(e.agree, e.score) for e in examples]
    assert keys == sorted(keys, reverse=True)  # best first
    assert all(e.label == name.split("@")[0] for e in examples)
    for e in examples:  # the marked token is the corpus' text at its offsets, inside its context
        assert heldout[e.start:e.end].replace("\n", " ") == e.token
        assert e.agree >= 1 and e.score >= 0
    assert len({(e.before, e.token, e.after) for e in examples}) == len(examples)  # repeats shown once


def test_every_unit_in_one_pass_equals_one_unit_at_a_time(tiny_model, tiny_dict, heldout):
    dictionary, _ = tiny_dict
    alone = top_tables(tiny_model, dictionary, heldout, {"cake": resolve_units(dictionary, "cake")})
    together = top_tables(tiny_model, dictionary, heldout, {"cake": resolve_units(dictionary, "cake")},
                          extra=all_units(dictionary))
    assert len(together.names) == len(dictionary.chunks) + len(dictionary.labels())
    assert alone.examples("cake", 5) == together.examples("cake", 5)
    c = dictionary.chunks[3]
    assert together.examples(c.id, 3) == top_tables(tiny_model, dictionary, heldout, {c.id: [c]}).examples(c.id, 3)


def test_names_are_resolved_with_clear_messages(tiny_dict):
    dictionary, _ = tiny_dict
    layers = sorted(c.layer for c in dictionary.chunks if c.label == "cheese")
    assert [c.layer for c in resolve_units(dictionary, "cheese")] == layers
    assert [c.layer for c in resolve_units(dictionary, "cheese", [layers[1]])] == [layers[1]]
    assert resolve_units(dictionary, f"cheese@{layers[0]}")[0].id == f"cheese@{layers[0]}"
    with pytest.raises(ChunkError, match="neither a label nor a chunk id"):
        resolve_units(dictionary, "zebra")
    with pytest.raises(ChunkError, match="no chunk at layers"):
        resolve_units(dictionary, "cheese", [99])
    with pytest.raises(ChunkError, match="Name a chunk"):
        resolve_units(dictionary, "  ")


def test_snippet_keeps_to_the_context_and_marks_cuts():
    source = "First one.\nThe old cheese shop sells cheese to everyone in town. Last."
    a = source.index("cheese")
    lo, hi = source.index("The"), source.index(" Last")
    before, token, after = snippet(source, a, a + 6, lo, hi, chars=6)
    assert token == "cheese" and before == "…e old " and after == " shop …"
    assert snippet(source, a, a + 6, lo, hi, chars=8)[0] == "The old "  # the whole start: no cut to mark
    before, _, after = snippet(source, a, a + 6, lo, hi, chars=200)
    assert before == "The old " and after.endswith("in town.")


def test_top_command_writes_json_and_refuses_bad_input(tiny_dict, heldout, tmp_path):
    _, path = tiny_dict
    corpus = tmp_path / "heldout.txt"
    corpus.write_text(heldout)
    out = tmp_path / "top.json"
    runner = CliRunner()
    args = ["top", "--model", "random:llama-tiny", "--device", "cpu", "--dict", str(path), "--corpus", str(corpus)]
    r = runner.invoke(main, args + ["--chunk", "cheese", "--k", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["format"] == "chunktui.top" and data["chunk"] == "cheese" and data["k"] == 3
    assert 0 < len(data["examples"]) <= 3 and data["matches"] >= len(data["examples"])
    assert all(e["label"] == "cheese" and e["token"].strip() for e in data["examples"])
    assert "cheese" in r.output and "fires on" in r.output
    assert "[ cheese]" in r.output  # not a terminal: the firing token is marked in text
    r = runner.invoke(main, args + ["--chunk", "cheese", "--layer", "1", "--k", "2"])
    assert r.exit_code == 0, r.output
    assert "layer 1" in r.output
    r = runner.invoke(main, args + ["--chunk", "zebra"])
    assert r.exit_code == 2 and "neither a label nor a chunk id" in r.output
    r = runner.invoke(main, args + ["--chunk", "cheese", "--k", "0"])
    assert r.exit_code == 2
    r = runner.invoke(main, args + ["--chunk", "cheese", "--json", str(corpus)])  # an input is never an output
    assert r.exit_code == 2 and corpus.read_text() == heldout
    r = runner.invoke(main, ["top", "--model", "random:llama-tiny", "--dict", str(path), "--chunk", "cheese",
                             "--corpus", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_a_search_stops_when_asked(tiny_model, tiny_dict, heldout):
    from chunktui.shared.errors import GenerationCancelled

    dictionary, _ = tiny_dict
    with pytest.raises(GenerationCancelled):
        top_tables(tiny_model, dictionary, heldout, {"cheese": resolve_units(dictionary, "cheese")},
                   should_stop=lambda: True)


def test_the_engine_facade_answers_the_same(tiny_model, tiny_dict, heldout, tmp_path):
    from chunktui.api import Engine

    dictionary, _ = tiny_dict
    corpus = tmp_path / "h.txt"
    corpus.write_text(heldout)
    seen = []
    engine = Engine.from_loaded(tiny_model, dictionary)
    examples = engine.top("cheese", corpus=corpus, k=3, layers="1-2", progress=lambda *a: seen.append(a))
    direct = top_tables(tiny_model, dictionary, heldout, {"cheese": resolve_units(dictionary, "cheese", [1, 2])})
    assert examples == direct.examples("cheese", 3) and examples
    assert {e.layer for e in examples} <= {1, 2} and seen and seen[-1][1] == pytest.approx(1.0)
