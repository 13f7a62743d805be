"""`chunktui bench app`: how fast the app streams against its own engine, and how quickly it answers keys."""

from __future__ import annotations

import click

from chunktui.cli.common import checked, console, friendly_errors, overwrite_option, plan_outputs
from chunktui.shared import validate
from chunktui.shared.specs import DEFAULT_MODEL


@click.group("bench")
def bench() -> None:
    """Benchmarks that drive the real app (speed is measured here, never asserted in tests)."""


def _with_ci(value, ci) -> str | None:
    if value is None:
        return None
    return f"{value} [{ci[0]}, {ci[1]}]" if ci else str(value)


@bench.command("app")
@click.option("--model", "-m", "model_spec", default=DEFAULT_MODEL, show_default=True)
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--tokens", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="torch threads of the engine process (the same for both runs)")
@click.option("--interval", default=0.1, show_default=True,
              callback=checked(validate.number_in, lo=0.01, hi=10.0),
              help="seconds between key presses while streaming (0.01 to 10)")
@click.option("--bracket/--no-bracket", default=True, show_default=True,
              help="run the engine alone again after the app and take the mean of both as the baseline")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the figures as JSON")
@overwrite_option
@friendly_errors
def bench_app_cmd(model_spec, dict_path, device, tokens, threads, interval, bracket, json_out, overwrite) -> None:
    """Engine-alone vs in-app tok/s (ratio), key latency, frame rate and UI memory, in one run."""
    from rich.table import Table

    from chunktui.tui.bench import bench_app

    target = plan_outputs(("--json", json_out, None), overwrite=overwrite, inputs=[dict_path])  # before any work

    result = bench_app(model=model_spec, dict_path=dict_path, tokens=tokens, threads=threads, device=device,
                       interval=interval, bracket=bracket, say=lambda text: console.print(text, markup=False))
    lat = result["key_latency_ms"]
    table = Table(title=f"chunktui bench app: {model_spec}, {tokens} tokens, {threads} thread(s), {device}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    runs = result["engine_alone"]["runs_tokens_per_second"]
    rows = [("engine alone, tok/s" + (" (mean of before / after: " + " / ".join(map(str, runs)) + ")"
                                      if len(runs) > 1 else ""), result["engine_alone"]["tokens_per_second"]),
            ("in the app, tok/s", result["app"]["tokens_per_second"]), ("ratio (app / engine)", result["ratio"]),
            ("key latency median, ms", lat["median"]), ("key latency p95, ms", lat["p95"]),
            ("key latency max, ms", lat["max"]), ("p95 first 10% of tokens, ms", lat["p95_first_10pct"]),
            ("p95 last 10% of tokens, ms", lat["p95_last_10pct"]),
            ("p95 by tenth of the tokens, ms", " ".join("—" if x is None else str(x) for x in lat["p95_by_tenth"])),
            ("p95 last - first 10%, ms (95% bootstrap interval)", _with_ci(lat["trend"]["p95_last_minus_first"],
                                                                            lat["trend"]["p95_last_minus_first_ci95"])),
            ("latency slope, ms per 1,000 tokens (95% interval)", _with_ci(lat["trend"]["slope_ms_per_1000_tokens"],
                                                                         lat["trend"]["slope_ci95"])),
            ("key presses measured", lat["measured"]),
            ("frame rate, frames/s", result["frame_rate"]), ("UI process peak RSS, MB", result["ui_peak_rss_mb"]),
            ("engine process peak RSS, MB", result["engine_peak_rss_mb"]),
            ("UI process imported torch", result["ui_imported_torch"])]
    for name, value in rows:
        table.add_row(name, "—" if value is None else str(value))
    console.print(table)
    if target is not None:
        target.write_json(result)
        console.print(f"wrote {target.path}", markup=False)


@bench.command("start")
@click.option("--model", "-m", "model_spec", default=DEFAULT_MODEL, show_default=True)
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="torch threads of the engine process")
@click.option("--runs", type=click.IntRange(1, 50), default=3, show_default=True,
              help="fresh launches (the figures are their median, min and max)")
@click.option("--prestart/--no-prestart", default=True, show_default=True,
              help="start the engine process before the UI imports Textual (as `chunktui tui` does); "
                   "--no-prestart starts it when the screen is up, for comparison")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the figures as JSON")
@overwrite_option
@friendly_errors
def bench_start_cmd(model_spec, dict_path, threads, runs, prestart, json_out, overwrite) -> None:
    """Launch -> first streamed token of `chunktui tui --prompt` (headless), split into imports, model load,
    dictionary load and first token. The model must be cached (run `chunktui tui` or `chunktui models` once)."""
    from rich.table import Table

    from chunktui.tui.bench import bench_start

    target = plan_outputs(("--json", json_out, None), overwrite=overwrite, inputs=[dict_path])  # before any work
    result = bench_start(model=model_spec, dict_path=dict_path, threads=threads, runs=runs, prestart_engine=prestart,
                         say=lambda text: console.print(text, markup=False))
    table = Table(title=f"chunktui bench start: {model_spec}, {threads} thread(s), {runs} launches "
                        f"(load average {result['load_average_1min']}, {result['cores']} cores)")
    for name in ("figure", "median s", "min s", "max s"):
        table.add_column(name, justify="left" if name == "figure" else "right")
    names = {"total": "launch -> first streamed token", "ui_ready": "launch -> screen up (keys answered)",
             "ui_imports": "launch -> UI imported (Textual, the app)",
             "engine_imports": "launch -> engine imported torch", "model_load": "model load (after torch)",
             "dictionary_load": "dictionary load", "first_token": "dictionary in use -> first token"}
    for key, name in names.items():
        s = result["seconds"][key]
        table.add_row(name, f"{s['median']:.2f}", f"{s['min']:.2f}", f"{s['max']:.2f}")
    console.print(table)
    if target is not None:
        target.write_json(result)
        console.print(f"wrote {target.path}", markup=False)
