"""`chunktui bench app`'s harness on the tiny random model: every press is measured and reported (no timing
asserted: the figures themselves come from the benchmark run on the built-in model)."""

from __future__ import annotations

import asyncio


def test_bench_app_measures_every_press_and_reports_each_sample():
    from chunktui.tui.bench import run_bench

    result = asyncio.run(run_bench(model="random:llama-tiny", tokens=60, bracket=False, interval=0.02))
    lat = result["key_latency_ms"]
    assert result["app"]["tokens"] == 60 and result["app"]["finished"] == "length"
    assert lat["presses"] >= 1 and lat["unhandled_after_2s"] == 0
    assert lat["measured"] == lat["presses"] == len(lat["samples"])  # the last press too, before the harness waits
    counts = [n for n, _ in lat["samples"]]
    assert counts == sorted(counts) and 0 <= counts[0] and counts[-1] <= 60  # in press order, tokens so far
    ms = [x for _, x in lat["samples"]]
    assert all(x > 0 for x in ms) and abs(lat["max"] - max(ms)) <= 0.051  # the max to 0.1 ms, samples to 0.01


def test_bench_app_stops_with_the_engines_reason_when_a_run_cannot_start():
    """Before, a stream longer than the model's context left the harness waiting for ever on the engine-alone
    run, and a model that failed to load kept it polling for ten minutes."""
    import pytest

    from chunktui.shared.errors import ChunkError
    from chunktui.tui.bench import run_bench

    with pytest.raises(ChunkError, match="engine-alone run .before. failed: .*context of 512"):
        asyncio.run(run_bench(model="random:llama-tiny", tokens=2000, bracket=False))
    with pytest.raises(ChunkError, match="did not load.*Unknown random model 'nope'"):
        asyncio.run(run_bench(model="random:nope", tokens=20, bracket=False))
