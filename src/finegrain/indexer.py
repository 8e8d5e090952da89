"""Adding images to an index: walk -> skip unchanged -> decode -> encode -> commit.

Work is committed in chunks (``commit_every`` images): each commit writes
the chunk's vector files, then one SQLite transaction records the images, the
failures and the chunk. A killed run keeps every finished commit; the next
run skips those files by path, size and mtime (or by content hash when only
the mtime changed) and does the rest. A run asked to stop (``stop``, set by
the CLI on Ctrl-C/SIGTERM) commits what it has encoded and returns early.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import fields as _fields
from .exif import read_meta
from .fields import Decoded, FieldExtractor
from .heap import map_large_blocks, release_free_memory
from .images import (
    MAX_FILE_BYTES,
    ImageLoadError,
    is_image_path,
    load_image_sized,
    read_file_safely,
    unsupported_image_reason,
)
from .parallel import ordered_map, spare_cores
from .progress import progress_bar
from .store.catalog import ImageRecord, NewImage
from .store.records import LiveByPath
from .store.vectors import FieldRows

if TYPE_CHECKING:  # pragma: no cover
    from .store.writer import Writer

__all__ = ["MAX_FILE_BYTES", "IndexReport", "Indexer", "collect_files", "printable_path"]


@dataclass
class IndexReport:
    """Summary of one :meth:`Index.add` run."""

    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    stopped: bool = False  # asked to stop: the files not reached are left for the next run

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"indexed": self.indexed, "unchanged": self.unchanged, "removed": self.removed,
                "failed": len(self.failed), "failures": [{"path": p, "reason": r} for p, r in self.failed],
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 2),
                "stopped": self.stopped}


@dataclass
class Prepared:
    """A decoded candidate (``payloads``: one per field extractor, by key), a file whose content
    did not change (neither set) or a failure (``error`` set)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    width: int = 0
    height: int = 0
    payloads: dict[str, Any] | None = None
    error: str | None = None
    replaces: int | None = None  # the indexed image id this file's new content replaces
    meta: dict[str, Any] | None = None  # capture date, camera, EXIF orientation (finegrain.exif.read_meta)


