"""Adding images to an index: walk -> skip unchanged -> decode -> encode -> commit.

Work is committed in chunks (``commit_every`` images): each commit writes
the chunk's vector files, then one SQLite transaction records the images, the
failures and the chunk. A killed run keeps every finished commit; the next
run skips those files by path, size and mtime (or by content hash when only
the mtime changed) and does the rest.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .decompose.segments import SegmentConfig, Segments, embed_segments, segment_image
from .images import MAX_FILE_BYTES, ImageLoadError, is_image_path, load_image_sized, read_file_safely, \
    unsupported_image_reason
from .parallel import ordered_map, spare_cores
from .progress import progress_bar
from .store.catalog import ImageRecord, NewImage
from .store.vectors import FieldRows, new_chunk_name, write_chunk
from .compress import indexing as _compress
from .objects.config import ObjectConfig
from .objects.descriptor import OBJECT_DECODE_SIDE, ObjectInputs, prepare_objects
from .objects.indexing import PendingObjects

__all__ = ["MAX_FILE_BYTES", "IndexReport", "Indexer", "collect_files", "commit", "printable_path"]


@dataclass
class IndexReport:
    """Summary of one :meth:`Index.add` run."""

    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"indexed": self.indexed, "unchanged": self.unchanged, "removed": self.removed,
                "failed": len(self.failed), "failures": [{"path": p, "reason": r} for p, r in self.failed],
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 2)}


@dataclass
class _Prepared:
    """A decoded candidate (pixels set) or a failure (error set)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    width: int = 0
    height: int = 0
    pixels: np.ndarray | None = None
    segments: "Segments | None" = None  # with a segment config: SLIC segments and their inputs
    seg_pixels: np.ndarray | None = None  # pool mode: the image prepared at the segment resolution
    image: "Image.Image | None" = None  # crop mode: the decoded image, to crop segments from
    objects: "ObjectInputs | None" = None  # with an object config: proposals, crops and masks
    error: str | None = None


