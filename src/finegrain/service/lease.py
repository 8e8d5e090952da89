"""What the service swaps while requests use it (an index, a shard set): lease counts and the reload loop.

A request leases the current object for its whole run; a reload swaps in a new
one without waiting, and the replaced object is closed when its last lease
ends, so no request ever sees an object closed under it or half reloaded.
:class:`ReloadingHolder` is what the index holder and the shard-set holder
share: leasing, the throttled reload check and closing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from .batching import BatchingEncoder

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


class ReloadingHolder(Generic[T]):
    """The service's current object, leased per request and re-opened when it changed on disk.

    A subclass opens the first object, calls ``__init__`` with it, and implements :meth:`_reload` (and
    :meth:`_close_probes` if it keeps catalog connections open to check for changes).
    """

    encoder: BatchingEncoder | None = None

    def __init__(self, first: T, close: Callable[[T], None], reload_interval: float):
        self.reload_interval = float(reload_interval)
        self.reloads = 0
        self._reload_lock = threading.Lock()  # one reload (and the probe connections) at a time
        self._db_lock = threading.Lock()  # the current object's catalog connection (stats)
        self._leases: Leases[T] = Leases(first, close)
        self._next_check = time.monotonic() + self.reload_interval

    @contextmanager
    def use(self) -> Iterator[T]:
        """Lease the current object for one request (checking first whether it changed on disk)."""
        self.maybe_reload()
        with self._leases.lease() as value:
            yield value

    @contextmanager
    def catalog_access(self) -> Iterator[T]:
        """Lease the current object for a request that reads its catalog (one such request at a time)."""
        with self.use() as value, self._db_lock:
            yield value

    def maybe_reload(self, force: bool = False) -> bool:
        """Re-open what changed; returns whether anything did.

        Without ``force`` this is throttled to one check per ``reload_interval``
        and skipped when another thread is already checking. A failed re-open
        (say, a damaged catalog) is logged by :meth:`_reload` and the old object keeps serving.
        """
        if not force and time.monotonic() < self._next_check:
            return False
        if not self._reload_lock.acquire(blocking=force):
            return False
        try:
            self._next_check = time.monotonic() + self.reload_interval
            return self._reload()
        finally:
            self._reload_lock.release()

    def _reload(self) -> bool:
        """Check for changes and swap in a new object if needed (under the reload lock); whether anything changed."""
        raise NotImplementedError

    def _close_probes(self) -> None:
        """Close the connections used to check for changes (under the reload lock)."""

    def close(self) -> None:
        with self._reload_lock:
            self._close_probes()
        if self.encoder is not None:
            self.encoder.close()
        self._leases.retire()