def collect_files(inputs: Iterable[str | os.PathLike], recursive: bool = True
                  ) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``inputs`` (folders walked, files taken as given), sorted, plus walk errors."""
    files: set[str] = set()
    problems: list[tuple[str, str]] = []

    def on_error(e: OSError) -> None:
        problems.append((printable_path(str(e.filename)), f"cannot list folder: {e.strerror}"))

    for item in inputs:
        path = Path(os.path.abspath(item))
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=False, onerror=on_error):
                dirnames.sort()
                if not recursive:
                    dirnames.clear()
                for name in filenames:
                    candidate = Path(dirpath) / name
                    if is_image_path(candidate):
                        files.add(str(candidate))
                    elif (reason := unsupported_image_reason(candidate)) is not None:
                        problems.append((printable_path(str(candidate)), reason))
        elif path.exists() or path.is_symlink():
            files.add(str(path))
        else:
            problems.append((printable_path(str(path)), "no such file or folder"))
    return sorted(files), problems


def printable_path(path: str) -> str:
    """``path`` as valid UTF-8 text: undecodable bytes of a file name (``os.fsdecode`` surrogates) as ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def prepare_file(path: str, encoder, known: ImageRecord | None, extractors: Sequence[FieldExtractor]) -> Prepared:
    """Stat, read, hash and decode one file, then run every extractor's ``prepare`` (in a worker thread or task).

    The image is decoded once, at the largest draft size any extractor asks
    for; an extractor that fails on it makes the file one failure, with a reason.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # recorded under a printable form: the catalog (and terminals) need UTF-8
        return Prepared(printable_path(path), 0, 0, error="file name is not valid UTF-8")
    try:
        st = os.stat(path)  # follows symlinks: a broken or looping link fails here
    except OSError as exc:
        reason = "broken or looping symlink" if os.path.islink(path) else f"cannot stat: {exc.strerror}"
        return Prepared(path, 0, 0, error=reason)
    item = Prepared(path, st.st_size, st.st_mtime_ns)
    if not os.path.isfile(path):
        item.error = "not a regular file"
    elif st.st_size == 0:
        item.error = "empty file"
    elif st.st_size > MAX_FILE_BYTES:
        item.error = f"file is larger than {MAX_FILE_BYTES // 2**20} MiB"
    if item.error:
        return item
    try:  # the file may have been replaced since the checks above (by a FIFO, say): checked again on the descriptor
        data = read_file_safely(path)
    except ImageLoadError as exc:
        item.error = str(exc)
        return item
    item.sha256 = hashlib.sha256(data).hexdigest()
    if known is not None and known.status == "indexed" and known.sha256 == item.sha256:
        return item  # content unchanged: no need to decode
    sides = [s for s in (ex.decode_side(encoder) for ex in extractors) if s is not None]
    try:
        image, (item.width, item.height) = load_image_sized(data, draft_size=max(sides) if sides else None)
    except ImageLoadError as exc:
        item.error = str(exc)
        return item
    decoded = Decoded(path, data, image, item.width, item.height)
    item.meta = read_meta(data, st.st_mtime_ns)  # the header of the bytes already read: no second file read
    payloads: dict[str, Any] = {}
    for ex in extractors:
        try:
            payloads[ex.key] = ex.prepare(decoded, encoder)
        except Exception as exc:  # noqa: BLE001 - any extractor's failure is one skipped file
            item.error = f"{ex.label} failed: {exc}"
            return item
    item.payloads = payloads
    return item


class Indexer:
    """Runs one add/update pass over files through an index's :class:`~finegrain.store.writer.Writer`."""

    def __init__(self, writer: Writer, batch_size: int = 32, commit_every: int = 512, workers: int | None = None,
                 commit_seconds: float = 60.0, stop: threading.Event | None = None,
                 on_commit: Callable[[int], None] | None = None):
        self.writer = writer
        self.stop = stop  # set from outside (a signal handler): commit what is encoded and return
        self.on_commit = on_commit  # called after every commit with the images it added (progress, probes)
        self.batch_size = batch_size
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds  # also commit this often: a slow run killed early keeps its work
        self.workers = spare_cores(torch.get_num_threads()) if workers is None else workers

    def extractors(self) -> list[FieldExtractor]:
        """The field extractors of the index's settings (``global`` first), fresh for one run."""
        return _fields.build(self.writer.catalog.get_meta, self.writer.path)

    def run(self, inputs: Sequence[str | os.PathLike], recursive: bool = True, remove_missing: bool = False,
            show_progress: bool = True) -> IndexReport:
        t0 = time.perf_counter()
        report, files, known, todo = self.plan(inputs, recursive)
        if not todo:  # nothing to decode: do not even load the model
            return self._finish(report, inputs, files, known, remove_missing, t0)
        extractors = self.extractors()
        for ex in extractors:
            if ex.needs_fit:  # learned state (the local whitening): fitted once, before anything is prepared
                ex.fit(todo, show_progress)
        encoder = self.writer.encoder
        map_large_blocks()  # big per-batch buffers go back to the OS when freed instead of fragmenting the heap
        pending = Pending(extractors)
        last_commit = time.monotonic()
        with progress_bar(len(todo), "indexing", show_progress) as bar:
            prepared = ordered_map(lambda p: prepare_file(p, encoder, known.get(p), extractors), todo,
                                   self.workers, 2 * self.batch_size)
            for item in prepared:
                if self.stopping():
                    pending.batch = []  # decoded, not encoded: cheaper to redo next run than to encode now
                    report.stopped = True
                    break
                rec = known.get(item.path)
                if item.error is not None:
                    report.failed.append((item.path, item.error))
                    pending.failures.append(item)
                elif item.payloads is None:  # same content, new mtime
                    assert rec is not None  # only a known file is compared by content
                    report.unchanged += 1
                    pending.touches.append((rec.id, item.mtime_ns))
                else:
                    if rec is not None and rec.status == "indexed":
                        item.replaces = rec.id  # content changed: replace the old entry
                    pending.add(item)
                    if len(pending.batch) >= self.batch_size:
                        report.failed.extend((f.path, f.error or "") for f in pending.encode(encoder))
                if pending.count() >= self.commit_every or (
                        pending.count() and time.monotonic() - last_commit >= self.commit_seconds):
                    report.indexed += self._commit(pending, report)
                    pending = Pending(extractors)
                    last_commit = time.monotonic()
                bar.advance(1)
            prepared.close()  # a stopped run: do not decode the read-ahead
            report.indexed += self._commit(pending, report)
        return self._finish(report, inputs, files, known, remove_missing, t0)

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def plan(self, inputs: Sequence[str | os.PathLike], recursive: bool = True
             ) -> tuple[IndexReport, list[str], LiveByPath, list[str]]:
        """Walk ``inputs``: (report so far, all files found, live records by path, files to (re)process)."""
        report = IndexReport()
        files, problems = collect_files(inputs, recursive)
        report.failed.extend(problems)
        known = self.writer.catalog.live_by_path()
        todo = changed_files(files, known)
        report.unchanged += len(files) - len(todo)
        return report, files, known, todo

    def _finish(self, report: IndexReport, inputs, files, known, remove_missing: bool, t0: float) -> IndexReport:
        if remove_missing:  # failures of non-UTF-8 names are recorded under their printable form
            report.removed = self._remove_missing(inputs, set(files) | {printable_path(f) for f in files}, known)
        report.seconds = time.perf_counter() - t0
        return report

    def _commit(self, pending: Pending, report: IndexReport) -> int:
        if pending.empty():
            return 0
        report.failed.extend((f.path, f.error or "") for f in pending.encode(self.writer.encoder))
        added = self.writer.commit(pending.images, pending.field_rows(), pending.failures, pending.touches,
                                   pending.removals)
        pending.clear()
        release_free_memory()  # else the fragmented heap keeps growing the process over a long run
        self.after_commit(added)
        return added

    def after_commit(self, added: int) -> None:
        """After every commit (both engines): hand the images it added to ``on_commit``."""
        if self.on_commit is not None:
            self.on_commit(added)

    def _remove_missing(self, inputs, found: set[str], known: Mapping[str, ImageRecord]) -> int:
        roots = [os.path.abspath(p) for p in inputs if os.path.isdir(p)]
        gone = [rec for path, rec in known.items() if path not in found
                and any(path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)]
        if not gone:
            return 0
        with self.writer.catalog.transaction() as tx:
            tx.remove([r.id for r in gone if r.status == "indexed"])
            for rec in gone:
                if rec.status == "failed":
                    tx.clear_failure(rec.path)
        return sum(r.status == "indexed" for r in gone)


