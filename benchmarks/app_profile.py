"""Where a frame's time goes in the app while a generation streams (the UI process only).

Runs `chunktui.tui.bench.run_bench` (the real app, headless, engine process
included: the engine-alone arm first, then the app arm with a key every 0.1 s)
with timers around the parts of a frame, and optionally cProfile over the
app arm:

- `drain`: the app's frame timer (tokens into the trace, widgets told what changed);
- `screen update`: Textual's screen update (layout / scroll reflow if asked, then the compositor's render);
  `reflow` and `render_update` are parts of it; `render_lines` counts widget renders, by class;
- `key`: the trace view's handling of ← / → (redraw of what the cursor changed);
- `gc`: garbage collector pauses, by generation.

Each figure is given per frame (mean, p95, max), for the first and the last 10% of tokens, so work that grows
with the length of the text shows. The timers cost a few microseconds per call.

    python benchmarks/app_profile.py [--tokens 1000] [--cprofile OUT.prof] [--json OUT.json]
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import pstats
import sys
import time
from collections import defaultdict

import click


class Timers:
    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, float, int]]] = defaultdict(list)  # name -> (at, seconds, tokens)
        self.renders: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # class -> [calls, ns]
        self.tokens = lambda: 0
        self.posted: list[float] = []  # when each key was posted
        self.gc_detail = False
        self.cpu: dict[str, list[float]] = defaultdict(list)  # name -> CPU seconds of this thread (no waiting)
        self.gc_log: list[dict] = []
        self.layouts: dict[str, int] = defaultdict(int)  # class -> refresh(layout=True) calls
        self.scrolls: dict[str, int] = defaultdict(int)  # class -> scroll position changes
        self._depth = 0
        self.render_log: list[tuple[int, str, int]] = []  # (tokens, widget class, ns) per render_lines call
        self.crops: list[tuple[int, int]] = []  # (tokens, cells) of each screen update's crop (what it renders)

    def wrap_crops(self, compositor) -> None:
        original = compositor._render_chops
        timers = self

        def _render_chops(comp, crop, is_rendered_line):
            timers.crops.append((timers.tokens(), crop.area))
            return original(comp, crop, is_rendered_line)

        compositor._render_chops = _render_chops

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                timers.samples[label].append((t, time.perf_counter() - t, timers.tokens()))
                timers.cpu[label].append(time.thread_time() - c)

        timed.__wrapped__ = original
        setattr(owner, name, timed)

    def wrap_renders(self, owner) -> None:
        original = owner.render_lines
        timers = self

        def render_lines(widget, crop):
            timers._depth += 1
            t = time.perf_counter_ns()
            try:
                return original(widget, crop)
            finally:
                timers._depth -= 1
                if not timers._depth:  # a subclass calling super() is counted once
                    entry = timers.renders[type(widget).__name__]
                    entry[0] += 1
                    ns = time.perf_counter_ns() - t
                    entry[1] += ns
                    timers.render_log.append((timers.tokens(), type(widget).__name__, ns))

        setattr(owner, "render_lines", render_lines)

    def wrap_layouts(self, owner) -> None:
        """Count who asks for a layout pass (refresh(layout=True)) or a scroll reflow, by widget class."""
        timers = self
        refresh, scroll = owner.refresh, owner._refresh_scroll

        def counted_refresh(widget, *regions, **kwargs):
            if kwargs.get("layout") or kwargs.get("recompose"):
                timers.layouts[type(widget).__name__] += 1
            return refresh(widget, *regions, **kwargs)

        def counted_scroll(widget):
            timers.scrolls[type(widget).__name__] += 1
            return scroll(widget)

        owner.refresh, owner._refresh_scroll = counted_refresh, counted_scroll

    def gc_callback(self, phase, info) -> None:
        if phase == "start":
            if self.gc_detail:  # the objects the collection will look at (counted before its clock starts)
                self._gc_sizes = [len(gc.get_objects(g)) for g in range(info["generation"] + 1)]
            if self.gc_detail and (info["generation"] or len(self.samples["gc gen0"]) == 4):
                gc.set_debug(gc.DEBUG_SAVEALL)  # once (and at each older collection): what the garbage is made of
                self._census = _census(gc.get_objects(info["generation"]))
            self._gc_start, self._gc_cpu = time.perf_counter(), time.thread_time()
        else:
            seconds = time.perf_counter() - self._gc_start
            name = f"gc gen{info['generation']}"
            self.samples[name].append((self._gc_start, seconds, self.tokens()))
            self.cpu[name].append(time.thread_time() - self._gc_cpu)
            if self.gc_detail:
                record = {"generation": info["generation"], "ms": round(1000 * seconds, 2),
                          "cpu_ms": round(1000 * self.cpu[name][-1], 2), "objects": self._gc_sizes,
                          "collected": info["collected"], "tokens": self.tokens()}
                if gc.get_debug() & gc.DEBUG_SAVEALL:
                    gc.set_debug(0)
                    record["garbage_types"] = _census(gc.garbage)
                    record["collected_from_types"] = self._census
                    gc.garbage.clear()
                self.gc_log.append(record)


def _census(objects, top: int = 12) -> dict:
    counts: dict[str, int] = defaultdict(int)
    for o in objects:
        counts[type(o).__qualname__] += 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "mean_ms": round(1000 * sum(values) / len(values), 2),
            "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 2), "max_ms": round(1000 * ordered[-1], 2)}


def _breakdown(timers: Timers) -> dict:
    """Each key press split into: waiting for the app to take the key (other work ahead of it), the trace view's
    handling, waiting for the screen update, the update itself; with the gc and drain time that fell inside.
    Given for all presses and for the slowest 10% (what makes the p95)."""
    import bisect

    updates = sorted((t, t + s) for t, s, _ in timers.samples["screen update"])
    starts = [u[0] for u in updates]
    handled = sorted((t, t + s) for t, s, _ in timers.samples["key"])
    handled_starts = [h[0] for h in handled]
    other = {name: sorted((t, t + s) for t, s, _ in timers.samples[name])
             for name in timers.samples if name.startswith("gc") or name == "drain"}
    rows = []
    for posted in timers.posted:
        i = bisect.bisect_left(handled_starts, posted)
        if i >= len(handled):
            continue
        h0, h1 = handled[i]
        j = bisect.bisect_left(starts, h1)
        if j >= len(updates):
            continue
        u0, u1 = updates[j]
        row = {"total": u1 - posted, "queue": h0 - posted, "handle": h1 - h0, "wait_update": u0 - h1,
               "update": u1 - u0}
        for name, spans in other.items():
            row[f"in {name}"] = sum(max(0.0, min(b, u1) - max(a, posted)) for a, b in spans if a < u1 and b > posted)
        rows.append(row)
    if not rows:
        return {}
    rows.sort(key=lambda r: r["total"])
    slow = rows[int(0.9 * len(rows)):]
    keys = list(rows[0])
    mean = lambda rs, k: round(1000 * sum(r.get(k, 0.0) for r in rs) / len(rs), 2)  # noqa: E731
    return {"presses": len(rows), "all_mean_ms": {k: mean(rows, k) for k in keys},
            "slowest_10pct_mean_ms": {k: mean(slow, k) for k in keys}}


class SplitProfile:
    """cProfile over the frames of the first 10% of tokens and, apart, over those of the last 10%: per-frame
    own time of each function in both, so work that grows with the length of the text stands out."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.first, self.last = cProfile.Profile(), cProfile.Profile()
        self.frames = {"first": 0, "last": 0}
        self.prompt: int | None = None
        self.on: cProfile.Profile | None = None

    def _switch(self, profiler) -> None:
        if self.on is not profiler:
            if self.on is not None:
                self.on.disable()
            self.on = profiler
            if profiler is not None:
                profiler.enable()

    def start(self) -> None:
        """The app arm starts (the engine-alone arm's frames are not counted)."""
        self.prompt = None
        self.frames = {"first": 0, "last": 0}
        self._switch(self.first)

    def after_drain(self, n: int) -> None:
        """Called after each frame's drain with the trace's length: which part of the run the next frames are."""
        if self.prompt is None:
            self.prompt = n
        done = n - self.prompt
        if done <= 0.1 * self.tokens:
            self.frames["first"] += 1
            self._switch(self.first)
        elif done >= 0.9 * self.tokens:
            self.frames["last"] += 1
            self._switch(self.last)
        else:
            self._switch(None)

    def stop(self) -> None:
        self._switch(None)

    def table(self, top: int = 30) -> list[dict]:
        """Functions by own time per frame, first vs last 10%, the biggest growth first."""
        rows: dict = {}
        for part, profiler in (("first", self.first), ("last", self.last)):
            frames = max(1, self.frames[part])
            stats = pstats.Stats(profiler).stats
            for (file, line, name), (cc, nc, tt, ct, callers) in stats.items():
                key = f"{file.split('site-packages/')[-1].split('chunktui/')[-1]}:{line}({name})"
                row = rows.setdefault(key, {"function": key, "first_tt_ms": 0.0, "last_tt_ms": 0.0,
                                            "first_calls": 0.0, "last_calls": 0.0})
                row[f"{part}_tt_ms"] += 1000 * tt / frames
                row[f"{part}_calls"] += nc / frames
        out = sorted(rows.values(), key=lambda r: -(r["last_tt_ms"] - r["first_tt_ms"]))
        totals = {"function": "TOTAL", "first_tt_ms": sum(r["first_tt_ms"] for r in rows.values()),
                  "last_tt_ms": sum(r["last_tt_ms"] for r in rows.values()), "first_calls": 0, "last_calls": 0}
        return [totals] + [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in out[:top]]


