"""Make screenshots/*.svg: every pane of the app on the built-in model and the sample dictionary.

    PYTHONPATH=. .venv/bin/python scripts/screenshots.py [--model smollm2-135m] [--out screenshots]

Greedy decoding and fixed seeds, so the pictures only change when the model, the
dictionary or the app does. Also writes screenshots/session.html (the Export pane's HTML report).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

SIZE = (110, 34)
PROMPT = "What should I cook for dinner tonight? I have cheese, bread and some tomatoes."


async def shoot(model: str, out: Path, tokens: int) -> None:
    from chunktui.tui.app import make_app
    from chunktui.tui.widgets.trace_view import TraceView

    out.mkdir(parents=True, exist_ok=True)
    # journal=False: the pictures never depend on the sessions of whoever runs this (no restore offer)
    app = make_app(model_spec=model, device="cpu", threads=1, show_timing=False, journal=False)

    async def settle(pilot, seconds: float = 600) -> None:
        for _ in range(int(seconds * 10)):
            await pilot.pause(0.1)
            if app.model is not None and app.engine_idle():
                break
        await pilot.pause(0.3)

    async def save(pilot, name: str) -> None:
        from textual.widgets import Input

        for field in app.query(Input):
            field.cursor_blink = False
        app.clear_notifications()
        await pilot.pause(0.2)
        path = app.save_screenshot(filename=f"{name}.svg", path=str(out))
        print("wrote", path)

    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        if app.model is None:
            raise SystemExit("the model did not load")
        if app.dictionary is None:
            raise SystemExit("no usable dictionary (is sample_data/smollm2-135m.chunks.safetensors built?)")
        await pilot.press("f1")
        await save(pilot, "model")

        await pilot.press("f2")
        app.query_one("#prompt").value = PROMPT
        app.query_one("#stream-tokens").value = str(tokens)
        app.action_generate()
        await settle(pilot)
        view = app.query_one("#stream-trace", TraceView)
        target = next((t for t, label in enumerate(view.trace.labels()) if label == "cheese"), None)
        if target is not None:
            view.cursor, view.follow = target, False
            view._moved()
            await settle(pilot)
        await save(pilot, "stream")

        await pilot.press("f3", "slash", *"cheese", "enter")
        await pilot.press("down", "down", "enter")
        await settle(pilot)
        await save(pilot, "chunks")

        await pilot.press("f4")
        app.query_one("#perturb-prompt").value = "What is a good snack to eat with a cup of tea?"
        app.query_one("#perturb-tokens").value = "40"
        app.query_one("#perturb-chunks").value = "cheese"
        app.action_regenerate()
        await settle(pilot)
        await save(pilot, "perturb")

        await pilot.press("f5")
        app.query_one("#step-list").focus()
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("right", "right", "right", "right", "right", "right", "right", "right", "right")
        await settle(pilot)
        await save(pilot, "step")

        await pilot.press("f6")
        app.query_one("#export-path").value = str(out / "session.html")
        app.action_export()
        await pilot.pause(0.2)
        app.query_one("#export-path").value = "chunktui-session.html"
        await save(pilot, "export")


async def shoot_rnn(out: Path) -> None:
    """screenshots/rnn-stream.svg and rnn-step.svg: the reflection RNN opened as a model."""
    from chunktui.tui.app import make_app
    from chunktui.tui.widgets.trace_view import TraceView

    app = make_app(model_spec="rnn:flat", device="cpu", threads=1, show_timing=False, journal=False)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(600):
            await pilot.pause(0.1)
            if app.model is not None and app.engine_idle():
                break
        await pilot.press("f2")
        app.query_one("#prompt").value = "ABCDEEEGHIJKLMN"
        app.query_one("#stream-tokens").value = "45"
        app.action_generate()
        for _ in range(300):
            await pilot.pause(0.1)
            if app.engine_idle():
                break
        view = app.query_one("#stream-trace", TraceView)
        view.cursor, view.follow = 3, False
        view._moved()
        await pilot.pause(0.5)
        for field in app.query("Input"):
            field.cursor_blink = False
        app.clear_notifications()
        await pilot.pause(0.2)
        print("wrote", app.save_screenshot(filename="rnn-stream.svg", path=str(out)))
        await pilot.press("f5")
        app.query_one("#step-list").focus()
        await pilot.press("enter")
        for _ in range(100):
            await pilot.pause(0.1)
            if app.engine_idle() and app.step_trace is not None:
                break
        await pilot.press(*["right"] * 9)
        app.clear_notifications()
        await pilot.pause(0.2)
        print("wrote", app.save_screenshot(filename="rnn-step.svg", path=str(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="screenshots", type=Path)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--rnn-only", action="store_true", help="only the RNN screenshots")
    args = parser.parse_args()
    if not args.rnn_only:
        asyncio.run(shoot(args.model, args.out, args.tokens))
    asyncio.run(shoot_rnn(args.out))


if __name__ == "__main__":
    main()
