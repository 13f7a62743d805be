"""Shared CLI plumbing: error reporting, model loading with progress, options."""

from __future__ import annotations

import functools
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.text import Text

from chunktui.shared.errors import ChunkError
from chunktui.shared.specs import DEFAULT_MODEL, DEVICE_MAPS, DTYPE_CHOICES

class SafeConsole(Console):
    """A Console whose text never reaches the terminal as a control sequence.

    Every text segment (not Rich's own control segments) goes through
    `shared.safe.visible` just before it is written: an ESC, an OSC 52
    clipboard write, a bell, a bidi override or a lone surrogate in a prompt,
    a corpus, a label, a file name or a model's output is shown as a visible
    symbol (ESC as U+241B), whatever printed it.
    """

    def _render_buffer(self, buffer):
        from rich.segment import Segment

        from chunktui.shared.safe import visible

        return super()._render_buffer(
            Segment(visible(text), style, control) if not control and text else Segment(text, style, control)
            for text, style, control in buffer)


# No emoji codes (":x:" stays as typed) and no highlighting; markup only where a format string asks for it,
# and user text (paths, labels, prompts, error messages) goes in escaped or as Text.
console = SafeConsole(stderr=False, highlight=False, emoji=False)
err_console = SafeConsole(stderr=True, highlight=False, emoji=False)

# outputs planned (checked and locked) by the running command; released when it ends, however it ends
_planned: list = []


def print_error(message: str) -> None:
    """One error line, printed exactly as written (no markup, no emoji codes)."""
    err_console.print(Text("error: ", style="bold red") + Text(str(message)), soft_wrap=True)  # one line: paths stay whole


