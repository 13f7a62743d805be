"""The engine process started first: before click, Textual or the app are imported (stdlib only here).

`chunktui` (the console script, `chunktui.launch`) calls `prestart` within a
few tens of milliseconds of launch when the command opens the app, so torch
and the model load run while the CLI, Textual and the screen are imported
and built. The app's `EngineClient.start()` adopts that process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

# an engine process started before the app exists (`prestart`), waiting to be adopted by EngineClient.start()
_EARLY: dict = {}


def _spawn(threads: int | None, log_path: Path | None):
    """`python -m chunktui.server` on one end of a fresh socket pair: (process, our end of the pair)."""
    ours, theirs = socket.socketpair()
    command = [sys.executable, "-m", "chunktui.server", "--fd", str(theirs.fileno())]
    if threads:
        command += ["--threads", str(threads)]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # never onto the app's screen
    try:
        process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # the child holds its end; EOF on ours then means it died
        if log is not subprocess.DEVNULL:
            log.close()
    return process, ours


def engine_log_path() -> Path | None:
    """Where the app writes the engine's output (as ChunkApp.log_path), or None without a state folder."""
    from chunktui.paths import state_dir

    path = state_dir() / "chunktui.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def prestart(threads: int | None, log_path: Path | None = None) -> None:
    """Start the engine process now, before the UI imports Textual and builds its screen.

    The engine imports torch (and then transformers) while the app starts, so
    the model load begins the moment the app asks. The app's first
    `EngineClient.start()` with the same thread count adopts this process; one
    never adopted is ended when this interpreter exits. Failing to start is
    not an error here: the app starts its engine as before and says what went wrong.
    """
    if _EARLY:
        return
    try:
        _EARLY["engine"] = (threads, *_spawn(threads, log_path))
    except OSError:
        return
    import atexit

    atexit.register(_end_unadopted)


def _end_unadopted() -> None:
    early = _EARLY.pop("engine", None)
    if early is not None:
        _, process, ours = early
        ours.close()  # EOF: the engine's loop ends on its own
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
