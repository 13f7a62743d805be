"""Fixtures for the app's tests: the real app on the tiny random model, with timing hidden."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def sequences_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq") / "sequences.jsonl"
    rows = [{"id": "cheese-river", "text": "The dog ate the cheese by the river. I like cake and the rain."},
            {"id": "bread", "text": "A cat found the bread in the kitchen."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def make_test_app(tiny_dict, sequences_file):
    """make_app on random:llama-tiny with the tiny dictionary; pass overrides as keywords."""
    from chunktui.tui.app import make_app

    _, dict_path = tiny_dict

    def factory(**overrides):
        kwargs = dict(model_spec="random:llama-tiny", dict_path=str(dict_path), device="cpu",
                      dict_dirs=[dict_path.parent], sequences_path=str(sequences_file), show_timing=False,
                      engine_mode="thread")  # the engine's server and protocol, in a thread (no torch import per app)
        kwargs.update(overrides)
        return make_app(**kwargs)

    return factory


async def settle(app, pilot, rounds: int = 3, timeout: float = 60.0) -> None:
    """Wait until every request sent to the engine is answered and its events are handled."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.02)
        if app.engine_idle():
            break
    for _ in range(rounds):
        await pilot.pause()


async def ready(app, pilot) -> None:
    await settle(app, pilot)
    assert app.model is not None, "the model did not load"


async def generate(app, pilot, prompt: str = "The dog ate the cheese by the river", tokens: int = 12) -> None:
    app.query_one("#prompt").value = prompt
    app.query_one("#stream-tokens").value = str(tokens)
    app.action_generate()
    await settle(app, pilot)
    await pilot.pause(0.1)  # one more frame of the drain timer
    await settle(app, pilot)  # the token detail asked for when the stream ended


def still_blinkless(app) -> None:
    """Freeze what changes with time: input cursors and toasts."""
    from textual.widgets import Input

    for field in app.query(Input):
        field.cursor_blink = False
    app.clear_notifications()


@pytest.fixture()
def anyio_backend():
    return "asyncio"
