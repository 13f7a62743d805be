"""`chunktui rnn ...`: the RNN reflection lab (placeholder until the lab lands)."""

import click


@click.group()
def rnn() -> None:
    """The RNN reflection lab: planted chunks, DSC, grafting."""
