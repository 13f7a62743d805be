"""`chunktui tui` (and `chunktui` with no command): open the terminal app."""

from __future__ import annotations

import click

from chunktui.cli.common import checked, placement_from_context, placement_options
from chunktui.shared import validate
from chunktui.shared.specs import DEFAULT_MODEL, DTYPE_CHOICES


def _threads(value: int) -> int:
    from chunktui.shared.errors import ChunkError
    from chunktui.shared.validate import non_negative_int

    try:
        return non_negative_int(value, "--threads", hi=1024)
    except ChunkError as err:
        raise click.BadParameter(str(err)) from None


@click.command("tui")
@click.option("--model", "-m", "model_spec", default=DEFAULT_MODEL, show_default=True,
              help="built-in alias, .gguf file, model folder, Hub id, random:NAME or rnn:flat|context "
                   "(see `chunktui models`)")
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(DTYPE_CHOICES))
@click.option("--sequences", "sequences_path", default=None, type=click.Path(dir_okay=False),
              help="text or JSONL file for the Step pane (default: the sample sequences)")
@click.option("--file", "file_path", default=None, type=click.Path(dir_okay=False),
              help="open the Step pane on this text or JSONL file")
@click.option("--prompt", default=None, help="start streaming this prompt as soon as the model is loaded")
@click.option("--max-new-tokens", type=int, default=None, callback=checked(validate.max_new_tokens),
              help="tokens to generate (the Stream pane's 'tokens' field)")
@click.option("--restore", is_flag=True, help="restore the previous session (from its journal) at start")
@click.option("--ignore-eos", is_flag=True, help="keep generating past the end-of-sequence token (to --max-new-tokens)")
@click.option("--threads", default=0, callback=lambda ctx, param, v: _threads(v),
              help="torch threads of the engine process (default: all cores)")
@placement_options
def tui_cmd(model_spec, dict_path, device, dtype, sequences_path, file_path, prompt, max_new_tokens, restore,
            ignore_eos, threads) -> None:
    """Open the terminal app: stream, inspect, perturb and step through chunks.

    Keys: F1 Model, F2 Stream, F3 Chunks, F4 Perturb, F5 Step, F6 Export; / focuses the pane's text field;
    Ctrl+G generates, Esc stops; Ctrl+P opens the command palette; Ctrl+Q quits.
    The model runs in its own process, so the screen stays responsive while it works.
    """
    import os
    from pathlib import Path

    if prompt is not None and not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    if file_path is not None and not Path(file_path).is_file():
        raise click.BadParameter(f"{file_path} does not exist", param_hint="--file")
    threads = threads or (os.cpu_count() or 1)
    from chunktui.tui.early import engine_log_path, prestart

    # a no-op when the console script already started it (chunktui.launch); the engine imports torch while
    # Textual is imported and the screen built
    prestart(threads, engine_log_path())

    from chunktui.tui.app import make_app
    from chunktui.tui.options import AppOptions

    options = AppOptions.for_users(model_spec=model_spec, dict_path=dict_path, device=device, dtype=dtype,
                                   sequences_path=file_path or sequences_path, threads=threads, prompt=prompt,
                                   max_new_tokens=max_new_tokens, open_step=file_path is not None,
                                   stop_at_eos=not ignore_eos, restore=restore, placement=placement_from_context())
    make_app(options).run()
