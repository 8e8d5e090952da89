"""Lease counting for what the service swaps while requests use it (an index, a shard set).

A request leases the current object for its whole run; a reload swaps in a new
one without waiting, and the replaced object is closed when its last lease
ends, so no request ever sees an object closed under it or half reloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class _Entry(Generic[T]):
    __slots__ = ("value", "close", "users", "retired", "closed")

    def __init__(self, value: T, close: Callable[[T], None]):
        self.value = value
        self.close = close
        self.users = 0
        self.retired = False
        self.closed = False

    def take_close(self) -> bool:
        """Whether to close now (retired, unused, not closed yet); marks it closed. Call under the lock."""
        close = self.retired and self.users == 0 and not self.closed
        self.closed = self.closed or close
        return close


class Leases(Generic[T]):
    """The current object and its lease counts.

    Parameters
    ----------
    value:
        The first current object.
    close:
        Called once on an object after it was replaced (or retired) and its last lease ended.
    """

    def __init__(self, value: T, close: Callable[[T], None]):
        self._lock = threading.Lock()
        self._entry = _Entry(value, close)

    @property
    def current(self) -> T:
        return self._entry.value

    @contextmanager
    def lease(self) -> Iterator[T]:
        """The current object, held open until the block ends."""
        with self._lock:
            entry = self._entry
            entry.users += 1
        try:
            yield entry.value
        finally:
            with self._lock:
                entry.users -= 1
                close = entry.take_close()
            if close:
                entry.close(entry.value)

    def swap(self, value: T, close: Callable[[T], None] | None = None) -> None:
        """Make ``value`` current (closed with ``close``, default the previous one's); retire the old one."""
        with self._lock:
            old = self._entry
            self._entry = _Entry(value, close or old.close)
        self._retire(old)

    def retire(self) -> None:
        """Close the current object once its leases end (the holder is closing)."""
        self._retire(self._entry)

    def _retire(self, entry: _Entry[T]) -> None:
        with self._lock:
            entry.retired = True
            close = entry.take_close()
        if close:
            entry.close(entry.value)
