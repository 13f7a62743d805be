"""The terminal app (Textual): the UI process. Imports chunktui.shared only, never torch; the model runs in the engine process (chunktui.server)."""

import os

# Textual repaints a changed screen at most TEXTUAL_FPS times a second (default 60), so a key handled just after a
# repaint waits up to 1/FPS for its own. The app's tokens arrive at FRAME_RATE (20/s); at 120 a key waits at most
# 8 ms for the screen: key latency p95 27 -> 18 ms in `chunktui bench app` (README). A user's own setting wins.
# Set before textual is imported (textual.constants reads it once).
os.environ.setdefault("TEXTUAL_FPS", "120")
