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


_PLACEMENT = "chunktui.placement"


def _remember_placement(ctx: click.Context, param: click.Parameter, value):
    """Placement options travel in the context, so commands keep their signatures and pass them on unchanged."""
    ctx.meta.setdefault(_PLACEMENT, {})[param.name] = value
    return value


def placement_options(func):
    """--device-map / --max-memory / --offload-folder (accelerate's meanings) and --offline."""
    func = click.option("--offline", is_flag=True, default=False, expose_value=False, callback=_remember_placement,
                        help="never download: use only models already cached (as HF_HUB_OFFLINE=1)")(func)
    func = click.option("--offload-folder", type=click.Path(file_okay=False), default=None, expose_value=False,
                        callback=_remember_placement,
                        help="with --device-map: folder for weights that fit in no --max-memory budget")(func)
    func = click.option("--max-memory", default=None, expose_value=False, callback=_remember_placement,
                        metavar="DEVICE=SIZE,...",
                        help="with --device-map: caps per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")(func)
    func = click.option("--device-map", type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
                        default=None, expose_value=False, callback=_remember_placement,
                        help="shard the model across GPUs with CPU/disk offload (accelerate); "
                             "default: everything on --device")(func)
    return func


def placement_from_context() -> dict:
    """The placement options of the running command, as load_model keyword arguments."""
    ctx = click.get_current_context(silent=True)
    given = dict(ctx.meta.get(_PLACEMENT, {})) if ctx is not None else {}
    return {key: given.get(key) for key in ("device_map", "max_memory", "offload_folder")} | {
        "offline": bool(given.get("offline"))}


def model_options(func):
    func = placement_options(func)
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

    from chunktui.engine.memory import describe_weights
    from chunktui.engine.models import load_model

    placement = placement_from_context()
    if quiet:
        return load_model(model_spec, device, dtype, **placement)
    with Progress(TextColumn("[bold]{task.fields[stage]:>8}"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("", total=1.0, stage="model")

        def update(stage, fraction, message):
            progress.update(task, description=message, stage=stage,
                            completed=fraction if fraction is not None else None)

        loaded = load_model(model_spec, device, dtype, progress=update, **placement)
    err_console.print(f"[dim]loaded {loaded.name} on {loaded.card()['placement']} ({loaded.card()['dtype']}) "
                      f"in {loaded.load_seconds:.1f} s; weights {describe_weights(loaded)}[/]")
    return loaded


def stage_progress():
    """A rich progress bar and a (stage, fraction, message) callback that drives it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.fields[stage]:>8}"), BarColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=err_console, transient=True)
    tasks: dict[str, int] = {}

    def update(stage, fraction, message):
        if stage not in tasks:
            tasks[stage] = progress.add_task(message, total=1.0, stage=stage)
        progress.update(tasks[stage], description=message, completed=fraction if fraction is not None else None)

    return progress, update
