"""chunktui: find, stream and perturb chunks in language-model hidden states.

`from chunktui import Engine` gives the Python facade (loading torch only when used).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":  # lazy: importing chunktui (e.g. the app) must not import torch
        from chunktui.api import Engine

        return Engine
    raise AttributeError(f"module 'chunktui' has no attribute {name!r}")