def profile(tokens: int, cprofile_out: str | None, say, gc_detail: bool = False, split: bool = False) -> dict:
    import chunktui.tui  # noqa: F401 - first: it sets the app's TEXTUAL_FPS before textual is imported
    from textual import events
    from textual._compositor import Compositor
    from textual.screen import Screen
    from textual.widget import Widget

    from chunktui.tui import app as app_module
    from chunktui.tui import bench
    from chunktui.tui.widgets.trace_view import TraceView

    timers = Timers()
    timers.gc_detail = gc_detail
    timers.wrap(app_module.ChunkApp, "_drain", "drain")
    timers.wrap(Screen, "_on_timer_update", "screen update")
    timers.wrap(Screen, "_refresh_layout", "reflow")
    timers.wrap(Compositor, "render_update", "render_update")
    timers.wrap(Compositor, "reflow", "full reflow")
    timers.wrap(Compositor, "reflow_visible", "scroll reflow")
    timers.wrap(TraceView, "_moved", "key")
    timers.wrap_renders(Widget)
    timers.wrap_layouts(Widget)
    timers.wrap_crops(Compositor)
    gc.callbacks.append(timers.gc_callback)
    original_post = app_module.ChunkApp.post_message

    def post_message(app, message):  # the benchmark posts each key to the app, as the terminal driver would
        if isinstance(message, events.Key):
            timers.posted.append(time.perf_counter())
        return original_post(app, message)

    app_module.ChunkApp.post_message = post_message
    profiler = cProfile.Profile() if cprofile_out else None
    splitter = SplitProfile(tokens) if split else None
    if splitter is not None:
        timed_drain = app_module.ChunkApp._drain

        def drain(app):
            try:
                return timed_drain(app)
            finally:
                splitter.after_drain(timers.tokens())

        app_module.ChunkApp._drain = drain
    made = app_module.make_app
    arm: dict = {}

    def make_app(*args, **kwargs):
        app = made(*args, **kwargs)
        original = app.action_generate

        def generate():  # the app arm starts: the timers before it are the engine-alone arm's, dropped
            for values in (*timers.samples.values(), *timers.cpu.values()):
                values.clear()
            timers.renders.clear()
            timers.layouts.clear()
            timers.scrolls.clear()
            timers.posted.clear()
            timers.gc_log.clear()
            timers.render_log.clear()
            timers.crops.clear()
            arm["started"] = time.perf_counter()
            timers.tokens = lambda: len(app.stream_trace) if app.stream_trace is not None else 0
            if profiler is not None:
                profiler.enable()
            if splitter is not None:
                splitter.start()
            original()

        app.action_generate = generate
        return app

    app_module.make_app = make_app
    try:
        result = asyncio.run(bench.run_bench(tokens=tokens, threads=1, say=say, bracket=False))
    finally:
        app_module.make_app = made
        app_module.ChunkApp.post_message = original_post
        gc.callbacks.remove(timers.gc_callback)
        if profiler is not None:
            profiler.disable()
        if splitter is not None:
            splitter.stop()
            app_module.ChunkApp._drain = timed_drain
    frames = max(1, len(timers.samples["drain"]))
    prompt = min((n for _, _, n in timers.samples["drain"]), default=0)
    span = max(1, max((n for _, _, n in timers.samples["drain"]), default=1) - prompt)
    def segment(n):  # "first", "last" or None: which tenth of the stream a record at n tokens falls in
        return "first" if n - prompt <= 0.1 * span else ("last" if n - prompt >= 0.9 * span else None)

    seg_frames = {"first": 0, "last": 0}
    for _, _, n in timers.samples["drain"]:
        if segment(n):
            seg_frames[segment(n)] += 1
    parts = {}
    for name, values in sorted(timers.samples.items()):
        early = [s for _, s, n in values if n - prompt <= 0.1 * span]
        late = [s for _, s, n in values if n - prompt >= 0.9 * span]
        cpu = timers.cpu[name]  # in the order of the samples
        parts[name] = {"all": _stats([s for _, s, _ in values]), "first_10pct": _stats(early),
                       "last_10pct": _stats(late), "total_s": round(sum(s for _, s, _ in values), 2),
                       "cpu": _stats(cpu),
                       "cpu_first_10pct": _stats([c for (_, _, n), c in zip(values, cpu) if segment(n) == "first"]),
                       "cpu_last_10pct": _stats([c for (_, _, n), c in zip(values, cpu) if segment(n) == "last"]),
                       "per_frame_first": round(len(early) / max(1, seg_frames["first"]), 3),
                       "per_frame_last": round(len(late) / max(1, seg_frames["last"]), 3)}
    renders = {cls: {"calls_per_frame": round(calls / frames, 1), "ms_per_frame": round(ns / 1e6 / frames, 3)}
               for cls, (calls, ns) in sorted(timers.renders.items(), key=lambda kv: -kv[1][1])}
    by_segment: dict = {"first": defaultdict(lambda: [0, 0]), "last": defaultdict(lambda: [0, 0])}
    for n, cls, ns in timers.render_log:
        if segment(n):
            by_segment[segment(n)][cls][0] += 1
            by_segment[segment(n)][cls][1] += ns
    renders_split = {cls: {part: {"calls_per_frame": round(by_segment[part][cls][0] / max(1, seg_frames[part]), 2),
                                  "ms_per_frame": round(by_segment[part][cls][1] / 1e6 / max(1, seg_frames[part]), 3)}
                           for part in ("first", "last")}
                     for cls in sorted(set(by_segment["first"]) | set(by_segment["last"]),
                                       key=lambda c: -(by_segment["last"][c][1] + by_segment["first"][c][1]))}
    crop_cells = {part: round(sum(a for n, a in timers.crops if segment(n) == part) / max(1, seg_frames[part]))
                  for part in ("first", "last")}
    out = {"tokens": tokens, "frames": frames, "segment_frames": seg_frames, "renders_split": renders_split,
           "crop_cells_per_frame": crop_cells, "bench": result, "parts": parts, "renders": renders,
           "layout_requests": dict(timers.layouts), "scroll_changes": dict(timers.scrolls),
           "key_breakdown": _breakdown(timers), "gc_log": timers.gc_log}
    if profiler is not None:
        profiler.dump_stats(cprofile_out)
    if splitter is not None:
        out["split_profile"] = {"frames": splitter.frames, "rows": splitter.table()}
    return out


