"""The `chunktui` command line (click): the top floor; may import every floor below it, torch only inside commands that load a model."""

from __future__ import annotations

import click

from chunktui import __version__


@click.group(invoke_without_command=True)
@click.version_option(__version__, prog_name="chunktui")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Find, stream and perturb chunks in a language model's hidden states.

    With no command, opens the terminal app on the built-in model and the
    sample dictionary.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(main.get_command(ctx, "tui"))


def _register() -> None:
    from chunktui.cli import bench, dictionaries, discover, monitor, perturb, report, rnn, scan, tui

    for command in (dictionaries.models_cmd, dictionaries.build_cmd, dictionaries.evaluate_cmd,
                    dictionaries.inspect_cmd, scan.scan_cmd, scan.demo_cmd, perturb.perturb_cmd, monitor.monitor_cmd, report.report_cmd,
                    tui.tui_cmd, discover.discover_cmd, discover.import_cmd, rnn.rnn, bench.bench):
        main.add_command(command)


_register()
