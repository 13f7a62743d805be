"""Where chunktui finds its sample data and keeps its state (no torch, no UI imports)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
DEFAULT_DICT_NAME = "smollm2-135m.chunks.safetensors"


def sample_path(name: str) -> Path:
    """A file in sample_data/ (works from a checkout; $CHUNKTUI_SAMPLE_DATA overrides)."""
    root = Path(os.environ.get("CHUNKTUI_SAMPLE_DATA", REPO_SAMPLE))
    return root / name


def state_dir() -> Path:
    """The user's state folder for chunktui: $CHUNKTUI_STATE_DIR, else $XDG_STATE_HOME/chunktui, else ~/.local/state/chunktui."""
    explicit = os.environ.get("CHUNKTUI_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "chunktui"