@click.command()
@click.option("--tokens", default=1000, show_default=True)
@click.option("--cprofile", "cprofile_out", default=None, help="also profile the app arm with cProfile, stats here")
@click.option("--json", "json_out", default=None)
@click.option("--gc-detail", is_flag=True, help="count the objects each collection looks at (slows the collections "
              "it counts)")
@click.option("--split", is_flag=True, help="cProfile the frames of the first and of the last 10%% of tokens apart "
              "and print own time per frame in both, the biggest growth first")
@click.option("--top", default=25, show_default=True, help="cProfile rows to print (by own time)")
def main(tokens: int, cprofile_out: str | None, json_out: str | None, gc_detail: bool, split: bool, top: int) -> None:
    out = profile(tokens, cprofile_out, say=lambda text: print(text, file=sys.stderr), gc_detail=gc_detail,
                  split=split)
    k = out["bench"]["key_latency_ms"]
    print(f"ratio {out['bench']['ratio']}  key p95 {k['p95']} ms  max {k['max']} ms  "
          f"first/last 10% p95 {k['p95_first_10pct']} / {k['p95_last_10pct']} ms  frames {out['frames']}")
    print(f"{'part':16} {'n':>5} {'mean':>7} {'p95':>7} {'max':>7} | {'p95 first':>9} {'p95 last':>9} {'total s':>8} | "
          f"{'cpu mean':>8} {'cpu p95':>8} {'cpu max':>8} | {'cpu mean f/l':>13} {'cpu p95 f/l':>13} | {'n/frame f/l':>11}")
    for name, s in out["parts"].items():
        a = s["all"]
        if not a["n"]:
            continue
        print(f"{name:16} {a['n']:5d} {a['mean_ms']:7.2f} {a['p95_ms']:7.2f} {a['max_ms']:7.2f} | "
              f"{s['first_10pct'].get('p95_ms', float('nan')):9.2f} {s['last_10pct'].get('p95_ms', float('nan')):9.2f} "
              f"{s['total_s']:8.2f} | {s['cpu'].get('mean_ms', float('nan')):8.2f} "
              f"{s['cpu'].get('p95_ms', float('nan')):8.2f} {s['cpu'].get('max_ms', float('nan')):8.2f} | "
              f"{s['cpu_first_10pct'].get('mean_ms', float('nan')):6.2f}/{s['cpu_last_10pct'].get('mean_ms', float('nan')):<6.2f} "
              f"{s['cpu_first_10pct'].get('p95_ms', float('nan')):6.2f}/{s['cpu_last_10pct'].get('p95_ms', float('nan')):<6.2f} | "
              f"{s['per_frame_first']:5.2f}/{s['per_frame_last']:<5.2f}")
    sf = out["segment_frames"]
    print(f"widget renders per frame (class: calls, ms), all | first 10% ({sf['first']} frames) | last 10% "
          f"({sf['last']} frames):")
    for cls, r in out["renders"].items():
        f, l = out["renders_split"].get(cls, {}).get("first", {}), out["renders_split"].get(cls, {}).get("last", {})
        print(f"  {cls:24} {r['calls_per_frame']:6.1f} {r['ms_per_frame']:8.3f} | {f.get('calls_per_frame', 0):6.2f} "
              f"{f.get('ms_per_frame', 0):8.3f} | {l.get('calls_per_frame', 0):6.2f} {l.get('ms_per_frame', 0):8.3f}")
    print(f"screen cells rendered per frame (the crops of screen updates): first 10% "
          f"{out['crop_cells_per_frame']['first']}, last 10% {out['crop_cells_per_frame']['last']}")
    print("layout passes asked for (refresh(layout=True)), by class:", out["layout_requests"])
    print("scroll position changes, by class:", out["scroll_changes"])
    b = out["key_breakdown"]
    if b:
        print(f"key latency split, ms ({b['presses']} presses): " + ", ".join(
            f"{k} {v}" for k, v in b["all_mean_ms"].items()))
        print("  the slowest 10%: " + ", ".join(f"{k} {v}" for k, v in b["slowest_10pct_mean_ms"].items()))
    for record in out["gc_log"]:
        print(f"  gc: {record}")
    if cprofile_out:
        stats = pstats.Stats(cprofile_out)
        stats.sort_stats("tottime").print_stats(top)
    if split:
        sp = out["split_profile"]
        print(f"cProfile own time per frame, first 10% ({sp['frames']['first']} frames) vs last 10% "
              f"({sp['frames']['last']} frames), biggest growth first:")
        print(f"  {'first ms':>9} {'last ms':>9} {'calls f':>8} {'calls l':>8}  function")
        for r in sp["rows"]:
            print(f"  {r['first_tt_ms']:9.3f} {r['last_tt_ms']:9.3f} {r['first_calls']:8.1f} {r['last_calls']:8.1f}  "
                  f"{r['function']}")
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
