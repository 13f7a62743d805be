"""Handlers keyed by message class, never by a lowercased name: renaming a protocol class fails loudly.

The app (events) and the engine process (requests) each keep a `Handlers` table;
tests check that every protocol message has exactly one handler.
"""

from __future__ import annotations

from typing import Callable


class Handlers:
    """A table message class -> handler function, filled by decorating methods: ``@handlers(p.Memory)``."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._table: dict[type, Callable] = {}

    def __call__(self, *classes: type) -> Callable[[Callable], Callable]:
        def register(fn: Callable) -> Callable:
            for cls in classes:
                if cls in self._table:
                    raise TypeError(f"{self.owner}: {cls.__name__} has two handlers "
                                    f"({self._table[cls].__name__} and {fn.__name__}).")
                self._table[cls] = fn
            return fn
        return register

    @property
    def classes(self) -> frozenset[type]:
        return frozenset(self._table)

    def handles(self, message: object) -> bool:
        return type(message) in self._table

    def dispatch(self, owner: object, message: object) -> None:
        """Call `owner`'s handler for this message's class; a class without one is a TypeError."""
        try:
            fn = self._table[type(message)]
        except KeyError:
            raise TypeError(f"{self.owner} has no handler for {type(message).__name__}.") from None
        fn(owner, message)
