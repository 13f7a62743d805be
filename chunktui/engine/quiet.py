"""Keep transformers' own progress bars and warnings off the terminal (chunktui reports progress itself).

Called by each path that imports transformers, not before: the built-in model loads without importing it."""

from __future__ import annotations


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
