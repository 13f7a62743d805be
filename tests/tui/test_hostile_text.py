"""The app on hostile text: markup, brackets and terminal escapes in file names, labels, sequences and model specs.

Everything is shown literally ('[/bad]' stays '[/bad]'; ESC shows as ␛) and the app keeps running.
"""

from __future__ import annotations

import json

import pytest

from tests.tui.conftest import generate, ready, settle

pytestmark = pytest.mark.anyio

ESC_LABEL = "\x1b]52;c;aGk=\x07dog"  # an OSC 52 clipboard write, then a name
LABELS = {"cheese": "[/bad]", "dog": ESC_LABEL, "cake": "[link=http:e]cake[/link]", "rain": "[b]rain"}


@pytest.fixture()
def hostile_dict(tiny_dict, tmp_path):
    from chunktui.engine.dictionary import ChunkDictionary, chunk_id

    dictionary, _ = tiny_dict
    chunks = []
    for c in dictionary.chunks:
        label = LABELS.get(c.label, c.label)
        chunks.append(type(c)(**{**c.__dict__, "label": label, "id": chunk_id(label, c.layer, c.step, c.kind)}))
    folder = tmp_path / "dicts"
    path = folder / "x[link=http:e][b].chunks.safetensors"
    notes = dict(dictionary.notes)
    if isinstance(notes.get("token_rule"), dict):  # the colour rule knows concepts by label: rename them there too
        rule = dict(notes["token_rule"])
        for key in ("required", "per_label"):
            if isinstance(rule.get(key), dict):
                rule[key] = {LABELS.get(k, k): v for k, v in rule[key].items()}
        notes["token_rule"] = rule
    ChunkDictionary(model=dictionary.model, chunks=chunks, notes=notes,
                    layer_means=dictionary.layer_means).save(path)
    return path


def _rendered(app) -> str:
    """The whole screen as the terminal would get it (no ESC may come from the app's text)."""
    return app.export_screenshot()


async def test_markup_and_escapes_are_shown_literally(make_test_app, hostile_dict, tmp_path):
    from chunktui.tui.status import StatusBar

    seqs = tmp_path / "[b]seq[-b].jsonl"
    seqs.write_text(json.dumps({"id": "[/bad] \x1b[2J", "text": "The dog [/bad] ate the cheese [link=x]."}) + "\n")
    app = make_test_app(dict_path=str(hostile_dict), dict_dirs=[hostile_dict.parent], sequences_path=str(seqs))
    async with app.run_test(size=(120, 34)) as pilot:
        await ready(app, pilot)
        status = str(app.query_one(StatusBar).content)
        assert "dict x[link=http:e][b] (" in status
        await generate(app, pilot, prompt="The dog ate the cheese [/bad] \x1b[2J")
        legend = str(app.query_one("#stream-trace .legend").content)
        assert "[/bad]" in legend or "␛" in legend
        await pilot.press("f3")
        table = app.query_one("#chunk-table")
        cells = {str(table.get_row_at(i)[0]) for i in range(table.row_count)}
        assert "[/bad]" in cells and "[link=http:e]cake[/link]" in cells
        assert "␛]52;c;aGk=␇dog" in cells and not any("\x1b" in c for c in cells)
        await pilot.press("f5")
        assert app.query_one("#step-list").option_count == 1
        assert "[/bad]" in str(app.query_one("#step-list").get_option_at_index(0).prompt)
        app.query_one("#step-list").focus()
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.step_trace is not None and "[/bad]" in app.step_trace.text
        await pilot.press("f1")
        app.query_one("#model-spec").value = "[/x] [link=x]y \x1b[2J"
        await pilot.pause()
        assert app.query_one("#model-spec").value == "[/x] [link=x]y ␛[2J"  # a pasted ESC is shown as a symbol
        app.action_load()
        await settle(app, pilot)
        assert app.is_running
        notes = " ".join(str(n.message) for n in app._notifications)
        assert "[/x]" in notes and "\x1b" not in notes
        screen = _rendered(app)
        assert "\x1b" not in screen and "\x07" not in screen


async def test_an_app_that_ends_without_a_chosen_quit_is_offered_back(make_test_app):
    """Any end but Ctrl+Q/Quit (an exception, a signal, the test runner closing it) leaves the session open."""
    from chunktui.shared.journal import journals, read_journal
    from chunktui.tui.screens import Choice

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        path = app.journal.path
        app.exit()  # not quit_cleanly: as if it crashed
    assert not read_journal(path).closed
    again = make_test_app()
    async with again.run_test(size=(100, 34)) as pilot:
        await ready(again, pilot)
        assert isinstance(again.screen, Choice) and "Restore that session" in again.screen.text
        await pilot.click("#discard")
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert read_journal(again.journal.path if again.journal else journals()[0]).closed


async def test_a_damaged_journal_restores_what_is_intact_and_says_what_was_skipped(make_test_app):
    from chunktui.shared.journal import journals

    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        path = app.journal.path
        n_tokens = len(app.stream_trace)
        app.journal = None  # killed
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = next(r for r in records if r["type"] == "steps")
    bad = json.loads(json.dumps(steps))
    bad["steps"][0]["lc"][0] = 10_000
    run = {"type": "run", "run": {"intervention": {"mode": "graft", "strength": "1", "labels": ["[/bad]"],
                                                   "layers": [1], "positions": "prompt"}, "concepts": {}, "pairs": []}}
    with open(path, "a") as fh:
        for line in (json.dumps(bad), json.dumps(run), '{"type": "run", "run": {"concepts": {}}}', "{not json"):
            fh.write(line + "\n")
    again = make_test_app(restore=True)
    async with again.run_test(size=(100, 34)) as pilot:
        await ready(again, pilot)
        await settle(again, pilot)
        from chunktui.tui.restore_picker import RestorePicker

        assert isinstance(again.screen, RestorePicker)  # --restore: a picker of recent sessions, newest first
        assert again.screen.found[0].path == path
        await pilot.press("enter")
        await settle(again, pilot)
        assert again.is_running
        assert len(again.stream_trace) == n_tokens
        notes = " ".join(str(n.message) for n in again._notifications)
        assert "4 damaged records were left out" in notes and "chunk column 10000" in notes
        await pilot.press("f4")
        await pilot.press("f6")
        assert again.is_running


async def test_export_never_targets_the_live_journal(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(100, 34)) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        journal = app.journal.path
        before = journal.read_bytes()
        await pilot.press("f6")
        app.query_one("#export-path").value = str(journal)
        await pilot.press("enter")
        await pilot.pause()
        assert app.is_running and not isinstance(app.screen, type(None))
        assert any("also an input" in str(n.message) for n in app._notifications)
        assert journal.read_bytes().startswith(before) and b"<html" not in journal.read_bytes()
