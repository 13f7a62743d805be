"""The `chunktui` command line (click): the top floor; may import every floor below it, torch only inside commands that load a model."""

from __future__ import annotations

import click

from chunktui import __version__


class SafeGroup(click.Group):
    """click's own usage errors (a bad option value, an unknown option) shown with control characters made visible.

    Their messages quote what was typed; an ESC or an OSC sequence in a value
    must not reach the terminal raw (chunktui.shared.safe).
    """

    @staticmethod
    def _clean(err: click.ClickException) -> None:
        from chunktui.shared.safe import visible

        err.message = visible(err.message)
        if isinstance(getattr(err, "param_hint", None), str):
            err.param_hint = visible(err.param_hint)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.ClickException as err:
            self._clean(err)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as err:
            self._clean(err)
            raise


@click.group(cls=SafeGroup, invoke_without_command=True)
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
    from chunktui.cli import bench, dictionaries, discover, monitor, perturb, report, rnn, scan, top, tui

    for command in (dictionaries.models_cmd, dictionaries.build_cmd, dictionaries.evaluate_cmd, dictionaries.calibrate_cmd,
                    dictionaries.inspect_cmd, scan.scan_cmd, scan.demo_cmd, perturb.perturb_cmd, monitor.monitor_cmd,
                    report.report_cmd, tui.tui_cmd, discover.discover_cmd, discover.import_cmd, rnn.rnn, bench.bench,
                    top.top_cmd):
        main.add_command(command)


_register()
