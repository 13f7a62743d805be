"""`chunktui bench app`: the real app, headless, engine process included, against the engine alone.

In one run, with one thread budget and one engine process:

1. engine alone: the engine streams N tokens (states recorded, every chunk
   matched, each step compacted as for the app) and sends nothing per token;
2. in the app: the same prompt and settings through the UI (Stream pane,
   token buffer, 20 Hz redraws), while a key (← / →) is pressed every
   `interval` seconds. A key's latency runs from posting it to the end of the
   first screen refresh after the view handled it;
3. (with `bracket`, the default) the engine alone again: its baseline is the
   mean tok/s of 1 and 3, so drift in the machine's speed during the run does
   not read as the app's cost.

Reported: both tok/s and their ratio, key latency median / p95 / max (all,
first 10% and last 10% of tokens; and its trend along the stream, with
bootstrap intervals: `latency_trend`), frame rate, and the UI process's peak memory
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


def latency_trend(latencies: list[tuple[float, int]], tokens: int, resamples: int = 2000, seed: int = 0) -> dict:
    """Whether key latency grows along the stream, with its sampling noise stated.

    latencies: (seconds, tokens generated when pressed). Returns, in ms, the least-squares slope of latency
    against tokens (per 1,000 tokens) and p95 of the last 10% of tokens minus p95 of the first 10%, each with a
    95% percentile-bootstrap interval (presses resampled with replacement, `resamples` times, seeded). A p95 of
    ~80 presses moves by several ms between identical runs, so a difference of two p95s alone says little; the
    slope uses every press. The bootstrap treats presses as independent; latencies next to each other are
    correlated (a gc pause, a burst of tokens), so the intervals are, if anything, too narrow, and presses
    the app did not answer within 2 s are not in them."""
    import random

    def slope(pairs) -> float | None:
        if len(pairs) < 3:
            return None
        try:
            return statistics.linear_regression([c for _, c in pairs], [x for x, _ in pairs]).slope * 1000
        except statistics.StatisticsError:  # every press at the same token count
            return None

    def gap(pairs) -> float | None:
        early = [x for x, c in pairs if c <= 0.1 * tokens]
        late = [x for x, c in pairs if c >= 0.9 * tokens]
        return _pct(late, 0.95) - _pct(early, 0.95) if early and late else None

    def interval(stat) -> list | None:
        rng = random.Random(seed)
        values = sorted(v for v in (stat([latencies[rng.randrange(len(latencies))] for _ in latencies])
                                    for _ in range(resamples)) if v is not None)
        if not values or len(values) < resamples // 2:
            return None
        return [_ms(values[int(0.025 * (len(values) - 1))]), _ms(values[int(0.975 * (len(values) - 1))])]

    if not latencies:
        return {"slope_ms_per_1000_tokens": None, "slope_ci95": None, "p95_last_minus_first": None,
                "p95_last_minus_first_ci95": None, "resamples": resamples}
    return {"slope_ms_per_1000_tokens": _ms(slope(latencies)), "slope_ci95": interval(slope),
            "p95_last_minus_first": _ms(gap(latencies)), "p95_last_minus_first_ci95": interval(gap),
            "resamples": resamples}


def p95_by_tenth(latencies: list[tuple[float, int]], tokens: int) -> list[float | None]:
    """p95 (ms) of the presses in each tenth of the stream, by the tokens generated when pressed, so the
    shape along the stream shows, not just its two ends. The first tenth is c <= 10% and the last c >= 90%
    of `tokens` (as `p95_first_10pct` and `p95_last_10pct`); tenth i between them is i/10 < c <= (i+1)/10
    (the ninth stops short of 90%). None for a tenth without presses."""
    bounds = [0.1 * i * tokens for i in range(11)]

    def inside(i: int, c: int) -> bool:
        if i == 0:
            return c <= bounds[1]
        if i == 9:
            return c >= bounds[9]
        return bounds[i] < c < bounds[9] if i == 8 else bounds[i] < c <= bounds[i + 1]

    return [_ms(_pct([x for x, c in latencies if inside(i, c)], 0.95)) for i in range(10)]


async def run_bench(model: str = DEFAULT_MODEL, dict_path: str | None = None, tokens: int = 1000, threads: int = 1,
                    device: str = "cpu", interval: float = 0.1, prompt: str = PROMPT, size=(120, 36),
                    say=lambda text: None, bracket: bool = True) -> dict:
    from textual import events

    from chunktui.shared import protocol as p
    from chunktui.shared.errors import ChunkError
    from chunktui.tui.app import make_app
    from chunktui.tui.widgets.trace_view import TraceView

    app = make_app(model_spec=model, dict_path=dict_path, device=device, threads=threads, show_timing=True,
                   stop_at_eos=False, journal=False)  # a benchmark is no session to offer back
    presses: list[tuple[float, int]] = []  # (sent at, tokens so far)
    latencies: list[tuple[float, int]] = []  # (seconds, tokens so far when pressed)
    waiting: dict = {}

    original = TraceView._moved
    failures: list[str] = []  # what the app was told went wrong (the engine-alone run's Failed, if any)
    fail = app.fail

    def failed(text: str, title: str = "Error", **kwargs) -> None:
        failures.append(f"{title}: {text}")
        fail(text, title=title, **kwargs)

    app.fail = failed

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
                if app.model is None and failures and app._busy != "load":  # the load failed: it said why
                    break
            if app.model is None:
                why = f": {failures[-1]}" if failures else ""
                raise ChunkError(f"The model did not load in the engine process{why}")
            say(f"loaded {app.model.card['name']} in the engine process (pid {app.engine_ready.pid}, "
                f"{app.engine_ready.threads} torch threads)")
            sampling = p.Sampling(max_new_tokens=tokens, temperature=0.0, stop_at_eos=False)

            async def engine_alone(when: str):
                app.bench_result = None
                failures.clear()
                app.send(p.BenchStream(prompt, sampling, chat=True))
                app._set_busy("bench")
                # a Failed ends it: the bench's own ends the busy state, and one without a task (no model) does not
                while app.bench_result is None and app.engine.alive and app._busy == "bench" and not failures:
                    await pilot.pause(0.2)
                run = app.bench_result
                if run is None:  # the engine said why (a Failed event ends the busy state), or it stopped
                    why = failures[-1] if failures else "the engine process stopped"
                    raise ChunkError(f"The engine-alone run ({when}) failed: {why}")
                say(f"engine alone ({when}): {run.tokens} tokens in {run.seconds:.1f} s "
                    f"({run.tokens / run.seconds:.2f} tok/s)")
                await pilot.pause(0.5)
                return run

            # 1. the engine alone (again after the app arm, when `bracket`: the baseline is the mean of the two,
            # so a machine that drifts faster or slower during the run shows as spread, not as a ratio)
            alone = [await engine_alone("before")]
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
            # the last press is measured before the harness waits on the screen: Pilot.pause posts a callback to
            # every widget (~200), and a key bubbling up through them would queue behind those (+15 ms)
            deadline = time.perf_counter() + 2.0
            while len(latencies) + unhandled < len(presses) and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            await pilot.pause(0.3)
            trace = app.stream_trace
            generated = trace.n_generated
            app_tps = app.tokens_per_second or 0.0
            frames = app.frame_times
            stream_seconds = frames[-1] - frames[0] if len(frames) > 1 else 0.0
            wall = time.perf_counter() - started
            say(f"in the app: {generated} tokens, {app_tps:.2f} tok/s, {len(latencies)} key presses measured")
            if bracket:
                alone.append(await engine_alone("after"))
    finally:
        TraceView._moved = original
    rates = [run.tokens / run.seconds for run in alone]
    engine_tps = sum(rates) / len(rates)
    lat = [x for x, _ in latencies]
    early = [x for x, n in latencies if n <= 0.1 * tokens]
    late = [x for x, n in latencies if n >= 0.9 * tokens]
    ui_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    engine_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    return {
        "model": model, "device": device, "threads": threads, "tokens_requested": tokens,
        "engine_alone": {"tokens": alone[0].tokens, "seconds": round(sum(r.seconds for r in alone) / len(alone), 2),
                         "tokens_per_second": round(engine_tps, 3),
                         "runs_tokens_per_second": [round(r, 3) for r in rates]},
        "app": {"tokens": generated, "tokens_per_second": round(app_tps, 3), "wall_seconds": round(wall, 1),
                "finished": trace.finished},
        "ratio": round(app_tps / engine_tps, 3) if engine_tps else None,
        "key_latency_ms": {"presses": len(presses), "measured": len(lat), "unhandled_after_2s": unhandled, "median": _ms(statistics.median(lat))
                           if lat else None, "p95": _ms(_pct(lat, 0.95)), "max": _ms(max(lat) if lat else None),
                           "p95_first_10pct": _ms(_pct(early, 0.95)), "p95_last_10pct": _ms(_pct(late, 0.95)),
                           "p95_by_tenth": p95_by_tenth(latencies, tokens), "trend": latency_trend(latencies, tokens),
                           # every press, in order: [tokens generated when pressed, ms], to recompute any figure
                           "samples": [[count, round(1000 * x, 2)] for x, count in latencies]},
        "frame_rate": round((len(frames) - 1) / stream_seconds, 1) if stream_seconds else None,
        "ui_peak_rss_mb": round(ui_peak, 1),
        "engine_peak_rss_mb": round(engine_peak, 1) if engine_peak else None,
        "ui_imported_torch": "torch" in sys.modules,
    }


def bench_app(**kwargs) -> dict:
    return asyncio.run(run_bench(**kwargs))


# --------------------------------------------------------------------------- `chunktui bench start`

START_PARTS = ("ui_imports", "engine_imports", "model_load", "dictionary_load", "first_token")


def _start_child(model: str, dict_path: str | None, threads: int, prompt: str, tokens: int, launched: float,
                 prestart_engine: bool) -> dict:
    """In a fresh interpreter: `chunktui tui --prompt` headless, with the arrival time of each milestone.

    `launched` is the parent's clock (time.time()) when it spawned this interpreter. Times are seconds
    from then: `ui_ready` the screen is up and answers keys, `engine_ready` the engine process has
    imported torch, `loaded` the model is loaded, `dictionary` the dictionary is in use, `first_token`
    the first streamed token reached the app.
    """
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks.setdefault(name, time.time() - launched)

    mark("interpreter")
    if prestart_engine:  # already done by _START_CHILD before this module was imported (a no-op then)
        from chunktui.tui.early import engine_log_path, prestart

        prestart(threads, engine_log_path())  # as `chunktui tui` does (chunktui.launch)
    from chunktui.shared import protocol as p
    from chunktui.tui.app import make_app
    from chunktui.tui.options import AppOptions

    mark("ui_imported")
    app = make_app(AppOptions.for_users(model_spec=model, dict_path=dict_path, threads=threads, prompt=prompt,
                                        max_new_tokens=tokens, stop_at_eos=False, journal=False))
    on_event, push = app.engine.on_event, app.buffer.push
    names = {p.Ready: "engine_ready", p.Loaded: "loaded", p.DictionaryInUse: "dictionary"}

    def seen(event) -> None:
        if type(event) in names:
            mark(names[type(event)])
        on_event(event)

    def pushed(trace_id, steps) -> None:
        if any(s.generated for s in steps):
            mark("first_token")
        push(trace_id, steps)

    app.engine.on_event, app.buffer.push = seen, pushed

    async def drive() -> None:
        async with app.run_test(size=(120, 36)) as pilot:
            mark("ui_ready")
            started = time.time()
            while "first_token" not in marks and time.time() - started < 300 and app.engine.alive:
                await pilot.pause(0.02)
            app.action_cancel()
            await pilot.pause(0.2)

    asyncio.run(drive())
    return {k: round(v, 3) for k, v in marks.items()}


# the child starts the engine first, as the `chunktui` console script does (chunktui.launch), then imports the rest
_START_CHILD = ("import json, sys, time; launched_args = json.loads(sys.argv[1]); "
                "from chunktui.tui.early import engine_log_path, prestart; "
                "launched_args['prestart_engine'] and prestart(launched_args['threads'], engine_log_path()); "
                "from chunktui.tui.bench import _start_child_main; _start_child_main()")


def _start_child_main() -> None:
    import json

    args = json.loads(sys.argv[1])
    print("START-RESULT " + json.dumps(_start_child(**args)), flush=True)


def bench_start(model: str = DEFAULT_MODEL, dict_path: str | None = None, threads: int = 1, runs: int = 3,
                prompt: str = PROMPT, tokens: int = 8, prestart_engine: bool = True, say=lambda text: None) -> dict:
    """Launch -> first streamed token, `runs` times, each in a fresh interpreter (the model cached on disk).

    Split into: UI imports (launch -> Textual and the app imported), engine imports (launch -> the engine
    process has imported torch; it starts at launch, alongside the UI), model load, dictionary load, and
    first token (dictionary in use -> the first generated token reaches the app).
    """
    import json
    import os
    import subprocess

    from pathlib import Path

    from chunktui.paths import DEFAULT_DICT_NAME, sample_path

    dict_path = dict_path or str(sample_path(DEFAULT_DICT_NAME))
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    records = []
    for i in range(runs):
        args = dict(model=model, dict_path=dict_path, threads=threads, prompt=prompt, tokens=tokens,
                    launched=time.time(), prestart_engine=prestart_engine)
        done = subprocess.run([sys.executable, "-c", _START_CHILD, json.dumps(args)], capture_output=True, text=True,
                              env=env, timeout=600)
        line = next((x for x in done.stdout.splitlines() if x.startswith("START-RESULT ")), None)
        if line is None:
            raise RuntimeError(f"the start-up run failed (exit {done.returncode}): {done.stderr[-2000:]}")
        marks = json.loads(line[len("START-RESULT "):])
        if "first_token" not in marks:
            raise RuntimeError(f"no token streamed within the time limit: {marks}")
        record = {"total": marks["first_token"], "ui_ready": marks.get("ui_ready"),
                  "ui_imports": marks.get("ui_imported"), "engine_imports": marks.get("engine_ready"),
                  "model_load": round(marks["loaded"] - marks["engine_ready"], 3),
                  "dictionary_load": round(marks["dictionary"] - marks["loaded"], 3),
                  "first_token": round(marks["first_token"] - marks["dictionary"], 3), "marks": marks}
        records.append(record)
        say(f"run {i + 1}/{runs}: first token {record['total']:.2f} s after launch (screen up at "
            f"{record['ui_ready']:.2f} s; torch imported {record['engine_imports']:.2f} s, model "
            f"{record['model_load']:.2f} s, dictionary {record['dictionary_load']:.2f} s, first token "
            f"{record['first_token']:.2f} s)")
    keys = ("total", "ui_ready", "ui_imports", "engine_imports", "model_load", "dictionary_load", "first_token")
    summary = {k: {"median": round(statistics.median(r[k] for r in records), 3),
                   "min": round(min(r[k] for r in records), 3), "max": round(max(r[k] for r in records), 3)}
               for k in keys}
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"model": model, "threads": threads, "runs": runs, "prestart": prestart_engine,
            "cores": os.cpu_count(), "load_average_1min": load, "seconds": summary, "records": records}