def collect_files(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``inputs`` (folders walked, files taken as given), sorted, plus walk errors."""
    files: set[str] = set()
    problems: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(os.path.abspath(item))
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=False, onerror=lambda e: problems.append((printable_path(str(e.filename)), f"cannot list folder: {e.strerror}"))):
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


def _prepare(path: str, encoder, known: ImageRecord | None, segment_config: SegmentConfig | None = None,
             object_config: ObjectConfig | None = None) -> _Prepared:
    """Stat, read, hash and decode one file (runs in a worker thread)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # recorded under a printable form: the catalog (and terminals) need UTF-8
        return _Prepared(printable_path(path), 0, 0, error="file name is not valid UTF-8")
    try:
        st = os.stat(path)  # follows symlinks: a broken or looping link fails here
    except OSError as exc:
        reason = "broken or looping symlink" if os.path.islink(path) else f"cannot stat: {exc.strerror}"
        return _Prepared(path, 0, 0, error=reason)
    item = _Prepared(path, st.st_size, st.st_mtime_ns)
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
    try:
        draft = encoder.image_size if object_config is None else OBJECT_DECODE_SIDE
        image, (item.width, item.height) = load_image_sized(data, draft_size=draft)
        item.pixels = encoder.prepare_image(image)
    except ImageLoadError as exc:
        item.error = str(exc)
        return item
    if segment_config is not None:
        item.segments = segment_image(image, segment_config)
        if segment_config.embed == "pool":
            item.seg_pixels = encoder.prepare_image(image, segment_config.resolution)
        else:
            item.image = image
    if object_config is not None:
        item.objects = prepare_objects(image, encoder, object_config)
    return item


class Indexer:
    """Runs one add/update pass over files for an open, writable :class:`~finegrain.index.Index`."""

    def __init__(self, index, batch_size: int = 32, commit_every: int = 512, workers: int | None = None,
                 commit_seconds: float = 60.0):
        self.index = index
        self.batch_size = batch_size
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds  # also commit this often: a slow run killed early keeps its work
        self.workers = spare_cores(torch.get_num_threads()) if workers is None else workers

    def run(self, inputs: Sequence[str | os.PathLike], recursive: bool = True, remove_missing: bool = False,
            show_progress: bool = True) -> IndexReport:
        t0 = time.perf_counter()
        report, files, known, todo = self.plan(inputs, recursive)
        obj_config = getattr(self.index, "object_config", None)
        pending = _Pending(self.index.segment_config, obj_config)
        if not todo:  # nothing to decode: do not even load the model
            return self._finish(report, inputs, files, known, remove_missing, t0)
        encoder = self.index.encoder
        seg_config = pending.segment_config
        local = getattr(self.index, "local_store", None)  # local features (L2G), when the index stores them
        if local is not None and not local.fitted:
            local.fit(todo, show_progress)
        last_commit = time.monotonic()
        with progress_bar(len(todo), "indexing", show_progress) as bar:
            prepared = ordered_map(lambda p: _prepare(p, encoder, known.get(p), seg_config, obj_config), todo,
                                   self.workers, 2 * self.batch_size)
            for item in prepared:
                rec = known.get(item.path)
                if item.error is not None:
                    report.failed.append((item.path, item.error))
                    pending.failures.append(item)
                elif item.pixels is None:  # same content, new mtime
                    report.unchanged += 1
                    pending.touches.append((rec.id, item.mtime_ns))
                else:
                    if local is not None:
                        try:
                            pending.local.append(local.extract(item.path))
                        except Exception as exc:  # noqa: BLE001 - any extractor failure is one skipped file
                            item.error = f"local features failed: {exc}"
                            report.failed.append((item.path, item.error))
                            pending.failures.append(item)
                            bar.advance(1)
                            continue
                    if rec is not None and rec.status == "indexed":
                        pending.removals.append(rec.id)  # content changed: replace the old entry
                    pending.add(item)
                    if len(pending.batch) >= self.batch_size:
                        pending.encode(encoder)
                if len(pending.images) >= self.commit_every or (
                        pending.images and time.monotonic() - last_commit >= self.commit_seconds):
                    report.indexed += self._commit(pending)
                    pending = _Pending(seg_config, obj_config)
                    last_commit = time.monotonic()
                bar.advance(1)
            report.indexed += self._commit(pending)
        return self._finish(report, inputs, files, known, remove_missing, t0)

    def plan(self, inputs: Sequence[str | os.PathLike], recursive: bool = True
             ) -> tuple[IndexReport, list[str], dict[str, ImageRecord], list[str]]:
        """Walk ``inputs``: (report so far, all files found, live records by path, files to (re)process)."""
        report = IndexReport()
        files, problems = collect_files(inputs, recursive)
        report.failed.extend(problems)
        known = self.index.catalog.live_by_path()
        todo: list[str] = []
        for path in files:
            rec = known.get(path)
            if rec is not None and rec.status == "indexed" and _same_stat(path, rec):
                report.unchanged += 1
            else:
                todo.append(path)
        return report, files, known, todo

    def _finish(self, report: IndexReport, inputs, files, known, remove_missing: bool, t0: float) -> IndexReport:
        if remove_missing:  # failures of non-UTF-8 names are recorded under their printable form
            report.removed = self._remove_missing(inputs, set(files) | {printable_path(f) for f in files}, known)
        report.seconds = time.perf_counter() - t0
        return report

    def _commit(self, pending: "_Pending") -> int:
        if pending.empty():
            return 0
        pending.encode(self.index.encoder)
        return commit(self.index, pending.images, pending.field_rows(), pending.failures, pending.touches,
                      pending.removals)

    def _remove_missing(self, inputs, found: set[str], known: dict[str, ImageRecord]) -> int:
        roots = [os.path.abspath(p) for p in inputs if os.path.isdir(p)]
        gone = [rec for path, rec in known.items() if path not in found
                and any(path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)]
        if not gone:
            return 0
        with self.index.catalog.transaction() as tx:
            tx.remove([r.id for r in gone if r.status == "indexed"])
            for rec in gone:
                if rec.status == "failed":
                    tx.clear_failure(rec.path)
        return sum(r.status == "indexed" for r in gone)


class _Pending:
    """What the next commit will write."""

    def __init__(self, segment_config: SegmentConfig | None = None, object_config: ObjectConfig | None = None):
        self.segment_config = segment_config
        self.objects = PendingObjects(object_config) if object_config is not None else None
        self.images: list[NewImage] = []
        self.vectors: list[np.ndarray] = []
        self.batch: list[np.ndarray] = []
        self.batch_items: list[_Prepared] = []
        self.segments: list[tuple[Segments, np.ndarray]] = []  # per image, in order
        self.failures: list[_Prepared] = []
        self.touches: list[tuple[int, int]] = []
        self.removals: list[int] = []
        self.local: list = []  # per image, in order: (LocalFeatures, instance descriptor or None)

    def add(self, item: _Prepared) -> None:
        self.images.append(NewImage(item.path, item.sha256, item.size, item.mtime_ns, item.width, item.height))
        self.batch.append(item.pixels)
        self.batch_items.append(item)

    def encode(self, encoder) -> None:
        if not self.batch:
            return
        self.vectors.append(encoder.encode_pixels(np.stack(self.batch)))
        cfg = self.segment_config
        if cfg is not None and cfg.embed == "pool":
            embs = encoder.encode_regions(np.stack([it.seg_pixels for it in self.batch_items]),
                                          [it.segments.masks for it in self.batch_items])
            self.segments.extend((it.segments, e) for it, e in zip(self.batch_items, embs))
        elif cfg is not None:
            self.segments.extend((it.segments, embed_segments(encoder, it.image, it.segments, cfg))
                                 for it in self.batch_items)
        if self.objects is not None:
            self.objects.encode(encoder, [it.objects for it in self.batch_items])
        self.batch, self.batch_items = [], []

    def field_rows(self) -> dict[str, FieldRows]:
        """Every vector field of the encoded images; rows are owned by the image's position in ``images``."""
        if not self.images:
            return {}
        fields = {"global": FieldRows(np.concatenate(self.vectors), np.arange(len(self.images)))}
        if self.segment_config is not None:
            segs = [s for s, _ in self.segments]
            fields["segments"] = FieldRows(
                np.concatenate([e for _, e in self.segments]),
                np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(segs)]),
                {"level": np.concatenate([s.level for s in segs]),
                 "box": np.concatenate([s.box for s in segs]),
                 "area": np.concatenate([s.area for s in segs])},
            )
        if self.local:
            from .local.store import LocalStore

            fields.update(LocalStore.rows(self.local, np.arange(len(self.images))))
        if self.objects is not None:
            fields.update(self.objects.fields(list(range(len(self.images)))))
        return fields

    def empty(self) -> bool:
        return not (self.images or self.failures or self.touches or self.removals)


