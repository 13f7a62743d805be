"""chunktui: find, stream and perturb chunks in language-model hidden states."""

__version__ = "0.1.0"
