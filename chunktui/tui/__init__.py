"""The terminal app (Textual): the UI process. Imports chunktui.shared only, never torch; the model runs in the engine process (chunktui.server)."""
