"""Snapshot tests: what a person sees in every pane, on the tiny model (deterministic: greedy, fixed seed).

Update after an intended change with `pytest tests/tui --snapshot-update`.
"""

from __future__ import annotations

from tests.tui.conftest import generate, settle, still_blinkless

SIZE = (100, 34)


def _run(*steps):
    async def run_before(pilot) -> None:
        app = pilot.app
        await settle(app, pilot)
        for step in steps:
            await step(app, pilot)
        await settle(app, pilot, rounds=2)
        still_blinkless(app)
        await pilot.pause()

    return run_before


async def _generate(app, pilot):
    await generate(app, pilot)


def _keys(*keys):
    async def press(app, pilot):
        await pilot.press(*keys)
        await pilot.pause()

    return press


async def _perturb(app, pilot):
    app.query_one("#perturb-layers").value = "1-3"
    app.query_one("#perturb-strength").value = "1.0"
    app.query_one("#perturb-tokens").value = "10"
    app.query_one("#perturb-prompt").value = "The dog ate the"
    app.action_regenerate()
    await settle(app, pilot)


async def _perturb_sweep(app, pilot):
    app.query_one("#perturb-sweep").value = "0.5,1"
    app.query_one("#perturb-samples").value = "3"
    app.query_one("#perturb-control").value = "subpopulation"
    await _perturb(app, pilot)


async def _step(app, pilot):
    app.query_one("#step-list").focus()
    await pilot.press("enter")
    await settle(app, pilot)
    await pilot.press("right", "right", "right")


def test_model_pane(snap_compare, make_test_app):
    assert snap_compare(make_test_app(), terminal_size=SIZE, run_before=_run(_keys("f1")))


def test_stream_pane(snap_compare, make_test_app):
    assert snap_compare(make_test_app(), terminal_size=SIZE, run_before=_run(_generate, _keys("home", "right", "right")))


def test_stream_pane_80x24(snap_compare, make_test_app):
    assert snap_compare(make_test_app(), terminal_size=(80, 24), run_before=_run(_generate))


def test_chunks_pane(snap_compare, make_test_app):
    assert snap_compare(make_test_app(), terminal_size=SIZE,
                        run_before=_run(_generate, _keys("f3", "slash", *"cheese", "enter", "enter")))


def test_perturb_pane(snap_compare, make_test_app):
    """The default samples (4), each arm's occurrence with its Wilson interval, fluency per arm."""
    assert snap_compare(make_test_app(), terminal_size=SIZE, run_before=_run(_keys("f4"), _perturb))


def test_perturb_pane_sweep_with_control(snap_compare, make_test_app):
    """Samples, Wilson intervals per arm, the random control and fluency, one row per strength."""
    assert snap_compare(make_test_app(), terminal_size=SIZE, run_before=_run(_keys("f4"), _perturb_sweep))


def test_step_pane(snap_compare, make_test_app, sequences_file, monkeypatch):
    monkeypatch.chdir(sequences_file.parent)  # a relative path, the same on every run
    app = make_test_app(sequences_path="sequences.jsonl")
    assert snap_compare(app, terminal_size=SIZE, run_before=_run(_keys("f5"), _step))


def test_export_pane(snap_compare, make_test_app, monkeypatch):
    monkeypatch.chdir("/")  # the default export path is absolute (the working folder): the same on every machine
    assert snap_compare(make_test_app(), terminal_size=SIZE, run_before=_run(_generate, _keys("f6")))


def _push(screen_factory):
    async def push(app, pilot):
        app.push_screen(screen_factory())
        await pilot.pause()

    return push


def test_restart_engine_dialog(snap_compare, make_test_app):
    from chunktui.tui.screens import RestartEngine

    text = ("The engine process stopped (killed by signal 9; out of memory, or killed). Your session stays on "
            "screen. Restart the engine and load the model again?")
    assert snap_compare(make_test_app(), terminal_size=SIZE, run_before=_run(_push(lambda: RestartEngine(text))))


def test_choice_dialog(snap_compare, make_test_app):
    from chunktui.tui.screens import Choice

    text = "This session holds 2 texts and 1 perturbation run that have not been exported. Quit anyway?"
    buttons = [("export", "Export and quit", "primary"), ("quit", "Quit", "error"), ("cancel", "Cancel", "default")]
    assert snap_compare(make_test_app(), terminal_size=SIZE, run_before=_run(_push(lambda: Choice(text, buttons))))
