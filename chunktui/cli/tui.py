"""`chunktui tui` (and `chunktui` with no command): open the terminal app."""

from __future__ import annotations

import click


def _threads(value: int) -> int:
    from chunktui.engine.errors import ChunkError
    from chunktui.engine.validate import non_negative_int

    try:
        return non_negative_int(value, "--threads", hi=1024)
    except ChunkError as err:
        raise click.BadParameter(str(err)) from None


@click.command("tui")
@click.option("--model", "-m", "model_spec", default="smollm2-135m", show_default=True,
              help="built-in alias, .gguf file, model folder, Hub id, random:NAME or rnn:flat|context "
                   "(see `chunktui models`)")
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--sequences", "sequences_path", default=None, type=click.Path(dir_okay=False),
              help="text or JSONL file for the Step pane (default: the sample sequences)")
@click.option("--threads", default=0, callback=lambda ctx, param, v: _threads(v),
              help="torch threads (default 0: all cores but one, which the screen keeps)")
def tui_cmd(model_spec, dict_path, device, dtype, sequences_path, threads) -> None:
    """Open the terminal app: stream, inspect, perturb and step through chunks.

    Keys: F1 Model, F2 Stream, F3 Chunks, F4 Perturb, F5 Step, F6 Export; Esc cancels;
    Ctrl+P opens the command palette; Ctrl+Q quits.
    """
    import os

    from chunktui.tui.app import make_app

    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    make_app(model_spec=model_spec, dict_path=dict_path, device=device, dtype=dtype,
             sequences_path=sequences_path, threads=threads).run()
