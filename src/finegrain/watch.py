"""``finegrain watch``: keep an index current while files are added, changed, moved or deleted.

Flow::

    watchdog observer (inotify/FSEvents/..., or polling for network mounts)
      -> changed paths (a thread-safe set; directories too)
      -> settle: a file is taken once its size and mtime have not changed for
         ``settle`` seconds (files still being copied in wait)
      -> batch: committed after ``quiet`` seconds without events, or once
         ``max_batch`` files are ready, or when the oldest change waited ``max_wait``
      -> Writer.move (a settled file with the content of an indexed image at a
         vanished path: renamed or moved, vectors kept), Index.remove (paths
         that vanished) and Index.add (other files that settled), all through
         the index's writer: one log line per commit.

Start-up runs a catch-up scan *after* the observer is started (vanished
files removed, new and changed ones added ``max_batch`` at a time, like
``finegrain index --remove-missing``), so a watch that was killed (even by
SIGKILL: every commit is atomic, see ``store/writer.py``) catches up on what
changed while it was down, and nothing that changes during the scan is
missed. SIGINT/SIGTERM stop the loop (and the scan) between commits; the
files that have settled are committed first.
A served index (``finegrain serve``) sees each commit as a new catalog
generation and re-opens it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import ImageLoadError, is_image_path, read_file_safely
from .index import Index, IndexLockedError
from .indexer import IndexReport, changed_files, collect_files, printable_path
from .store.records import LiveByPath

Stat = tuple[int, int]  # (size, mtime_ns)


@dataclass
class WatchCommit:
    """What one commit of the watch changed (one log line)."""

    indexed: int = 0
    moved: int = 0  # moved or renamed: vectors kept, path updated
    removed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    generation: int = 0
    images: int = 0
    seconds: float = 0.0
    kind: str = "commit"  # "scan" for the start-up catch-up

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "indexed": self.indexed, "moved": self.moved, "removed": self.removed,
                "unchanged": self.unchanged,
                "failed": len(self.failed), "failures": [{"path": p, "reason": r} for p, r in self.failed],
                "generation": self.generation, "images": self.images, "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        return (f"{self.kind}: indexed {self.indexed}, moved {self.moved}, removed {self.removed}, "
                f"failed {len(self.failed)}, unchanged {self.unchanged} in {self.seconds:.1f}s; "
                f"generation {self.generation}, {self.images} images")


@dataclass
class _Change:
    first: float  # when the first event for this path arrived (for max_wait)
    stat: Stat | None = None  # last observed (size, mtime); None: observe again
    seen: float = 0.0  # when ``stat`` was observed


class ChangeSet:
    """Paths with pending changes, fed by observer threads, drained by the watch loop (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._changes: dict[str, _Change] = {}
        self.last_event = float("-inf")

    def touch(self, path: str) -> None:
        """An event for ``path``: it must settle again before it is indexed."""
        now = self.clock()
        with self._lock:
            change = self._changes.get(path)
            if change is None:
                self._changes[path] = _Change(first=now)
            else:
                change.stat = None
            self.last_event = now

    def __len__(self) -> int:
        with self._lock:
            return len(self._changes)

    def oldest(self) -> float | None:
        with self._lock:
            return min((c.first for c in self._changes.values()), default=None)

    def take(self, settle: float, limit: int | None = None, hold: float = 0.0) -> tuple[list[str], list[str]]:
        """(files whose size and mtime held still for ``settle`` seconds, paths that are gone), removed from the set.

        Directories that appeared are expanded into their image files (which
        then settle like any other); files still changing stay for later.
        Vanished paths are held back while other files settle, for at most
        ``hold`` seconds, so both ends of a move land in the same batch.
        """
        now = self.clock()
        with self._lock:
            paths = list(self._changes)
        ready: list[str] = []
        gone: list[str] = []
        expanded: list[str] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                gone.append(path)
                continue
            if os.path.isdir(path):
                files, _ = collect_files([path])
                expanded.extend(files)
                with self._lock:
                    self._changes.pop(path, None)
                continue
            if not is_image_path(Path(path)):  # a suffix-less event path that turned out to be a plain file
                with self._lock:
                    self._changes.pop(path, None)
                continue
            current = (st.st_size, st.st_mtime_ns)
            with self._lock:
                change = self._changes.get(path)
                if change is None:
                    continue
                if change.stat == current and now - change.seen >= settle and (limit is None or len(ready) < limit):
                    ready.append(path)
                    del self._changes[path]
                elif change.stat != current:
                    change.stat, change.seen = current, now
        with self._lock:
            gone_set = set(gone)
            settling = expanded or any(p not in gone_set for p in self._changes)
            oldest_gone = min((self._changes[p].first for p in gone if p in self._changes), default=now)
            if gone and settling and now - oldest_gone < hold:
                gone = []  # files still settling may be the other end of a move: removed with them, not before
            for path in gone:
                self._changes.pop(path, None)
            for path in expanded:
                if path not in self._changes:
                    self._changes[path] = _Change(first=now, stat=_stat(path), seen=now)
        return ready, gone


def _at_or_under(gone: Sequence[str]) -> Callable[[str], bool]:
    """Whether a path is one of the vanished paths ``gone`` or lies under one of them (a vanished folder)."""
    exact, prefixes = set(gone), tuple(p.rstrip(os.sep) + os.sep for p in gone)
    return lambda path: path in exact or path.startswith(prefixes)


def _stat(path: str) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class Watcher:
    """Keeps ``index`` current with the image files under ``roots``.

    Parameters
    ----------
    index:
        An open :class:`~finegrain.Index` (the watch is its only writer while
        it commits; another writer makes it retry later).
    roots:
        Folders to watch (recursively).
    poll:
        Use watchdog's polling observer (stat the tree every ``interval``
        seconds) instead of the platform's events: for network mounts (NFS,
        SMB) and other file systems that send no events.
    quiet:
        Commit after this many seconds without events.
    settle:
        A file is indexed once its size and mtime stayed the same for this
        long (a file still being written or copied waits).
    max_batch:
        Commit as soon as this many files are ready, even while events continue.
    max_wait:
        Commit what is ready once the oldest pending change is this old, even
        while events continue (a folder that never goes quiet).
    log:
        Called with each :class:`WatchCommit` (one per commit).
    """

    def __init__(self, index: Index, roots: Sequence[str | os.PathLike], *, poll: bool = False,
                 interval: float = 1.0, quiet: float = 2.0, settle: float = 1.0, max_batch: int = 256,
                 max_wait: float = 30.0, batch_size: int = 32, log: Callable[[WatchCommit], None] | None = None):
        for name, value in (("interval", interval), ("quiet", quiet), ("settle", settle), ("max_wait", max_wait)):
            if not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0 (got {value})")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.index = index
        self.roots = [os.path.abspath(r) for r in roots]
        for root in self.roots:
            if not os.path.isdir(root):
                raise FileNotFoundError(f"cannot watch {root}: not a folder")
        self.poll, self.interval = poll, interval
        self.quiet, self.settle, self.max_batch, self.max_wait = quiet, settle, max_batch, max_wait
        self.batch_size = batch_size
        self.log = log or (lambda c: None)
        self.changes = ChangeSet()
        self._index_dir = os.path.abspath(index.path) + os.sep
        self._retry_at = 0.0

    # ------------------------------------------------------------- events
    def wanted(self, path: str) -> bool:
        """Whether an event path can matter: image files and folders, never the index's own files."""
        if (path + os.sep).startswith(self._index_dir):
            return False
        return is_image_path(Path(path)) or os.path.isdir(path) or not Path(path).suffix

    @contextmanager
    def observing(self) -> Iterator[Any]:
        """Run a watchdog observer over the roots for the duration of the block."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        changes, wanted = self.changes, self.wanted

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                if event.is_directory and event.event_type == "modified":
                    return  # a folder's own listing changed: its files send their own events
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    path = os.fsdecode(raw) if raw else ""
                    if path and (event.is_directory or wanted(path)):
                        changes.touch(path)

        observer = PollingObserver(timeout=self.interval) if self.poll else Observer()
        for root in self.roots:
            observer.schedule(Handler(), root, recursive=True)
        observer.start()
        try:
            yield observer
        finally:
            observer.stop()
            observer.join(timeout=10)

    # ------------------------------------------------------------ commits
    def scan(self, stop: threading.Event | None = None) -> Iterator[WatchCommit]:
        """Catch up with the roots: remove what vanished, then add what is new or changed, ``max_batch`` at a time.

        Yields one :class:`WatchCommit` per commit (at least one). ``stop`` is
        checked between commits, so a first scan of a large tree can be
        stopped (what was committed is kept; the next scan goes on from there).
        """
        t0 = time.perf_counter()
        files, problems = collect_files(self.roots)
        found = set(files) | {printable_path(f) for f in files}  # failures of odd names carry the printable form
        under = tuple(r.rstrip(os.sep) + os.sep for r in self.roots)
        self.index.refresh()
        # the snapshot's columns, not records: a scan of a 10^6-image library builds no record objects
        live = LiveByPath(self.index.records, {})
        gone = [p for p in live if p.startswith(under) and p not in found]
        gone += [r.path for r in self.index.failures() if r.path.startswith(under) and r.path not in found]
        removed = self._remove(gone)
        todo = changed_files(files, live)
        first = IndexReport(failed=list(problems))
        if not todo:
            yield self._done(first, removed, t0, "scan")
            return
        for start in range(0, len(todo), self.max_batch):
            if stop is not None and stop.is_set():
                return
            report = self.index.add(todo[start:start + self.max_batch], batch_size=self.batch_size)
            self._forget_vanished(report)
            if start == 0:
                report.failed = first.failed + report.failed
            report.unchanged += (len(files) - len(todo)) if start == 0 else 0
            yield self._done(report, removed if start == 0 else 0, t0, "scan")
            t0 = time.perf_counter()

    def due(self) -> bool:
        """Whether pending changes should be looked at now (quiet, a full batch, or waited too long)."""
        now = self.changes.clock()
        if not len(self.changes) or now < self._retry_at:
            return False
        oldest = self.changes.oldest()
        return (now - self.changes.last_event >= self.quiet or len(self.changes) >= self.max_batch
                or (oldest is not None and now - oldest >= self.max_wait))

    def commit(self) -> WatchCommit | None:
        """Commit the changes that are ready; None when nothing was (files still settling)."""
        ready, gone = self.changes.take(self.settle, self.max_batch, hold=self.max_wait)
        if not ready and not gone:
            return None
        t0 = time.perf_counter()
        moved = 0
        try:
            moves = self._find_moves(gone, ready)
            if moves:
                with self.index.writer() as writer:
                    moved = writer.move(moves)
                arrived = {path for _, path, _ in moves}
                ready = [p for p in ready if p not in arrived]
            removed = self._remove(gone)
            report = self.index.add(ready, batch_size=self.batch_size) if ready else IndexReport()
            self._forget_vanished(report)
        except IndexLockedError:  # another writer (finegrain index): try again shortly
            for path in ready + gone:
                self.changes.touch(path)
            self._retry_at = self.changes.clock() + max(self.quiet, 1.0)
            return None
        commit = self._done(report, removed, t0, "commit")
        commit.moved = moved
        if commit.indexed or commit.moved or commit.removed or commit.failed:  # unchanged files commit nothing
            self.log(commit)
        return commit

    def _find_moves(self, gone: Sequence[str], ready: Sequence[str]) -> list[tuple[int, str, int]]:
        """(image id, new path, mtime) for each ready file whose content is an indexed image at a vanished path.

        A move or rename then keeps the image's vectors (and id) instead of
        being encoded again: candidates match by size first, then SHA-256.
        """
        if not gone or not ready:
            return []
        self.index.refresh()
        vanished = _at_or_under(gone)
        candidates: dict[int, list[Any]] = {}
        records = self.index.records
        for row, path in enumerate(records.paths()):
            if not vanished(path):
                continue
            rec = records.record_at(row)
            if rec.sha256 and rec.size is not None:
                candidates.setdefault(rec.size, []).append(rec)
        moves: list[tuple[int, str, int]] = []
        taken: set[int] = set()
        for path in ready:
            st = _stat(path)
            if st is None or st[0] not in candidates:
                continue
            try:
                digest = hashlib.sha256(read_file_safely(path)).hexdigest()
            except ImageLoadError:
                continue
            for rec in candidates[st[0]]:
                if rec.id not in taken and rec.sha256 == digest:
                    moves.append((rec.id, path, st[1]))
                    taken.add(rec.id)
                    break
        return moves

    def _remove(self, gone: Sequence[str]) -> int:
        """Remove the indexed images at (or, for a folder, under) the vanished paths, and their failure rows."""
        if not gone:
            return 0
        self.index.refresh()
        vanished = _at_or_under(gone)
        records = self.index.records
        ids = [int(records.ids[row]) for row, path in enumerate(records.paths()) if vanished(path)]
        failed = [r.path for r in self.index.failures() if vanished(r.path)]
        self._clear_failures(failed)
        return self.index.remove(ids) if ids else 0

    def _forget_vanished(self, report: IndexReport) -> None:
        """Files deleted between settling and reading are gone, not failures (their own event removes the rest)."""
        vanished = [p for p, _ in report.failed if not os.path.lexists(p)]
        if vanished:
            self._clear_failures(vanished)
            report.failed = [(p, r) for p, r in report.failed if os.path.lexists(p)]

    def _clear_failures(self, paths: Sequence[str]) -> None:
        if not paths:
            return
        with self.index.writer() as writer, writer.catalog.transaction() as tx:
            for path in paths:
                tx.clear_failure(path)

    def _done(self, report: IndexReport, removed: int, t0: float, kind: str) -> WatchCommit:
        return WatchCommit(indexed=report.indexed, removed=removed + report.removed, unchanged=report.unchanged,
                           failed=list(report.failed), generation=self.index.generation, images=len(self.index),
                           seconds=time.perf_counter() - t0, kind=kind)

    # --------------------------------------------------------------- loop
    def run(self, stop: threading.Event, scan: bool = True, tick: float = 0.2) -> None:
        """Watch until ``stop`` is set; then commit what has settled and return."""
        self.index.encoder  # noqa: B018 - load the model now: the first commit is not slow, a missing one fails here
        if stop.is_set():
            return
        with self.observing():
            if scan:
                for commit in self.scan(stop):
                    self.log(commit)
            while not stop.wait(tick):
                if self.due():
                    self.commit()
            # Stopping: what settles within one more settle period is committed; files still changing then are
            # left to the next start-up scan.
            if len(self.changes):
                self.commit()
            if len(self.changes):
                time.sleep(self.settle)
                self.commit()


def install_stop_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` (checked between commits) instead of interrupting a commit."""
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
