"""The terminal app (Textual): the UI process. Imports chunktui.shared only, never torch; the model runs in the engine process (chunktui.server)."""

import os

# Textual repaints a changed screen at most TEXTUAL_FPS times a second (default 60), so a key handled just after a
# repaint waits up to 1/FPS for its own. The app coalesces what streams in itself (tokens are drawn at FRAME_RATE,
# 20 a second), so the cap only delays what a user does: at 1000 a key's repaint follows as soon as the screen is
# free (within 1 ms). Key latency p95 in `chunktui bench app`: 27 ms at 60, 18 ms at 120, 11 ms at 1000 (README).
# Textual still draws once per burst of changes (a repaint waits for the event loop to be idle). A user's own
# setting wins. Set before textual is imported (textual.constants reads it once).
os.environ.setdefault("TEXTUAL_FPS", "1000")
