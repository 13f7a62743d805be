"""The Chunks pane (issue 17, item 3): where a chunk fires in a corpus, the preview, the plot's axes, held-out
figures. The real app on the tiny random model."""

from __future__ import annotations

import shutil

import pytest

from chunktui.paths import sample_path
from chunktui.tui.widgets.score_plot import ScorePlot, nice_limit, x_labels
from tests.tui.conftest import generate, ready, settle

pytestmark = pytest.mark.anyio


async def _choose(app, pilot, query: str) -> None:
    await pilot.press("f3", "slash", *query, "enter", "enter")
    await settle(app, pilot)


async def test_where_a_chunk_fires_in_the_sample_text_and_in_a_file(make_test_app, tmp_path):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await _choose(app, pilot, "cheese@1")
        pane = app.query_one("ChunksPane")
        found = pane.fires
        assert found is not None and found.name == app.chosen_chunk_id == "cheese@1"
        assert found.corpus == str(sample_path("heldout.txt")) and found.layers == [1]
        heldout = sample_path("heldout.txt").read_text()
        assert 0 < len(found.examples) <= 10 and found.matches >= len(found.examples)
        for e in found.examples:
            assert e.chunk_id == "cheese@1" and e.score >= 0
            assert heldout[e.start:e.end].replace("\n", " ") == e.token
        assert app.query_one("#fires-list").option_count == len(found.examples)
        assert "heldout.txt" in str(app.query_one("#fires-status").content)
        assert app._busy is None
        # another chunk chosen while a search runs: shown once the pass ends (its tables hold every chunk)
        app.query_one("#fires-corpus").value = str(sample_path("train.txt"))
        app.action_find_fires()
        assert app._busy == "search"
        await pilot.press("f3", "slash", *"cheese", "enter", "down", "down", "enter")  # rows by layer: 0, 1, 2
        await settle(app, pilot)
        assert app.chosen_chunk_id == "cheese@2" and pane.fires.name == "cheese@2"
        assert pane.fires.corpus == str(sample_path("train.txt")) and pane.fires.cached
        app.query_one("#fires-corpus").value = ""
        # all layers of the label
        app.query_one("#fires-all").value = True
        await settle(app, pilot)
        assert pane.fires.name == "cheese" and len(pane.fires.layers) > 1
        # a file of one's own
        mine = tmp_path / "mine.txt"
        mine.write_text("We ate cheese at noon. The dog slept. More cheese, said the cat.\n")
        field = app.query_one("#fires-corpus")
        field.focus()
        field.value = str(mine)
        await pilot.press("enter")
        await settle(app, pilot)
        assert pane.fires.corpus == str(mine)
        assert all(e.token in mine.read_text() for e in pane.fires.examples)
        field.value = str(tmp_path / "missing.txt")
        await pilot.press("enter")
        await settle(app, pilot)
        assert pane.fires is None and "does not exist" in str(app.query_one("#fires-status").content)


