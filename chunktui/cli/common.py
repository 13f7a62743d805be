"""Shared CLI plumbing: error reporting, model loading with progress, options."""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console

from chunktui.engine.errors import ChunkError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

def friendly_errors(func):
    """Turn user errors into one clear line and exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ChunkError as err:
            err_console.print(f"[bold red]error:[/] {err}")
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("[yellow]cancelled[/]")
            sys.exit(130)

    return wrapper


def model_options(func):
    func = click.option("--dtype", default="auto", show_default=True,
                        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                        help="auto: bfloat16 on CUDA, float32 elsewhere")(func)
    func = click.option("--device", default="auto", show_default=True,
                        help="auto, cpu, cuda, cuda:N or mps")(func)
    func = click.option("--model", "-m", "model_spec", default="smollm2-135m", show_default=True,
                        help="built-in alias, .gguf file, model folder, Hub id or random:NAME (see `chunktui models`)")(func)
    return func


def load_with_progress(model_spec: str, device: str, dtype: str, quiet: bool = False):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from chunktui.engine.models import load_model

    if quiet:
        return load_model(model_spec, device, dtype)
    with Progress(TextColumn("[bold]{task.fields[stage]:>8}"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("", total=1.0, stage="model")

        def update(stage, fraction, message):
            progress.update(task, description=message, stage=stage,
                            completed=fraction if fraction is not None else None)

        loaded = load_model(model_spec, device, dtype, progress=update)
    err_console.print(f"[dim]loaded {loaded.name} on {loaded.device} ({loaded.card()['dtype']}) "
                      f"in {loaded.load_seconds:.1f} s[/]")
    return loaded


def stage_progress():
    """A rich progress bar and a (stage, fraction, message) callback that drives it.

    The engine's messages carry tokens/s and the ETA for long jobs (build, evaluate).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.fields[stage]:>9}"), BarColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=err_console, transient=True)
    tasks: dict[str, int] = {}

    def update(stage, fraction, message):
        if stage not in tasks:
            tasks[stage] = progress.add_task(message, total=1.0, stage=stage)
        progress.update(tasks[stage], description=message, completed=fraction if fraction is not None else None)

    return progress, update