def commit(index, images: list[NewImage], fields: dict[str, FieldRows], failures: Sequence, touches: Sequence[tuple[int, int]],
           removals: Sequence[int]) -> int:
    """Commit encoded images to ``index``: write their chunks, then record everything in one transaction.

    ``fields`` rows are owned by positions in ``images``; they are renumbered
    to newly reserved image ids here. ``failures`` are items with ``path``,
    ``error``, ``size`` and ``mtime_ns``; ``touches`` are (image id, new
    mtime) of files whose content did not change; ``removals`` are image ids
    replaced by new content. A crash before the transaction leaves only
    orphan chunk files, swept on the next open.
    """
    catalog, root = index.catalog, index.path
    ids = np.asarray(catalog.reserve_ids(len(images)), dtype=np.int64)
    projection = _stored_projection(index) if "global" in fields else None
    if projection is not None:  # a compressed index: the projected rows go in the same commit
        fields = {**fields, _compress.FIELD: FieldRows(projection.transform(fields["global"].vectors),
                                                       fields["global"].owners)}
    chunks = {}
    for f, rows in fields.items():
        chunks[f] = (new_chunk_name(), len(rows))
        write_chunk(root, f, chunks[f][0], FieldRows(rows.vectors, ids[rows.owners], rows.attrs))
    with catalog.transaction() as tx:
        tx.remove(list(removals))
        tx.add_images(ids.tolist(), images)  # before failures: ids were reserved from the sequence
        for f, (name, n) in chunks.items():
            tx.add_chunk(name, f, n)
        for item in failures:
            tx.add_failure(item.path, item.error, item.size, item.mtime_ns)
        for image_id, mtime_ns in touches:
            tx.touch(image_id, mtime_ns)
    return len(images)


def _same_stat(path: str, rec: ImageRecord) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == rec.size and st.st_mtime_ns == rec.mtime_ns


def _stored_projection(index):
    """The projection committed in the catalog now (read under the writer lock, so never stale), or None."""
    info = index.catalog.get_meta(_compress.META_KEY)
    if not info:
        return None
    cache = getattr(index, "_projection_cache", None)
    if cache is not None and cache[0] == info["file"]:
        return cache[1]
    return _compress.load_index_projection(index.path, info)
