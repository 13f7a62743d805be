"""Typed dispatch: every protocol message has exactly one handler on the other side, looked up by class."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from chunktui.shared import protocol as p
from chunktui.shared.dispatch import Handlers


def test_every_protocol_class_is_a_request_an_event_or_a_payload():
    classes = {c for _, c in inspect.getmembers(p, inspect.isclass)
               if c.__module__ == p.__name__ and dataclasses.is_dataclass(c)}
    listed = set(p.REQUESTS) | set(p.EVENTS) | set(p.PAYLOADS)
    assert len(listed) == len(p.REQUESTS) + len(p.EVENTS) + len(p.PAYLOADS)  # no class in two lists
    assert classes == listed


def test_every_event_has_exactly_one_app_handler():
    from chunktui.tui.app import ON_EVENT
    from chunktui.tui.engine_client import BUFFERED

    assert not (ON_EVENT.classes & set(BUFFERED))
    assert ON_EVENT.classes | set(BUFFERED) == set(p.EVENTS)


def test_every_request_has_exactly_one_engine_handler():
    from chunktui.server import ANSWERED_AT_ONCE, JOBS

    assert not (ANSWERED_AT_ONCE.classes & JOBS.classes)
    assert ANSWERED_AT_ONCE.classes | JOBS.classes == set(p.REQUESTS)


def test_a_second_handler_for_one_class_is_refused():
    table = Handlers("test")

    @table(p.Memory)
    def first(owner, event):
        owner.append(("first", event))

    with pytest.raises(TypeError, match="Memory has two handlers"):
        @table(p.Memory)
        def second(owner, event):
            pass

    seen: list = []
    table.dispatch(seen, p.Memory(rows=[]))
    assert seen == [("first", p.Memory(rows=[]))]
    with pytest.raises(TypeError, match="no handler for JobDone"):
        table.dispatch(seen, p.JobDone("Load"))


def test_a_renamed_class_still_reaches_its_handler():
    """Keyed by class, not by name: a subclass with another name is not silently taken for its parent."""
    table = Handlers("test")
    seen: list = []
    table(p.JobDone)(lambda owner, event: owner.append(event.request))
    renamed = type("WorkFinished", (p.JobDone,), {})
    table.dispatch(seen, p.JobDone("x"))
    assert seen == ["x"] and not table.handles(renamed("y"))