class Pending:
    """What the next commit will write: prepared images are encoded a batch at a time by every extractor."""

    def __init__(self, extractors: Sequence[FieldExtractor]):
        self.extractors = list(extractors)
        self.images: list[NewImage] = []  # encoded images, in input order
        self.results: dict[str, list[Any]] = {ex.key: [] for ex in self.extractors}  # per extractor, per image
        self.batch: list[Prepared] = []  # prepared, not encoded yet
        self.failures: list[Prepared] = []
        self.touches: list[tuple[int, int]] = []
        self.removals: list[int] = []

    def add(self, item: Prepared) -> None:
        self.batch.append(item)

    def count(self) -> int:
        """Images this commit will hold once the batch is encoded."""
        return len(self.images) + len(self.batch)

    def encode(self, encoder) -> list[Prepared]:
        """Encode the batch with every extractor; returns the items that failed (now in :attr:`failures`).

        An extractor that fails on the batch is retried one image at a time,
        so a failure costs only the image that caused it.
        """
        items, self.batch = self.batch, []
        if not items:
            return []
        errors: dict[int, str] = {}
        results: dict[str, list[Any]] = {}
        for ex in self.extractors:
            payloads = [it.payloads[ex.key] for it in items]  # type: ignore[index]
            try:
                results[ex.key] = _checked(ex, ex.encode(encoder, payloads), len(payloads))
            except Exception:  # noqa: BLE001 - find the image(s) it fails on
                results[ex.key] = []
                for j, payload in enumerate(payloads):
                    try:
                        results[ex.key] += _checked(ex, ex.encode(encoder, [payload]), 1)
                    except Exception as exc:  # noqa: BLE001 - any extractor's failure is one skipped file
                        results[ex.key].append(None)
                        errors.setdefault(j, f"{ex.label} failed: {exc}")
        failed = []
        for j, it in enumerate(items):
            it.payloads = None  # decoded pixels are not needed any more
            if j in errors:
                it.error = errors[j]
                failed.append(it)
                continue
            self.images.append(NewImage(it.path, it.sha256 or "", it.size, it.mtime_ns, it.width, it.height, it.meta))
            if it.replaces is not None:
                self.removals.append(it.replaces)
            for ex in self.extractors:
                self.results[ex.key].append(results[ex.key][j])
        self.failures.extend(failed)
        return failed

    def field_rows(self) -> dict[str, FieldRows]:
        """Every vector field of the encoded images; rows are owned by the image's position in ``images``."""
        if not self.images:
            return {}
        owners = np.arange(len(self.images), dtype=np.int64)
        out: dict[str, FieldRows] = {}
        for ex in self.extractors:
            out.update(ex.rows(self.results[ex.key], owners))
        return out

    def empty(self) -> bool:
        return not (self.images or self.batch or self.failures or self.touches or self.removals)

    def clear(self) -> None:
        """Drop the committed rows now, so the memory they held can go back to the OS."""
        self.images, self.batch, self.failures, self.touches, self.removals = [], [], [], [], []
        self.results = {key: [] for key in self.results}


def _checked(ex: FieldExtractor, results: list, n: int) -> list:
    if len(results) != n:
        raise RuntimeError(f"the {ex.key} extractor returned {len(results)} results for {n} images")
    return list(results)


def changed_files(files: Sequence[str], live: LiveByPath) -> list[str]:
    """The files a run must (re)process, in order: not indexed, or indexed with another size or mtime (the quick
    test that decides without reading a file; the watcher's scan uses it too)."""
    sizes, mtimes, stat_known = live.stat_columns()
    return [path for path, row in zip(files, live.indexed_rows(files).tolist())
            if not (row >= 0 and stat_known[row] and _same_stat(path, int(sizes[row]), int(mtimes[row])))]


def _same_stat(path: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns
