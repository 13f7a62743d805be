"""The app lifts Textual's cap on screen updates to 1000 a second (a key is not kept waiting for its repaint); a user's
TEXTUAL_FPS wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import chunktui.tui.app, textual.constants as c, textual.screen as s; print(c.MAX_FPS, round(1 / s.UPDATE_PERIOD))"


@pytest.mark.parametrize("env, expected", [(None, "1000 1000"), ("30", "30 30")])
def test_screen_update_rate(env, expected):
    environ = {k: v for k, v in os.environ.items() if k != "TEXTUAL_FPS"}
    if env is not None:
        environ["TEXTUAL_FPS"] = env
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, check=True,
                         timeout=120)
    assert out.stdout.split("\n")[-2] == expected
