"""`chunktui tui` (placeholder until the app lands)."""

import click


@click.command("tui")
def tui_cmd() -> None:
    """Open the terminal app."""
    raise click.ClickException("the terminal app is not implemented yet; try `chunktui demo`")
