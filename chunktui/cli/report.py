"""`chunktui report` (placeholder until the report module lands)."""

import click


@click.command("report")
def report_cmd() -> None:
    """Export a session or scan as JSON, Markdown, HTML or CSV."""
    raise click.ClickException("not implemented yet")
