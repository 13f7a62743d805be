"""Tokens between the engine's reader thread and the UI's frame timer.

The reader thread pushes steps as they arrive (any rate); the UI drains them
once per frame and draws once, so the screen updates at a steady rate
however fast tokens come.
"""

from __future__ import annotations

import threading
import time


class TokenBuffer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: dict[int, list] = {}
        self.arrived = 0  # tokens pushed since the last reset (for the status bar's tok/s)
        self.first_at: float | None = None
        self.last_at: float | None = None

    def push(self, trace_id: int, steps: list) -> None:
        now = time.perf_counter()
        with self._lock:
            self._steps.setdefault(trace_id, []).extend(steps)
            self.arrived += sum(1 for s in steps if s.generated)
            if self.first_at is None:
                self.first_at = now
            self.last_at = now

    def drain(self) -> dict[int, list]:
        """Everything pushed since the last drain, per trace id."""
        with self._lock:
            out, self._steps = self._steps, {}
        return out

    def reset(self) -> None:
        with self._lock:
            self._steps = {}
            self.arrived = 0
            self.first_at = self.last_at = None

    def rate(self, started: float | None) -> float | None:
        """Generated tokens per second since `started` (the request), up to the newest token."""
        with self._lock:
            if not self.arrived or started is None or self.last_at is None or self.last_at <= started:
                return None
            return self.arrived / (self.last_at - started)