async def test_a_long_search_runs_in_the_engine_and_esc_stops_it(make_test_app, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(sample_path("heldout.txt").read_text() * 60)  # long enough to still run when the next job comes
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await _choose(app, pilot, "dog@2")
        app.query_one("#fires-corpus").value = str(big)
        app.action_find_fires()
        assert app._busy == "search"
        await pilot.press("f2")  # the screen keeps answering while the engine searches
        assert app.query_one("TabbedContent").active == "stream"
        await pilot.pause(0.3)
        await pilot.press("escape")
        await settle(app, pilot)
        assert app._busy is None
        assert "cancelled" in str(app.query_one("#fires-status").content)
        app.action_find_fires()  # again; a generation asked for meanwhile takes its place at once
        assert app._busy == "search"
        await generate(app, pilot, prompt="A cake", tokens=5)
        assert app.stream_trace.title == "A cake" and app.stream_trace.finished == "length"
        assert app._busy is None and "stopped for the job you started" in str(app.query_one("#fires-status").content)


async def test_preview_starts_at_the_first_match_and_scrolls(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot, prompt="the " * 150 + "The dog ate the cheese", tokens=4)
        await _choose(app, pilot, "cheese@0")
        preview = app.query_one("#chunk-tokens")
        trace = app.stream_trace
        column = trace.columns.ids.index("cheese@0")
        first = trace.chunk_hits(column).index(True)
        assert preview._line_of[first] > preview.size.height  # far below the first screenful
        top = preview.scroll_offset.y
        # the match's line is on screen, a line of context above it (unless the text ends first)
        assert top == min(preview._line_of[first] - 1, preview.max_scroll_y) > 0
        assert top <= preview._line_of[first] < top + preview.size.height
        preview.focus()
        await pilot.press("pageup")
        assert app.focused is preview and preview.scroll_offset.y < top
        await pilot.press("home")
        assert preview.scroll_offset.y == 0


async def test_score_plot_has_labelled_axes(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await _choose(app, pilot, "cheese@1")
        plot = app.query_one(ScorePlot)
        assert len(plot.scores) == len(app.stream_trace)
        lines = str(plot.render()).split("\n")
        limit = plot.limit
        assert lines[1].strip().startswith(f"+{limit:g} ┤") and lines[-3].strip().startswith(f"-{limit:g} ┤")
        assert any(line.strip().startswith("0 ┼") for line in lines)
        assert lines[-1].split()[:2] == ["token", "0"] and lines[-1].split()[-1] == str(len(plot.scores) - 1)
        assert max(abs(s) for s in plot.scores) <= limit


def test_axis_helpers():
    assert nice_limit([0.2, -0.3]) == 0.5 and nice_limit([3.1]) == 4 and nice_limit([-20]) == 32
    assert nice_limit([]) == 1 and nice_limit([float("inf"), 2]) == 2
    labels = x_labels(100, 60, 60)
    assert labels.split() == ["100", "130", "159"] and labels.rstrip().endswith("159") and len(labels) == 60
    assert x_labels(0, 1, 10).split() == ["0"]


async def test_table_shows_held_out_figures_when_the_dictionary_has_them(make_test_app, tiny_dict, tiny_model,
                                                                         tmp_path):
    from chunktui.engine.build import LabelSource, evaluate_dictionary, store_heldout
    from chunktui.engine.dictionary import load_dictionary
    from tests.conftest import make_corpus

    _, path = tiny_dict
    copy = tmp_path / "held.chunks.safetensors"
    shutil.copy(path, copy)
    dictionary = load_dictionary(copy)
    records, corpus = evaluate_dictionary(tiny_model, dictionary, LabelSource(corpus=make_corpus(seed=5)))
    assert store_heldout(dictionary, records, "held.txt", corpus.digest) == len(dictionary.chunks)
    dictionary.save(copy)
    app = make_test_app(dict_path=str(copy), dict_dirs=[tmp_path])
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f3")
        table = app.query_one("#chunk-table")
        titles = [str(c.label) for c in table.columns.values()]
        assert titles[-2:] == ["held TP", "held FP"]
        by_id = {r["id"]: r for r in records}
        for row_key in list(table.rows)[:5]:
            row = table.get_row(row_key)
            assert row[-2] == f"{by_id[row_key.value]['tp_rate']:.2f}"
            assert row[-1] == f"{by_id[row_key.value]['fp_rate']:.3f}"
        assert "held out on held.txt" in str(app.query_one("#chunk-count").content)
    plain = make_test_app()
    async with plain.run_test(size=(100, 34)) as pilot:  # a dictionary without them: the columns as before
        await ready(plain, pilot)
        assert [str(c.label) for c in plain.query_one("#chunk-table").columns.values()][-2:] == ["fit TP", "fit FP"]


def test_preview_start_skips_a_chat_template_when_the_chunk_does_not_match():
    from types import SimpleNamespace as NS

    from chunktui.tui.panes.chunks_pane import ChunksPane

    def trace(pieces, generated, hits, title):
        steps = [NS(text=t, generated=g) for t, g in zip(pieces, generated)]
        return NS(steps=steps, text="".join(pieces), title=title, chunk_hits=lambda column: hits)

    system = ["<|im_start|>", "system\n", "You are a helpful assistant", "<|im_end|>\n", "<|im_start|>", "user\n"]
    user = ["What", " about", " cheese", "?"]
    answer = [" I", " like", " it"]
    pieces = system + user + answer
    generated = [False] * (len(system) + len(user)) + [True] * len(answer)
    start = ChunksPane.interesting_start
    hits = [False] * len(pieces)
    assert start(trace(pieces, generated, hits, "What about cheese?"), 0) == len(system) + len(user)  # the answer
    hits[len(system) + 2] = True
    assert start(trace(pieces, generated, hits, "What about cheese?"), 0) == len(system) + 2  # the first match
    scan = [False] * len(pieces)  # a scanned text: nothing generated, nothing matched: where the user's words start
    assert start(trace(pieces, scan, [False] * len(pieces), "What about cheese?"), 0) == len(system)
