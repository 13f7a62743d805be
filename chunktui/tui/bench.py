"""`chunktui bench app`: the real app, headless, engine process included, against the engine alone.

In one run, with one thread budget and one engine process:

1. engine alone: the engine streams N tokens (states recorded, every chunk
   matched, each step compacted as for the app) and sends nothing per token;
2. in the app: the same prompt and settings through the UI (Stream pane,
   token buffer, 20 Hz redraws), while a key (← / →) is pressed every
   `interval` seconds. A key's latency runs from posting it to the end of the
   first screen refresh after the view handled it.

Reported: both tok/s and their ratio, key latency median / p95 / max (all,
first 10% and last 10% of tokens), frame rate, and the UI process's peak memory
(the UI process never imports torch; the engine's memory is reported apart).
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import sys
import time

from chunktui.shared.specs import DEFAULT_MODEL

PROMPT = "Write a long, detailed story about a cook who travels the world collecting cheese recipes."


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


async def run_bench(model: str = DEFAULT_MODEL, dict_path: str | None = None, tokens: int = 1000, threads: int = 1,
                    device: str = "cpu", interval: float = 0.1, prompt: str = PROMPT, size=(120, 36),
                    say=lambda text: None) -> dict:
    from textual import events

    from chunktui.shared import protocol as p
    from chunktui.tui.app import make_app
    from chunktui.tui.widgets.trace_view import TraceView

    app = make_app(model_spec=model, dict_path=dict_path, device=device, threads=threads, show_timing=True,
                   stop_at_eos=False, journal=False)  # a benchmark is no session to offer back
    presses: list[tuple[float, int]] = []  # (sent at, tokens so far)
    latencies: list[tuple[float, int]] = []  # (seconds, tokens so far when pressed)
    waiting: dict = {}

    original = TraceView._moved

    def moved(view: TraceView) -> None:
        original(view)
        if waiting and view.id == "stream-trace":
            sent, count = waiting.pop("press")
            view.app.call_after_refresh(lambda: latencies.append((time.perf_counter() - sent, count)))

    TraceView._moved = moved
    try:
        async with app.run_test(size=size) as pilot:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 600:
                await pilot.pause(0.1)
                if app.model is not None and app.engine_idle():
                    break
            if app.model is None:
                raise RuntimeError("the model did not load in the engine process")
            say(f"loaded {app.model.card['name']} in the engine process (pid {app.engine_ready.pid}, "
                f"{app.engine_ready.threads} torch threads)")
            sampling = p.Sampling(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False)
            # 1. the engine alone
            app.bench_result = None
            app.send(p.BenchStream(prompt, sampling, chat=True))
            app._set_busy("bench")
            while app.bench_result is None and app.engine.alive:
                await pilot.pause(0.2)
            engine = app.bench_result
            if engine is None:
                raise RuntimeError("the engine process stopped during the engine-alone run")
            engine_tps = engine.tokens / engine.seconds
            say(f"engine alone: {engine.tokens} tokens in {engine.seconds:.1f} s ({engine_tps:.2f} tok/s)")
            await pilot.pause(0.5)
            # 2. in the app
            app.query_one("#prompt").value = prompt
            app.query_one("#stream-tokens").value = str(tokens)
            app.action_generate()
            view = app.query_one("#stream-trace", TraceView)
            direction = "left"
            started = time.perf_counter()
            unhandled = 0
            while app._busy == "generate":
                await asyncio.sleep(interval)
                if not app.stream_trace or not len(app.stream_trace):
                    continue  # nothing to move over yet
                if "press" in waiting:  # the previous press is still on its way: do not stack them
                    if time.perf_counter() - waiting["press"][0] < 2.0:
                        continue
                    waiting.pop("press")
                    unhandled += 1
                count = app.stream_trace.n_generated if app.stream_trace else 0
                waiting["press"] = (time.perf_counter(), count)
                presses.append((time.perf_counter(), count))
                app.post_message(events.Key(direction, None))  # as the terminal driver would
                direction = "right" if direction == "left" else "left"
            await pilot.pause(0.3)
            trace = app.stream_trace
            generated = trace.n_generated
            app_tps = app.tokens_per_second or 0.0
            frames = app.frame_times
            stream_seconds = frames[-1] - frames[0] if len(frames) > 1 else 0.0
            wall = time.perf_counter() - started
            say(f"in the app: {generated} tokens, {app_tps:.2f} tok/s, {len(latencies)} key presses measured")
    finally:
        TraceView._moved = original
    lat = [x for x, _ in latencies]
    early = [x for x, n in latencies if n <= 0.1 * tokens]
    late = [x for x, n in latencies if n >= 0.9 * tokens]
    ui_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    engine_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    return {
        "model": model, "device": device, "threads": threads, "tokens_requested": tokens,
        "engine_alone": {"tokens": engine.tokens, "seconds": round(engine.seconds, 2),
                         "tokens_per_second": round(engine_tps, 3)},
        "app": {"tokens": generated, "tokens_per_second": round(app_tps, 3), "wall_seconds": round(wall, 1),
                "finished": trace.finished},
        "ratio": round(app_tps / engine_tps, 3) if engine_tps else None,
        "key_latency_ms": {"presses": len(presses), "measured": len(lat), "unhandled_after_2s": unhandled, "median": _ms(statistics.median(lat))
                           if lat else None, "p95": _ms(_pct(lat, 0.95)), "max": _ms(max(lat) if lat else None),
                           "p95_first_10pct": _ms(_pct(early, 0.95)), "p95_last_10pct": _ms(_pct(late, 0.95))},
        "frame_rate": round((len(frames) - 1) / stream_seconds, 1) if stream_seconds else None,
        "ui_peak_rss_mb": round(ui_peak, 1),
        "engine_peak_rss_mb": round(engine_peak, 1) if engine_peak else None,
        "ui_imported_torch": "torch" in sys.modules,
    }


def bench_app(**kwargs) -> dict:
    return asyncio.run(run_bench(**kwargs))