def note(label: str, message: str, style: str = "yellow") -> None:
    """A 'label: message' line on stderr with the message printed as written."""
    err_console.print(Text(f"{label} ", style=style) + Text(str(message)), soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C: every `finally` and `with` runs (temporary files,
    state caches and locks are removed) before the command exits with 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _catch_sigterm():
    """Install the SIGTERM handler for one command (main thread only); returns what to restore."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        return None


def friendly_errors(func):
    """Turn user errors into one clear line and exit code 2; Ctrl-C into exit 130, SIGTERM into 143 (both clean up)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import signal

        previous = _catch_sigterm()
        try:
            return func(*args, **kwargs)
        except ChunkError as err:
            print_error(str(err))
            sys.exit(2)
        except Terminated:
            err_console.print(Text("terminated (SIGTERM); temporary files removed", style="yellow"))
            sys.exit(143)
        except KeyboardInterrupt:
            err_console.print(Text("cancelled", style="yellow"))
            sys.exit(130)
        except OSError as err:  # a file or device problem outside the checked paths: still one line, exit 2
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            print_error(f"{err.strerror or err}{where}.")
            sys.exit(2)
        finally:
            while _planned:
                _planned.pop().release()
            if previous is not None:
                try:
                    signal.signal(signal.SIGTERM, previous)
                except (ValueError, OSError):
                    pass

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
    func = click.option("--device-map", type=click.Choice(DEVICE_MAPS),
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
def plan_outputs(*outputs, inputs=(), overwrite: bool = False):
    """Check and lock this command's outputs before any model loads: (option, path or None, suffix) each.

    Returns one OutputTarget (or None) per output; see chunktui.shared.outputs.
    """
    from chunktui.shared.outputs import plan_outputs as plan

    targets = plan(outputs, inputs=[i for i in inputs if i], overwrite=overwrite)
    _planned.extend(t for t in targets if t is not None)
    return targets if len(targets) > 1 else targets[0]


def model_inputs(model_spec: str | None) -> list[str]:
    """Files a model spec reads (a .gguf file, a model folder's files): no output may be one of them."""
    if not model_spec:
        return []
    path = Path(model_spec).expanduser()
    try:
        if path.is_file():
            return [str(path)]
        if path.is_dir():
            return [str(p) for p in path.iterdir() if p.is_file()]
    except OSError:
        pass
    return []


def overwrite_option(func):
    return click.option("--overwrite", is_flag=True,
                        help="replace an existing output file (never one of the command's inputs)")(func)


def checked(validator, **kwargs):
    """A click callback that runs an engine validator (shared.validate) before the command body."""

    def callback(ctx, param, value):
        if value is None:
            return None
        name = max(param.opts, key=len) if param.opts else param.name
        try:
            return validator(value, name=name, **kwargs)
        except ChunkError as err:
            raise click.BadParameter(str(err)) from None

    return callback


def command_line(ctx: click.Context | None = None) -> str:
    """The full command that is running, every option spelled out, so it can be rerun from a file's header."""
    ctx = ctx or click.get_current_context()
    words = []
    names = []
    c = ctx
    while c is not None:
        if c.info_name:
            names.append(c.info_name)
        c = c.parent
    words.append(" ".join(["chunktui"] + list(reversed(names[:-1])) if len(names) > 1 else ["chunktui"]))
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            values = value if isinstance(value, (list, tuple)) else [value]
            words += [shlex.quote(str(v)) for v in values if v is not None]
            continue
        if not isinstance(param, click.Option) or value is None or param.name in ("overwrite", "append"):
            continue
        opt = max(param.opts, key=len)
        if param.is_flag:
            if param.secondary_opts:
                words.append(opt if value else max(param.secondary_opts, key=len))
            elif value:
                words.append(opt)
            continue
        words.append(f"{opt} {shlex.quote(str(value))}")
    return " ".join(words)


def worker_argv(ctx: click.Context, *skip: str) -> list[str]:
    """The running command's options as given (from the parsed values), less `skip`: what the processes that
    `--procs` launches run. Repeated options repeat, `--x/--no-x` pairs keep their side, and the placement
    options (which the command's signature does not see) travel too."""
    placed = ctx.meta.get(_PLACEMENT, {})
    argv: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in skip:
            continue
        value = ctx.params[param.name] if param.name in ctx.params else placed.get(param.name)
        if param.is_flag:
            if param.secondary_opts:
                argv.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                argv.append(param.opts[0])
        elif param.multiple:
            for item in value or ():
                argv += [param.opts[0], str(item)]
        elif value is not None:
            argv += [param.opts[0], str(value)]
    return argv


def model_options(func):
    func = placement_options(func)
    func = click.option("--dtype", default="auto", show_default=True,
                        type=click.Choice(DTYPE_CHOICES),
                        help="auto: bfloat16 on CUDA, float32 elsewhere")(func)
    func = click.option("--device", default="auto", show_default=True,
                        help="auto, cpu, cuda, cuda:N or mps")(func)
    func = click.option("--model", "-m", "model_spec", default=DEFAULT_MODEL, show_default=True,
                        help="built-in alias, .gguf file, model folder, Hub id or random:NAME (see `chunktui models`)")(func)
    return func


def load_with_progress(model_spec: str, device: str, dtype: str, quiet: bool = False):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from chunktui.engine.memory import describe_weights
    from chunktui.engine.models import load_model

    placement = placement_from_context()
    if quiet:
        return load_model(model_spec, device, dtype, **placement)
    with Progress(TextColumn("[bold]{task.fields[stage]:>8}"), BarColumn(), TextColumn("{task.description}", markup=False),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("", total=1.0, stage="model")

        def update(stage, fraction, message):
            progress.update(task, description=message, stage=stage,
                            completed=fraction if fraction is not None else None)

        loaded = load_model(model_spec, device, dtype, progress=update, **placement)
    err_console.print(Text(f"loaded {loaded.name} on {loaded.card()['placement']} ({loaded.card()['dtype']}) "
                           f"in {loaded.load_seconds:.1f} s; weights {describe_weights(loaded)}", style="dim"))
    return loaded


def stage_progress():
    """A rich progress bar and a (stage, fraction, message) callback that drives it.

    The engine's messages carry tokens/s and the ETA for long jobs (build, evaluate).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.fields[stage]:>9}"), BarColumn(), TextColumn("{task.description}", markup=False),
                        TimeElapsedColumn(), console=err_console, transient=True)
    tasks: dict[str, int] = {}

    def update(stage, fraction, message):
        if stage not in tasks:
            tasks[stage] = progress.add_task(message, total=1.0, stage=stage)
        progress.update(tasks[stage], description=message, completed=fraction if fraction is not None else None)

    return progress, update
