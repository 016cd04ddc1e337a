"""One generic registry for methods, adapters, kernels and tasks.

A lookup of an unknown name raises an error that suggests the closest registered names and lists
all of them, so a typo costs one read of the message.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vtc.errors import UnknownMethodError

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """Return a ' Did you mean ...?' sentence for `name`, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


class Registry(Generic[T]):
    """A name -> object mapping with one registration point and did-you-mean errors.

    Args:
        kind: what the entries are, for error messages ("method", "adapter", ...).
        error: the exception type raised for an unknown name.
    """

    def __init__(self, kind: str, error: type[Exception] = UnknownMethodError) -> None:
        self.kind = kind
        self._error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if not name or name != name.lower() or "." in name:
            raise ValueError(f"{self.kind} names are lower-case and contain no '.', got {name!r}.")
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"a {self.kind} named {name!r} is already registered.")
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove and return the entry `name` (for plugins and tests that register temporary entries)."""
        self.get(name)
        return self._entries.pop(name)

    def decorator(self, name: str) -> Callable[[T], T]:
        """Register the decorated object under `name`."""

        def deco(obj: T) -> T:
            return self.register(name, obj)

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            names = sorted(self._entries)
            raise self._error(
                f"unknown {self.kind} {name!r}.{suggest(name, names)} Registered {self.kind}s: {', '.join(names)}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
