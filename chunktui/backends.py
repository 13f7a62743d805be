"""One interface for what the app (and `chunktui.api.Engine`) loads: a language model or the reflection RNN.

A backend streams token events, scans a text, says what it can do, and may
revise a finished stream (the RNN gives every step the chunk of the full
parse once the run is complete). Callers never branch on the kind of model.
"""

from __future__ import annotations

import threading
from typing import Iterator, Protocol

from chunktui.shared.errors import ChunkError
from chunktui.shared.settings import ProgressFn, Sampling


class Backend(Protocol):
    kind: str  # "lm" or "rnn"
    can_perturb: bool
    loaded: object  # LoadedModel or RNNLoaded (name, device, layout.n_states, hidden_size, card(), identity())

    def stream(self, prompt: str, sampling: Sampling, packed, cancel: threading.Event | None,
               chat: bool, rules=None) -> Iterator: ...

    def scan(self, text: str, packed): ...

    def revise(self, steps: list) -> list | None: ...

    def own_dictionary(self): ...

    def suggestions(self) -> tuple[str | None, float | None]: ...


class LanguageModelBackend:
    kind = "lm"
    can_perturb = True

    def __init__(self, loaded) -> None:
        self.loaded = loaded

    def stream(self, prompt, sampling, packed, cancel=None, chat=True, rules=None):
        from chunktui.engine import streaming

        return streaming.generate_stream(self.loaded, prompt, sampling, packed=packed, cancel=cancel, chat=chat,
                                         rules=rules)

    def scan(self, text, packed):
        from chunktui.engine import streaming

        return streaming.scan_text(self.loaded, text, packed)

    def revise(self, steps):
        return None

    def own_dictionary(self):
        return None

    def suggestions(self):
        return None, None


class RNNBackend:
    kind = "rnn"
    can_perturb = False

    def __init__(self, loaded) -> None:
        self.loaded = loaded

    def stream(self, prompt, sampling, packed, cancel=None, chat=True, rules=None):
        from chunktui.rnn.runtime import rnn_stream

        if rules is not None:
            raise ChunkError("Rules act on a language model's chunk matches; the reflection RNN has no rules yet.")
        return rnn_stream(self.loaded, prompt, sampling, cancel=cancel)

    def scan(self, text, packed):
        from chunktui.rnn.runtime import rnn_scan

        return rnn_scan(self.loaded, text)

    def revise(self, steps):
        from chunktui.rnn.runtime import relabel

        relabel(self.loaded, steps)  # the full parse, now that the run is complete (ms)
        return steps

    def own_dictionary(self):
        return self.loaded.dictionary

    def suggestions(self):
        return "ABCDEEGHI", 1.0  # symbols of the task; greedy decoding would only repeat the filler


def load_backend(spec: str, device: str = "auto", dtype: str = "auto",
                 progress: ProgressFn | None = None,
                 placement: dict | None = None) -> Backend:
    """The right backend for a model spec (`rnn:...` trains the reflection RNN; anything else is a language model)."""
    from chunktui.rnn.runtime import is_rnn_spec

    if not spec or not spec.strip():
        raise ChunkError("Name a model (for example smollm2-135m).")
    if is_rnn_spec(spec):
        from chunktui.rnn.runtime import load_rnn

        return RNNBackend(load_rnn(spec, progress=progress))
    from chunktui.engine.models import load_model

    kwargs = {"progress": progress} if progress is not None else {}
    kwargs.update({k: v for k, v in (placement or {}).items() if v})  # device_map, max_memory, offload_folder, offline
    return LanguageModelBackend(load_model(spec, device, dtype, **kwargs))
