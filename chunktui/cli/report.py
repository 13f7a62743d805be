"""`chunktui report`: a session, scan or perturbation JSON file as JSON, Markdown, HTML or CSV."""

from __future__ import annotations

import click

from chunktui.cli.common import friendly_errors, note, overwrite_option, plan_outputs


@click.command("report")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["md", "html", "csv", "json"]), default=None,
              help="output format (default: from --out's suffix, else html)")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="file to write (atomically)")
@overwrite_option
@friendly_errors
def report_cmd(in_path, fmt, out_path, overwrite) -> None:
    """Export a session (from the app), `scan --json` or `perturb --json` output as JSON, Markdown, HTML or CSV.

    HTML is one self-contained file, with tokens coloured as in the app.
    """
    from chunktui.shared.reports import format_for_path, read_input, write_report

    session = read_input(in_path)  # a missing or damaged input is reported first
    target = plan_outputs(("--out", out_path, None), inputs=[in_path], overwrite=overwrite)
    fmt = fmt or format_for_path(out_path, default="html")
    path = write_report(session, fmt, target)
    n_traces, n_runs = len(session.get("traces", [])), len(session.get("runs", []))
    note("wrote", f"{path} ({fmt}: {n_traces} texts, {n_runs} perturbation runs)", style="default")
