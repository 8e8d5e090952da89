"""Ctrl-C and SIGTERM for long commands: the first asks for a clean stop, a second one interrupts.

A long ``finegrain index`` run should end on Ctrl-C (or a service manager's
SIGTERM) with its encoded work committed, a summary, and an exit code that
says it was stopped, not with a traceback. The command passes the event to the
work, which checks it between steps; an impatient second signal raises
``KeyboardInterrupt`` at once (the store is crash-safe: finished commits stay).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StopRequest", "stop_on_signals"]


class StopRequest(threading.Event):
    """An event set by the first SIGINT/SIGTERM; ``signum`` says which (None while not set)."""

    signum: int | None = None

    def exit_code(self) -> int:
        """The shell's convention for a process ended by the signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + (self.signum or signal.SIGINT)


@contextmanager
def stop_on_signals(on_first: Callable[[int], None] | None = None) -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the yielded event; the previous handlers come back after.

    ``on_first(signum)`` runs once, on the first signal (to tell the user what happens now). Outside the main
    thread signals cannot be caught, and the event is simply never set.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()
        if on_first is not None:
            on_first(signum)

    # A SIGINT the parent set to be ignored stays ignored (a shell's `cmd &` in a script does that, so a Ctrl-C
    # meant for the foreground job does not reach background ones); Python itself keeps that convention.
    caught = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, handler) for s in caught}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
