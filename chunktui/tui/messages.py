"""Messages workers send back to the app (posted from worker threads; Textual queues them safely)."""

from __future__ import annotations

from textual.message import Message


class ModelLoaded(Message):
    def __init__(self, loaded) -> None:
        super().__init__()
        self.loaded = loaded


class LoadProgress(Message):
    def __init__(self, stage: str, fraction: float | None, text: str) -> None:
        super().__init__()
        self.stage = stage
        self.fraction = fraction
        self.text = text


class DictionariesListed(Message):
    """Candidate dictionaries, each with the reason it cannot be used (None if it can)."""

    def __init__(self, entries: list[tuple[str, str | None, object]], select: str | None) -> None:
        super().__init__()
        self.entries = entries  # (path, problem or None, ChunkDictionary or None)
        self.select = select


class TraceFinished(Message):
    def __init__(self, trace, reason: str | None) -> None:
        super().__init__()
        self.trace = trace
        self.reason = reason


class RunFinished(Message):
    def __init__(self, run: dict) -> None:
        super().__init__()
        self.run = run


class TaskFailed(Message):
    """Any failure in a worker: shown as a notification, the app carries on."""

    def __init__(self, title: str, text: str, severity: str = "error") -> None:
        super().__init__()
        self.title = title
        self.text = text
        self.severity = severity
