"""The app's side of the engine process: spawn it, send requests, read events.

`EngineClient.start()` starts `python -m chunktui.server` as a fresh
interpreter (nothing of the UI process, and no torch, is inherited; it does
not depend on how the app itself was started) in its own session, joined to
the app by one socket pair that both sides wrap as a `multiprocessing`
Connection. A reader thread receives events: token steps go into the
TokenBuffer (drained by the UI's frame timer), everything else is handed to
`on_event` (the app turns it into a Textual message). When the child dies
(killed, out of memory), `on_died` gets its exit code; the app offers a restart.

`prestart()` spawns that process before the app exists (the CLI calls it
before importing Textual), so torch is imported while the screen is built;
the app's first `start()` adopts it.

`mode="thread"` runs the same server in a thread of this process over the
same pipe (tests use it: the protocol and the app are exercised unchanged,
without paying a torch import per app instance).
"""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from chunktui.shared import protocol as p
from chunktui.tui.token_buffer import TokenBuffer

# Events the reader thread puts straight into the TokenBuffer (drained at the frame rate), not posted one by one.
BUFFERED = (p.Tokens,)

from chunktui.tui.early import _EARLY, _end_unadopted, _spawn, engine_log_path, prestart  # noqa: F401 (re-exported)


class EngineClient:
    def __init__(self, on_event: Callable[[object], None], on_died: Callable[[int | None], None],
                 buffer: TokenBuffer, mode: str = "process", threads: int | None = None,
                 log_path: Path | None = None) -> None:
        self.on_event, self.on_died, self.buffer = on_event, on_died, buffer
        self.mode, self.threads, self.log_path = mode, threads, log_path
        self.process = None
        self.conn = None
        self._send_lock = threading.Lock()
        self._closing = False
        self.generation = 0  # bumped on every (re)start: events of an old engine are ignored

    @property
    def alive(self) -> bool:
        if self.conn is None:
            return False
        return self.process.poll() is None if self.process is not None else True

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        from chunktui.server import child_main  # no heavy imports at its top

        self.generation += 1
        self._closing = False
        if self.mode == "thread":
            parent, child = multiprocessing.Pipe(duplex=True)
            threading.Thread(target=child_main, args=(child, self.threads, True), daemon=True,
                             name="chunktui-engine").start()
            self.process = None
        else:
            early = _EARLY.pop("engine", None)
            if early is not None and early[0] == self.threads and early[1].poll() is None:
                _, self.process, ours = early  # started by `prestart` while the app was being built
            else:
                if early is not None:
                    _EARLY["engine"] = early
                    _end_unadopted()
                self.process, ours = _spawn(self.threads, self.log_path)
            parent = Connection(ours.detach())
        self.conn = parent
        threading.Thread(target=self._read, args=(parent, self.generation), daemon=True,
                         name="chunktui-engine-reader").start()

    def send(self, request) -> bool:
        """Send a request; False (and on_died) when the engine is gone."""
        with self._send_lock:
            if self.conn is None:
                return False
            try:
                self.conn.send(request)
                return True
            except (BrokenPipeError, EOFError, OSError):
                return False

    def _read(self, conn, generation: int) -> None:
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                break
            except Exception as err:  # an event that did not unpickle: say so, keep reading
                self.on_event(p.Failed("Engine message lost", f"{type(err).__name__}: {err}"))
                continue
            if generation != self.generation:
                return
            if isinstance(event, BUFFERED):
                self.buffer.push(event.trace_id, event.steps)
            else:
                self.on_event(event)
        if generation == self.generation and not self._closing:
            code = None
            if self.process is not None:
                try:
                    code = self.process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    code = None
            self.conn = None
            self.on_died(code)

    def kill(self) -> None:
        """For tests and the benchmark: end the engine as an out-of-memory kill would."""
        if self.process is not None:
            self.process.kill()

    def stop(self, timeout: float = 3.0) -> None:
        self._closing = True
        self.send(p.Shutdown())
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    self.process.kill()
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None
