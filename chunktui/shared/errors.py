"""Errors a user can cause, each with a message that says what happened and what to do.

Every error the engine raises on bad input derives from `ChunkError`, so a
caller (CLI, TUI) can show `str(err)` and carry on.
"""

from __future__ import annotations


class ChunkError(Exception):
    """Base class: the message is meant for the user as is."""


class ModelLoadError(ChunkError):
    """A model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model loaded, but chunktui does not know where its decoder blocks are."""


class DictionaryError(ChunkError):
    """A dictionary file is missing, damaged, or of an unknown format."""


class IncompatibleDictionaryError(DictionaryError):
    """A valid dictionary that was made for another model."""


class CorpusError(ChunkError):
    """A corpus, span file or word list cannot be used (empty, malformed, no occurrences)."""


class GenerationCancelled(ChunkError):
    """A generation or scan was cancelled by the user between tokens."""


class DeviceMemoryError(ChunkError):
    """The accelerator ran out of memory; the message says what to try instead."""


class ExportError(ChunkError):
    """A report could not be written (unwritable path, bad format)."""


def out_of_memory_message(what: str, device: str) -> str:
    return (
        f"Out of memory on {device} while {what}. Nothing was lost. Try a shorter text, "
        "a smaller batch (--batch-size), float16 storage (--store-dtype float16), "
        "fewer layers (--layers), or --device cpu."
    )
