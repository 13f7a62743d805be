"""Functional tests: drive the real app with a pilot on the tiny random model."""

from __future__ import annotations

import json

import pytest

from chunktui.tui.widgets.token_detail import TokenDetail
from chunktui.tui.widgets.trace_view import TraceView
from tests.tui.conftest import generate, ready, settle

pytestmark = pytest.mark.anyio


def _notes(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_load_shows_card_and_dictionaries(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        assert app.dictionary is not None and app.dictionary.columns.ids
        await pilot.press("f1")
        card = str(app.query_one("#model-card").content)
        assert "llama" in card.lower() and "layers" in card
        options = app.query_one("#dict-list")
        assert options.option_count == 1 and not options.get_option_at_index(0).disabled


async def test_generate_colours_tokens_and_records_session(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        trace = app.stream_trace
        assert trace.finished == "length" and trace.n_generated == 12
        labels = trace.labels()
        assert "cheese" in labels and "dog" in labels  # prompt words match their layer-0 chunks
        legend = str(app.query_one("#stream-trace .legend").content)
        assert "cheese" in legend
        assert app.session.traces == [trace]
        assert app.frames >= 1  # drawn by the coalescing timer


async def test_select_token_and_layer(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        view = app.query_one("#stream-trace", TraceView)
        assert app.focused is view
        target = app.stream_trace.labels().index("cheese")
        await pilot.press("home")
        await pilot.press(*["right"] * target)
        assert view.cursor == target
        await settle(app, pilot)  # the engine's per-chunk detail for the selected token
        detail = str(view.query_one(TokenDetail).content)
        assert detail.startswith(f"token {target}") and "cheese" in detail and "θ" in detail
        await pilot.press("right_square_bracket")  # layer 0
        assert view.layer_index == 0
        await settle(app, pilot)
        assert "layer 0" in str(view.query_one(TokenDetail).content)
        await pilot.press("home", "n")
        assert view.cursor is not None and view.cursor > 0


async def test_a_move_draws_the_detail_panel_once_with_the_engines_detail(make_test_app):
    """A key that moves the cursor leaves the panel for the engine's detail (a few ms) instead of drawing the
    step's summary first and the detail over it; a detail that does not come is replaced by the summary."""
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        view = app.query_one("#stream-trace", TraceView)
        panel = view.query_one(TokenDetail)
        shown = []
        original = panel.show
        panel.show = lambda *args, **kw: (shown.append((args[2], args[4])), original(*args, **kw))[1]
        for key in ("home", "right", "right", "left"):
            await pilot.press(key)
            await settle(app, pilot)
        # one draw per move, each with the engine's detail for the token moved to
        assert [(cursor, detail is not None and detail.index == cursor) for cursor, detail in shown] == \
            [(0, True), (1, True), (2, True), (1, True)]
        assert str(panel.content).startswith("token 1")
        # the engine does not answer (the request is dropped): the step's own summary comes after the wait
        app.send = lambda request: False
        shown.clear()
        await pilot.press("right", "right")
        view.redraw()  # a frame while it waits leaves the panel to the detail or the timer
        assert shown == []
        await pilot.pause(view.DETAIL_WAIT_SECONDS + 0.2)
        assert shown == [(3, None)] and str(panel.content).startswith("token 3")


async def test_escape_cancels_generation(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        app.query_one("#prompt").value = "The dog"
        app.query_one("#stream-tokens").value = "480"
        app.action_generate()
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.stream_trace.finished == "cancelled"
        assert app.stream_trace.n_generated < 480
        assert any("cancelled" in n for n in _notes(app))
        assert app._busy is None


async def test_chunks_table_filter_and_focus(make_test_app, tiny_dict):
    dictionary, _ = tiny_dict
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await pilot.press("f3")
        table = app.query_one("#chunk-table")
        assert table.row_count == len(dictionary.chunks)
        await pilot.press("slash", *"cheese", "enter")
        assert 0 < table.row_count < len(dictionary.chunks)
        await pilot.press("enter")
        assert app.chosen_chunk_id.startswith("cheese@")
        plot = app.query_one("#chunk-plot")
        assert len(plot.scores) == len(app.stream_trace)
        await pilot.press("s")
        assert app.query_one("#chunks").query_one("ChunksPane").sort_column == "kind"


async def test_perturb_shows_both_continuations_and_history(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        app.query_one("#perturb-layers").value = "1-3"
        app.query_one("#perturb-strength").value = "1.0"
        app.query_one("#perturb-tokens").value = "10"
        app.query_one("#perturb-prompt").value = "The dog ate the"
        app.action_regenerate()
        await settle(app, pilot)
        assert len(app.session.runs) == 1
        run = app.session.runs[0]
        assert run["intervention"]["mode"] == "graft" and run["intervention"]["layers"] == [1, 2, 3]
        assert "cheese" in run["concepts"]
        assert str(app.query_one("#side-control").content).startswith("control")
        assert str(app.query_one("#side-perturbed").content).startswith("perturbed")
        assert "Δ" in str(app.query_one("#perturb-summary").content) or "log p" in str(
            app.query_one("#perturb-summary").content)
        app.action_regenerate()
        await settle(app, pilot)
        assert app.query_one("#perturb-history").option_count == 2


async def test_perturb_reports_samples_intervals_fluency_control_and_sweep(make_test_app, monkeypatch):
    from chunktui.shared.settings import DEFAULT_SAMPLES
    from chunktui.tui.panes.perturb_pane import PerturbPane

    heard = []
    original = PerturbPane.show_progress
    monkeypatch.setattr(PerturbPane, "show_progress",
                        lambda self, fraction, text: (heard.append(text), original(self, fraction, text)))
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        assert app.query_one("#perturb-samples").value == str(DEFAULT_SAMPLES)  # the CLI's default
        app.query_one("#perturb-layers").value = "1-3"
        app.query_one("#perturb-strength").value = "1.0"
        app.query_one("#perturb-tokens").value = "6"
        app.query_one("#perturb-samples").value = "3"
        app.query_one("#perturb-prompt").value = "The dog ate the"
        app.query_one("#perturb-control").value = "subpopulation"
        app.action_regenerate()
        await settle(app, pilot)
        run = app.session.runs[-1]
        assert run["settings"]["samples"] == 3 and len(run["pairs"]) == 3
        assert run["control_intervention"]["kind"] == "subpopulation"
        summary = str(app.query_one("#perturb-summary").content)
        c = run["concepts"]["cheese"]
        assert "3 samples per arm" in summary and "Wilson 95%" in summary
        lo, hi = c["perturbed_ci"]
        assert f"[{100 * lo:.0f}-{100 * hi:.0f}]" in summary  # the interval, as the report has it
        assert f"perturbed ppl {run['fluency']['perturbed']['perplexity']:.1f}" in summary
        assert "random control: subpopulation" in summary and "random ppl" in summary
        sides = str(app.query_one("#side-perturbed").content)
        assert sides.count("seed ") == 3 and "random control:" in sides
        # progress reached the pane: every arm, and the prompt finishing in each
        assert any(t.startswith("control: prompt 1/1 done") for t in heard)
        assert any(t.startswith("perturbed: prompt 1/1 done") for t in heard)
        assert any(t.startswith("random: prompt 1/1 done") for t in heard)
        # a sweep: one table, a row per strength
        app.query_one("#perturb-sweep").value = "0.5,1"
        app.query_one("#perturb-control").value = "no control"
        app.action_regenerate()
        await settle(app, pilot)
        run = app.session.runs[-1]
        assert [e["strength"] for e in run["sweep"]] == [0.5, 1.0] and run["control_intervention"] is None
        assert app.query_one("#perturb-history").option_count == 2
        assert "graft x0.5,1 cheese" in str(app.query_one("#perturb-history").get_option_at_index(1).prompt)
        app.query_one("#perturb-sweep").value = "0.5,,1"
        app.action_regenerate()
        await pilot.pause()
        assert any("separated by commas" in n for n in _notes(app)), _notes(app)


async def test_perturb_progress_shows_in_the_pane_and_the_status_bar(make_test_app):
    from chunktui.shared import protocol as p

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        app._set_busy("perturb")
        app._handle_progress(p.Progress("perturbed", 0.5, "perturbed: prompt 1/2 done (4/8 continuations)",
                                        task="perturb"))
        await pilot.pause()
        assert "running: perturbed: prompt 1/2 done (4/8 continuations) (50%)" in str(
            app.query_one("#perturb-summary").content)
        assert "perturbed: prompt 1/2 done (4/8 continuations) (Esc stops)" in str(app.query_one("#status").content)
        assert "perturbed" not in str(app.query_one("#load-stage").content)  # not the Model pane's loading line
        app._set_busy(None)


async def test_escape_cancels_a_perturbation_and_the_pane_says_so(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        app.query_one("#perturb-layers").value = "1-3"
        app.query_one("#perturb-tokens").value = "300"
        app.query_one("#perturb-samples").value = "8"
        app.query_one("#perturb-sweep").value = "0.2,0.4,0.6,0.8,1"
        app.query_one("#perturb-prompt").value = "The dog ate the"
        app.action_regenerate()
        await pilot.pause(0.5)
        assert app._busy == "perturb" and "running:" in str(app.query_one("#perturb-summary").content)
        await pilot.press("escape")
        await settle(app, pilot)
        assert app._busy is None and app.session.runs == []
        assert "Perturbation cancelled" in str(app.query_one("#perturb-summary").content)


async def test_changing_mode_keeps_a_typed_strength_or_says_it_changed_it(make_test_app):
    from chunktui.tui.panes.perturb_pane import PerturbPane

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        pane, strength, mode = app.query_one(PerturbPane), app.query_one("#perturb-strength"), app.query_one("#perturb-mode")
        mode.value = "amplify"  # untouched default: follows the new mode's default
        await pilot.pause()
        assert strength.value == "2"
        strength.value = "0.3"  # typed, and valid for suppress too: kept
        mode.value = "suppress"
        await pilot.pause()
        assert strength.value == "0.3" and not any("Strength" in n for n in _notes(app))
        mode.value = "amplify"
        await pilot.pause()
        strength.value = "3"  # typed, but freeze takes at most 1: replaced, and said so
        mode.value = "freeze"
        await pilot.pause()
        assert strength.value == "1"
        assert any("Strength 3 is not valid for freeze" in n and "default, 1" in n for n in _notes(app))
        assert pane.request().strength == 1.0


async def test_a_run_journalled_before_intervals_still_shows(make_test_app, tmp_path):
    from chunktui.shared.journal import Journal, read_journal
    from chunktui.tui.panes.perturb_pane import PerturbPane

    old = {"settings": {"max_new_tokens": 10, "temperature": 0.8, "top_p": 0.9, "top_k": 0, "seed": 0,
                        "stop_strings": [], "chat": True, "samples": 1, "prompts": 1,
                        "identical_sampling_both_arms": True},
           "intervention": {"mode": "suppress", "strength": 0.5, "positions": "prompt", "layers": [2, 3],
                            "chunks": ["pizza@2", "pizza@3"], "labels": ["pizza"]},
           "concepts": {"pizza": {"control_rate": 1.0, "perturbed_rate": 0.0, "delta_rate": -1.0,
                                  "logprob_control": -2.0, "logprob_perturbed": -6.5, "delta_logprob": -4.5,
                                  "first_tokens": [" pizza"], "rows": 1}},
           "pairs": [{"prompt": "Q?", "seed": 0, "control": "I love pizza.", "perturbed": "a. mention. Your.",
                      "diff": [{"op": "replace", "control": "I love pizza.", "perturbed": "a. mention. Your."}]}],
           "prompt": "Q?", "model": "random:llama-tiny"}
    journal = Journal(tmp_path / "old.jsonl")
    journal.run(old)
    journal.close()
    restored = read_journal(tmp_path / "old.jsonl").session.runs
    assert restored == [old]
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        app.query_one(PerturbPane).add_run(restored[0])
        await pilot.pause()
        summary = str(app.query_one("#perturb-summary").content)
        assert "in text: 100% → 0% (1 sample, no interval)" in summary and "1 sample per arm" in summary
        assert "fluency" not in summary  # not measured then, so not shown
        assert "a. mention. Your." in str(app.query_one("#side-perturbed").content)


async def test_step_through_sequences(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f5")
        assert app.query_one("#step-list").option_count == 2
        app.query_one("#step-list").focus()
        await pilot.press("enter")
        await settle(app, pilot)
        view = app.query_one("#step-trace", TraceView)
        assert view.trace is not None and view.trace.kind == "scan" and view.cursor == 0
        assert app.focused is view
        await pilot.press("right")
        assert view.cursor == 1
        view.jump_label = "cheese"
        await pilot.press("n")
        assert view.trace.label_at(view.cursor) == "cheese" or view.trace.next_match(0, "cheese") == view.cursor
        await pilot.press("left_square_bracket")  # all -> last layer
        assert view.layer_index == app.model.n_states - 1


@pytest.mark.parametrize("fmt", ["html", "md", "csv", "json"])
async def test_export_writes_each_format(make_test_app, tmp_path, fmt):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await pilot.press("f6")
        out = tmp_path / f"session.{fmt}"
        app.query_one("#export-format").value = fmt
        app.query_one("#export-path").value = str(out)
        await pilot.press("enter")
        assert out.is_file()
        body = out.read_text()
        if fmt == "html":
            from chunktui.palette import label_colours

            colour = label_colours(app.dictionary.labels)["cheese"]
            assert f"background:{colour}" in body and "<style>" in body and "<script" not in body
        elif fmt == "json":
            data = json.loads(body)
            assert data["format"] == "chunktui.session" and data["traces"][0]["tokens"]
        elif fmt == "csv":
            assert body.startswith("source,kind,index,text") and "cheese" in body
        else:
            assert body.startswith("# chunktui session") and "cheese" in body


async def test_export_to_unwritable_path_keeps_running(make_test_app, tmp_path):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await pilot.press("f6")
        app.query_one("#export-path").value = str(tmp_path)  # a folder
        await pilot.press("enter")
        assert any("folder" in n for n in _notes(app))
        app.query_one("#export-path").value = "/proc/no-such-dir/x.html"  # refused as a system path (issue 21)
        await pilot.press("enter")
        assert any("system path" in n for n in _notes(app))
        (tmp_path / "blocker").write_text("x")
        app.query_one("#export-path").value = str(tmp_path / "blocker" / "x.html")
        await pilot.press("enter")
        assert any("Could not write" in n for n in _notes(app))
        assert app.session.traces  # nothing lost
        app.query_one("#export-path").value = str(tmp_path / "ok.html")
        await pilot.press("enter")
        assert (tmp_path / "ok.html").is_file()


async def test_unknown_model_is_a_notification(make_test_app):
    app = make_test_app(model_spec="no-such-model")
    async with app.run_test(size=(100, 34)) as pilot:
        await settle(app, pilot)
        assert app.model is None and app.is_running
        assert any("Unknown model" in n for n in _notes(app))
        app.action_generate()
        await pilot.pause()
        assert any("Load a model first" in n for n in _notes(app))


async def test_wrong_dictionary_is_explained(make_test_app, tmp_path):
    from chunktui.paths import DEFAULT_DICT_NAME, sample_path

    other = sample_path(DEFAULT_DICT_NAME)  # made for smollm2-135m, shipped in the repo
    assert other.is_file()
    app = make_test_app(dict_path=str(other))
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        assert any("not usable" in str(n.title) or "made for" in str(n.message) for n in app._notifications)
        options = app.query_one("#dict-list")
        disabled = [options.get_option_at_index(i) for i in range(options.option_count)]
        assert any(o.disabled and "made for" in str(o.prompt) for o in disabled)
        assert any(not o.disabled for o in disabled)


async def test_bad_sequence_file_is_a_notification(make_test_app, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "fine"}\nnot json\n')
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f5")
        app.query_one("#step-path").value = str(bad)
        app.action_open_sequences()
        await pilot.pause()
        assert any("bad.jsonl:2" in n for n in _notes(app))
        app.query_one("#step-path").value = str(tmp_path / "missing.txt")
        app.action_open_sequences()
        await pilot.pause()
        assert any("does not exist" in n for n in _notes(app))


async def test_out_of_memory_is_a_notification(make_test_app, monkeypatch):
    from chunktui.engine import streaming
    from chunktui.shared.errors import DeviceMemoryError, out_of_memory_message

    def boom(*args, **kwargs):
        raise DeviceMemoryError(out_of_memory_message("generating", "cuda:0"))
        yield  # a generator, like the real one

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        monkeypatch.setattr(streaming, "generate_stream", boom)
        app.action_generate()
        await settle(app, pilot)
        assert any("Out of memory" in n for n in _notes(app))
        assert app._busy is None and app.is_running


async def test_command_palette_has_main_actions(make_test_app):
    app = make_test_app(autoload=False)
    async with app.run_test(size=(100, 34)):
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Load model", "Generate", "Stop", "Regenerate with perturbation", "Open sequences",
                "Export session"} <= titles


async def test_small_terminal_and_no_color(make_test_app, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_test_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        assert app.no_color
        await generate(app, pilot)
        for key in ("f1", "f3", "f4", "f5", "f6", "f2"):
            await pilot.press(key)
        assert app.stream_trace.labels().count("cheese") >= 1


async def test_the_rnn_opens_as_a_model_streams_and_highlights_its_chunks(make_test_app, tmp_path):
    seqs = tmp_path / "symbols.txt"
    seqs.write_text("ABCDEEEGHIJKLMNEEABCD\n")
    app = make_test_app(model_spec="rnn:flat:0:80", dict_path=None, sequences_path=str(seqs))
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        assert app.model.kind == "rnn" and app.dictionary.name == "DSC chunks"
        await pilot.press("f1")
        card = str(app.query_one("#model-card").content)
        assert "ReflectionRNN" in card and "DSC" in card
        # the prompt field was given task symbols; generate streams the 12-unit state with chunk highlights
        assert app.query_one("#prompt").value == "ABCDEEGHI"
        await generate(app, pilot, prompt="ABCDEEGHI", tokens=10)
        trace = app.stream_trace
        assert trace.finished == "length" and len(trace) == 19 and trace.n_generated == 10
        assert trace.text.startswith("ABCDEEGHI")
        assert all(len(s.norms) == 1 for s in trace.steps)
        assert any(label is not None for label in trace.labels())
        # Step: a file of symbols scans under the full parse
        await pilot.press("f5")
        app.query_one("#step-list").focus()
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.step_trace is not None and app.step_trace.text == "ABCDEEEGHIJKLMNEEABCD"
        # perturbing is for language models: a clear message, and the app keeps going
        app.action_regenerate()
        await pilot.pause()
        assert any("chunktui rnn graft" in n for n in _notes(app))
        assert app._busy is None
        app.query_one("#prompt").value = "ABxyz"
        app.action_generate()
        await settle(app, pilot)
        assert any("not in this RNN's alphabet" in n for n in _notes(app))


async def test_prompt_option_streams_once_loaded_and_slash_returns_to_the_prompt(make_test_app):
    app = make_test_app(prompt="The dog ate the cheese", max_new_tokens=5)
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await settle(app, pilot)
        trace = app.stream_trace
        assert trace is not None and trace.title == "The dog ate the cheese"
        assert trace.finished == "length" and trace.n_generated == 5
        assert isinstance(app.focused, TraceView)
        await pilot.press("slash")
        assert app.focused is app.query_one("#prompt")
        await pilot.press(*"A cake", "enter")  # type the next prompt straight away: it replaces the old one
        await settle(app, pilot)
        assert app.stream_trace.title == "A cake" and len(app.session.traces) == 2


async def test_file_option_opens_step_on_that_file(make_test_app, tmp_path):
    seqs = tmp_path / "mine.txt"
    seqs.write_text("The cheese was good.\nA dog in the rain.\n")
    app = make_test_app(sequences_path=str(seqs), open_step=True)
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        assert app.query_one("TabbedContent").active == "step"
        assert app.query_one("#step-list").option_count == 2


async def test_token_view_lays_out_only_new_tokens_and_scrolls_to_the_cursor(make_test_app):
    from rich.cells import cell_len

    from chunktui.tui.widgets.token_view import TokenView, printable

    app = make_test_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot, prompt="The dog ate the cheese by the river. " * 6, tokens=200)
        view = app.query_one("#stream-trace", TraceView)
        text = view.query_one(TokenView)
        trace = app.stream_trace
        # the incremental layout equals a layout of the whole text at once
        lines = ["".join(piece for _, piece in line) for line in text._lines]
        assert "".join(lines) == printable(trace.text).replace("\n", "")
        # every line fits the width it is drawn in (the scrollbar's gutter is kept free from the start)
        assert text._width == text.scrollable_content_region.width
        assert max(cell_len(line) for line in lines) <= text._width
        assert printable("a\x19\tb") == "a\u2419    b"
        fresh = TokenView()
        fresh.trace, fresh._width = trace, text._width
        fresh._extend()
        assert fresh._lines == text._lines
        assert text.line_count() > text.size.height  # longer than the view: it scrolls
        await pilot.press("home")
        assert text.scroll_offset.y == 0
        await pilot.press("end")
        last_line = text._line_of[view.cursor]
        assert text.scroll_offset.y <= last_line < text.scroll_offset.y + text.size.height


async def test_a_killed_session_is_offered_back_and_restored(make_test_app):
    from chunktui.tui.screens import Choice

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        app.query_one("#prompt").value = "The dog"
        app.query_one("#stream-tokens").value = "400"
        app.action_generate()
        await pilot.pause(0.3)
        await pilot.press("escape")  # a cancelled stream is kept, marked as such
        await settle(app, pilot)
        first, cancelled = app.session.traces
        assert cancelled.finished == "cancelled"
        app.journal = None  # as if killed: the journal is never closed
    again = make_test_app()
    async with again.run_test(size=(100, 34)) as pilot:
        await ready(again, pilot)
        assert isinstance(again.screen, Choice) and "Restore that session" in again.screen.text
        await pilot.click("#restore")
        await settle(again, pilot)
        texts = [(t.text, t.finished) for t in again.session.traces]
        assert texts == [(first.text, "length"), (cancelled.text, "cancelled")]
        assert again.stream_trace.text == cancelled.text
        assert [s.hits for s in again.stream_trace.steps] == [s.hits for s in cancelled.steps]
        assert again.dirty


async def test_quit_with_unexported_work_asks_first(make_test_app, tmp_path):
    from chunktui.tui.screens import Choice

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, Choice) and "not been exported" in app.screen.text
        await pilot.click("#cancel")
        assert app.is_running and not isinstance(app.screen, Choice)
        app.query_one("#export-path").value = str(tmp_path / "kept.md")
        app.query_one("#export-format").value = "md"
        await pilot.press("ctrl+q")
        await pilot.click("#export")  # export and quit
        await pilot.pause()
    assert (tmp_path / "kept.md").read_text().startswith("# chunktui session")
    assert app.return_code == 0


async def test_export_asks_before_replacing_a_file(make_test_app, tmp_path):
    from chunktui.tui.screens import Choice

    target = tmp_path / "report.html"
    target.write_text("precious")
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await pilot.press("f6")
        app.query_one("#export-path").value = str(target)
        await pilot.press("enter")
        assert isinstance(app.screen, Choice) and "already exists" in app.screen.text
        await pilot.click("#cancel")
        assert target.read_text() == "precious"
        await pilot.press("enter")
        await pilot.click("#overwrite")
        await pilot.pause()
        assert "<html" in target.read_text()


async def test_memory_figures_reach_a_hidden_model_card_without_a_layout_pass(make_test_app):
    """A job's end sends new memory figures; the card takes them, but is laid out only when its pane shows."""
    from chunktui.shared import protocol as p
    from chunktui.tui.app import EngineEvent

    app = make_test_app(show_timing=True)
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await pilot.press("f2")
        await pilot.pause()
        box = app.query_one("#model-card")
        assert not box.is_on_screen
        layouts = []
        original = box.refresh
        box.refresh = lambda *regions, **kw: (layouts.append(kw.get("layout", False)), original(*regions, **kw))[1]
        row = {"device": "cpu", "weights": 2**30, "kv_cache": 0, "states": 0, "free": 3 * 2**30,
               "total": 8 * 2**30, "peak": None, "used": None}
        rows = [row, dict(row, device="cuda:0")]  # one line more than the card had
        app.post_message(EngineEvent(p.Memory(rows=rows)))
        await pilot.pause()
        assert layouts == [False]  # redrawn, no layout pass while hidden
        app.post_message(EngineEvent(p.Memory(rows=rows)))  # the same figures again: nothing to redraw
        await pilot.pause()
        assert layouts == [False]
        await pilot.press("f1")
        await pilot.pause()
        card = str(box.content)
        assert "mem cuda:0" in card and "3.00 GiB free of 8.00 GiB" in card
        lines = card.rstrip("\n").count("\n") + 1
        assert box.region.height >= lines  # laid out for the new line when the pane showed


async def test_model_pane_placement_fields_reach_the_engine_and_memory_is_shown(make_test_app):
    from chunktui.shared import protocol as p

    app = make_test_app(show_timing=True)
    sent = []
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        card = str(app.query_one("#model-card").content)
        assert "mem cpu" in card and "weights" in card and "KV cache" in card
        assert "cpu" in str(app.query_one("#status").content)
        original = app.engine.send
        app.engine.send = lambda request: (sent.append(request), original(request))[1]
        await pilot.press("f1")
        app.query_one("#model-device-map").value = "sequential"
        app.query_one("#model-max-memory").value = "cpu=1GiB"
        app.query_one("#model-offload").value = "/tmp/offload-here"
        app.action_load()
        await settle(app, pilot)
        load = next(r for r in sent if isinstance(r, p.Load))
        assert (load.device_map, load.max_memory, load.offload_folder) == ("sequential", "cpu=1GiB", "/tmp/offload-here")
        assert app.model is not None and "placement" in str(app.query_one("#model-card").content)
        app.query_one("#model-max-memory").value = "cpu=lots"
        app.action_load()
        await settle(app, pilot)
        assert app.model is None and app.is_running
        assert any("max-memory" in str(n.message) or "cpu=lots" in str(n.message) for n in app._notifications)


async def test_a_prompt_that_cannot_hold_its_answer_is_refused_with_a_message(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        app.query_one("#stream-tokens").value = "4000"  # the tiny model's context is 512 tokens
        app.action_generate()
        await settle(app, pilot)
        assert any("at most" in n and "new tokens" in n for n in _notes(app)), _notes(app)
        assert app._busy is None and app.is_running and app.session.traces == []
        app.query_one("#stream-tokens").value = "nan"
        app.action_generate()
        await pilot.pause()
        assert any("tokens" in n.lower() and "nan" in n for n in _notes(app)), _notes(app)
