"""Key-press-to-screen latency and frame rate of the app while a generation streams.

Runs the real app headless (Textual's test driver renders every frame, it just
does not write it to a terminal), starts a generation, and while tokens stream
presses ← / → every `--interval` seconds. Latency of one press = from posting
the key to the end of the first screen refresh after the cursor moved
(`call_after_refresh` from inside the redraw). Frame rate = redraws caused by
new tokens per second of streaming (the drain timer runs at 20 Hz).

    PYTHONPATH=. .venv/bin/python benchmarks/tui_latency.py [--model smollm2-135m] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


async def measure(model: str, dict_path: str | None, tokens: int, interval: float, threads: int) -> dict:
    from textual import events

    from chunktui.tui.app import make_app
    from chunktui.tui.widgets.trace_view import TraceView

    app = make_app(model_spec=model, dict_path=dict_path, device="cpu", threads=threads)
    latencies: list[float] = []
    sent: list[float] = []

    original = TraceView.redraw

    def redraw(view: TraceView) -> None:
        original(view)
        if sent and view.id == "stream-trace" and getattr(view, "_bench_waiting", False):
            view._bench_waiting = False
            t0 = sent[-1]
            view.app.call_after_refresh(lambda: latencies.append(time.perf_counter() - t0))

    TraceView.redraw = redraw
    async with app.run_test(size=(100, 32)) as pilot:
        for _ in range(600):  # wait for the model and the dictionary
            await pilot.pause(0.1)
            if app.loaded is not None and app._busy is None and not app.workers._workers:
                break
        app.query_one("#prompt").value = "What is your favourite food, and how do you cook it?"
        app.query_one("#stream-tokens").value = str(tokens)
        app.action_generate()
        view = app.query_one("#stream-trace", TraceView)
        await pilot.pause(0.5)
        direction = "left"
        start = time.perf_counter()
        while app._busy == "generate":
            view._bench_waiting = True
            sent.append(time.perf_counter())
            app.post_message(events.Key(direction, None))  # as the driver would
            direction = "right" if direction == "left" else "left"
            await asyncio.sleep(interval)
        await app.workers.wait_for_complete()
        await pilot.pause(0.2)
        stream_seconds = app.frame_times[-1] - app.frame_times[0] if len(app.frame_times) > 1 else 0.0
        result = {
            "model": app.loaded.name, "tokens_generated": app.stream_trace.n_generated,
            "tokens_per_second": round(app.tokens_per_second or 0.0, 2),
            "frames": app.frames, "frame_rate": round((app.frames - 1) / stream_seconds, 1) if stream_seconds else None,
            "key_presses": len(sent), "latencies_measured": len(latencies),
            "latency_ms_median": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "latency_ms_p95": round(1000 * sorted(latencies)[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
            "latency_ms_max": round(1000 * max(latencies), 1) if latencies else None,
            "wall_seconds": round(time.perf_counter() - start, 1), "torch_threads": threads,
        }
    TraceView.redraw = original
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dict", dest="dict_path", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.15, help="seconds between key presses")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(measure(args.model, args.dict_path, args.tokens, args.interval, args.threads))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
