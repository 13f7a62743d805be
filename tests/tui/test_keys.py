"""Keyboard and state (issue 17, item 5): every key drives the real app with a pilot on the tiny random model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from textual.widgets import Input

from chunktui.tui.screens import Choice, RestartEngine
from chunktui.tui.widgets.trace_view import TraceView
from tests.tui.conftest import generate, ready, settle

pytestmark = pytest.mark.anyio


def _luminance(c) -> float:
    def channel(v: int) -> float:
        v /= 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(c.r) + 0.7152 * channel(c.g) + 0.0722 * channel(c.b)


def _contrast(a, b) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


async def test_slash_focuses_the_main_field_only_when_no_text_field_has_focus(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        assert isinstance(app.focused, TraceView)  # the text, not a field
        await pilot.press("slash")
        assert app.focused is app.query_one("#prompt")
        await pilot.press("a", "slash", "b")  # in a field '/' is a character
        assert app.query_one("#prompt").value == "a/b" and app.focused.id == "prompt"
        await pilot.press("f4")
        assert app.focused.id == "perturb-prompt"
        app.query_one("#perturb-chunks").focus()
        await pilot.press("end", "slash")
        assert app.query_one("#perturb-chunks").value == "cheese/" and app.focused.id == "perturb-chunks"
        app.query_one("#perturb-mode").focus()  # a choice, not a text field
        await pilot.press("slash")
        assert app.focused.id == "perturb-prompt"
        await pilot.press("f3")
        assert app.focused.id == "chunk-table"
        await pilot.press("slash")
        assert app.focused.id == "chunk-filter"
        await pilot.press("f6", "tab")  # from the Export button '/' returns to the file field
        assert app.focused.id == "export"
        await pilot.press("slash")
        assert app.focused.id == "export-path"


async def test_each_pane_starts_on_its_main_field(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        expected = {"f1": "model-spec", "f2": "prompt", "f3": "chunk-table", "f4": "perturb-prompt",
                    "f5": "step-list", "f6": "export-path"}
        for key, focus in expected.items():
            await pilot.press(key)
            assert app.focused.id == focus, key
        await pilot.press("f2")
        await generate(app, pilot)
        await pilot.press("f4", "f2")  # once there is a text, Stream starts on it (arrows move at once)
        assert app.focused.id == "stream-trace"
        await pilot.press("f4")
        await pilot.press(*"My prompt")  # typed after F4: into the prompt, never into the Chunks field
        assert app.query_one("#perturb-chunks").value == "cheese"
        assert app.query_one("#perturb-prompt").value.endswith("My prompt")


async def test_the_focused_field_stands_out(make_test_app):
    app = make_test_app(autoload=False)
    async with app.run_test(size=(100, 34)) as pilot:
        await pilot.press("f4")
        focused, other = app.query_one("#perturb-prompt", Input), app.query_one("#perturb-chunks", Input)
        assert app.focused is focused
        await pilot.pause()
        # WCAG contrast between the focused and an unfocused field's backgrounds (the old style: 1.04)
        assert _contrast(focused.background_colors[1], other.background_colors[1]) >= 1.5
        assert _contrast(focused.background_colors[1], focused.rich_style.color.triplet and
                         type(focused.background_colors[1]).from_rich_color(focused.rich_style.color)) >= 4.5
        app.query_one("#perturb-mode").focus()
        await pilot.pause()
        assert _contrast(focused.background_colors[1], other.background_colors[1]) < 1.1  # both unfocused now


async def test_escape_closes_help_and_dialogs(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await pilot.press("question_mark")
        assert app.screen.query("HelpPanel")
        await pilot.press("escape")
        assert not app.screen.query("HelpPanel")
        app.query_one("#prompt").focus()
        await pilot.press("question_mark")  # in a text field '?' is typed, Esc still closes nothing wrongly
        assert app.query_one("#prompt").value.endswith("?") and not app.screen.query("HelpPanel")
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, Choice)
        await pilot.press("escape")
        assert not isinstance(app.screen, Choice) and app.is_running
        answers = []
        app.push_screen(RestartEngine("The engine stopped."), answers.append)
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert answers == [False] and not isinstance(app.screen, RestartEngine)


@pytest.mark.parametrize("pane,focus", [("f2", "#prompt"), ("f3", "#chunk-filter"), ("f4", "#perturb-chunks"),
                                        ("f5", "#step-list"), ("f1", "#model-spec")])
async def test_ctrl_e_exports_from_any_pane(make_test_app, tmp_path, pane, focus):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        out = tmp_path / "session.md"
        app.query_one("#export-format").value = "md"
        app.query_one("#export-path").value = str(out)
        await pilot.press(pane)
        app.query_one(focus).focus()  # text fields bind Ctrl+E to "end of line" themselves
        await pilot.press("ctrl+e")
        await pilot.pause()
        assert out.read_text().startswith("# chunktui session")
        assert app.query_one("TabbedContent").active == pane.replace("f1", "model").replace("f2", "stream").replace(
            "f3", "chunks").replace("f4", "perturb").replace("f5", "step")  # the pane stays


async def test_step_n_and_p_follow_the_any_chunk_choice(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        await pilot.press("f3", "slash", *"cheese", "enter", "enter")  # choose a cheese chunk in Chunks
        await settle(app, pilot)
        assert app.chosen_chunk_id.startswith("cheese@")
        await pilot.press("f5")
        app.query_one("#step-list").focus()
        await pilot.press("enter")
        await settle(app, pilot)
        view = app.query_one("#step-trace", TraceView)
        trace = view.trace
        jump = app.query_one("#step-jump")
        assert jump.value == "cheese"  # the choice made in Chunks is shown where it applies
        labels = trace.labels()
        await pilot.press("home", "n")
        assert labels[view.cursor] == "cheese" or "cheese" in [trace.columns.labels[c] for c in
                                                              trace.steps[view.cursor].hits]
        jump.clear()  # "any chunk"
        await pilot.pause()
        await pilot.press("home", "n")
        first_any = next(t for t in range(1, len(trace)) if trace.chunk_at(t) >= 0)
        assert view.cursor == first_any and labels[first_any] != "cheese"  # dog comes first in the sequence
        await pilot.press("n", "p")
        assert view.cursor == first_any


async def test_nothing_is_unexported_right_after_an_export(make_test_app, tmp_path):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        app.query_one("#export-format").value = "json"
        app.query_one("#export-path").value = str(tmp_path / "a.json")
        await pilot.press("ctrl+e")
        await pilot.pause()
        assert app.unexported() == (0, 0)
        await generate(app, pilot, prompt="A cake")
        assert app.unexported() == (1, 0)
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, Choice)
        assert "1 text and 0 perturbation runs" in app.screen.text and "since the last export" in app.screen.text
        await pilot.press("escape")
        app.query_one("#export-path").value = str(tmp_path / "b.json")
        await pilot.press("ctrl+e")
        await pilot.pause()
        await pilot.press("ctrl+q")  # right after an export: nothing to ask
        await pilot.pause()
    assert app.return_code == 0 and len(json.loads((tmp_path / "b.json").read_text())["traces"]) == 2


async def test_report_reads_the_apps_session_journal(make_test_app, tmp_path):
    from chunktui.cli import main

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        journal = app.journal.path
        text = app.stream_trace.text
        out = tmp_path / "from-journal.md"
        r = CliRunner().invoke(main, ["report", str(journal), "--out", str(out)])  # while the app still runs
        assert r.exit_code == 0, r.output
        assert "1 texts" in r.output
        body = out.read_text()
        assert body.startswith("# chunktui session") and text.split()[0] in body
    html = tmp_path / "closed.html"
    r = CliRunner().invoke(main, ["report", str(journal), "--out", str(html)])  # and once it is closed
    assert r.exit_code == 0, r.output and "<html" in html.read_text()


async def test_restore_offers_a_picker_of_recent_sessions(make_test_app):
    from chunktui.tui.restore_picker import RestorePicker

    titles = []
    for prompt in ("The dog ate", "A cake in the rain"):
        app = make_test_app()
        async with app.run_test(size=(100, 34)) as pilot:
            await ready(app, pilot)
            if isinstance(app.screen, Choice):  # the earlier sitting was not exported: not now
                await pilot.press("escape")
            await generate(app, pilot, prompt=prompt, tokens=4)
            titles.append(prompt)
            app.dirty = False  # quit without the question; the journal is closed normally
    again = make_test_app(restore=True)
    async with again.run_test(size=(100, 34)) as pilot:
        await ready(again, pilot)
        await settle(again, pilot)
        picker = again.screen
        assert isinstance(picker, RestorePicker)
        options = picker.query_one("#picker-list")
        assert options.option_count >= 2
        assert [r.session.traces[0].title for r in picker.found[:2]] == titles[::-1]  # newest first
        assert "1 texts" in str(options.get_option_at_index(0).prompt)
        await pilot.press("down", "enter")  # the older one
        await settle(again, pilot)
        assert not isinstance(again.screen, RestorePicker)
        assert [t.title for t in again.session.traces] == [titles[0]]
    third = make_test_app(restore=True)
    async with third.run_test(size=(100, 34)) as pilot:
        await ready(third, pilot)
        await settle(third, pilot)
        assert isinstance(third.screen, RestorePicker)
        await pilot.press("escape")  # restore nothing
        await pilot.pause()
        assert not isinstance(third.screen, RestorePicker) and third.session.traces == []
