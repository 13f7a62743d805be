"""`chunktui discover` and `chunktui import` (placeholders until unsupervised discovery lands)."""

import click


@click.command("discover")
def discover_cmd() -> None:
    """Discover chunks without labels."""
    raise click.ClickException("not implemented yet")


@click.command("import")
def import_cmd() -> None:
    """Import directions made by other tools as chunks."""
    raise click.ClickException("not implemented yet")
