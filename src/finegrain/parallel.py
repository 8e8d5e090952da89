"""Order-preserving thread map with bounded read-ahead (decoded images are large)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 2,
                prefetch: int = 64) -> Generator[R, None, None]:
    """Like ``map(fn, items)`` run in ``workers`` threads, keeping at most ``prefetch`` results pending.

    ``Executor.map`` submits everything at once, which for a large folder
    would hold every decoded image in memory before the model consumed it.
    ``workers=0`` runs ``fn`` inline, in the caller's thread.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # closed early (a stopped run, an error): drop the read-ahead instead of waiting for it
            for future in pending:
                future.cancel()


def spare_cores(busy: int) -> int:
    """CPU cores left over when ``busy`` threads already compute (at most 4 decode workers).

    On a small machine decoding inline between forward passes beats decoding
    in parallel threads: a thread that pre-empts one of torch's OpenMP
    workers stalls the whole parallel region.
    """
    return max(0, min(4, (os.cpu_count() or 1) - busy))
