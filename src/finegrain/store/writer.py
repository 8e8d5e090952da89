"""The one mutation path of an index: the writer lock, crash-leftover sweeps, chunk writes, catalog transactions.

Every change to an index (adding images, removing them, compaction, a
stored projection, refitted local features, saved search settings) goes
through a :class:`Writer`::

    with Writer.open(path, catalog, encoder) as w:    # IndexLockedError if another process writes
        w.commit(images, fields, failures, touches, removals)

A commit writes its chunk files first (temp name, fsync, rename), then one
SQLite transaction records the images, failures and chunks and bumps the
generation. A crash before the transaction leaves orphan files that no
catalog row references; readers never look at them and the next writer
sweeps them. Rows of fields with a ``level`` attribute (segments) are stored
level-major (by level, then image id) so that readers can map one level as a
contiguous slice of the file instead of gathering it into memory.
"""

from __future__ import annotations

import errno
import fcntl
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from . import meta as meta_table
from .catalog import Catalog, NewImage
from .vectors import FieldRows, delete_chunk, new_chunk_name, read_chunk, read_chunk_vectors, sweep_orphans, write_chunk

if TYPE_CHECKING:  # pragma: no cover
    from ..compress.base import Projection
    from ..encoders.base import Encoder

LOCK_FILE = ".lock"
#: Most vector bytes in one chunk written by a full compaction (bounds its memory; see Writer.compact).
COMPACT_CHUNK_BYTES = 1 << 30
MERGE_CHUNK_BYTES = 256 << 20  # one merge group of merge_small: about twice this in RAM while merging

__all__ = ["IndexLockedError", "IndexReadOnlyError", "Writer", "checksum_json", "storage_order"]


class IndexLockedError(RuntimeError):
    """Another process is writing to the index."""


class IndexReadOnlyError(IndexLockedError):
    """The index is open read-only (a read-only folder or a full disk): writes are disabled.

    A kind of :class:`IndexLockedError` (no write can happen now), so every handler of that one reports it.
    """


#: ANN caches whose newest generation outlives a commit: the local searcher extends them after an append
#: instead of building them again (hours at 10^5 images; finegrain/local/search.py, "carried structures").
CARRIED_PREFIX = "local"


def checksum_json(record: dict[str, dict[str, Any]]) -> str:
    """The catalog's ``chunks.checksum`` value: BLAKE2b, dtype and shape of each file (see store/integrity.py)."""
    return json.dumps({"v": 1, "files": record}, sort_keys=True)


def storage_order(rows: FieldRows) -> FieldRows:
    """Rows in the order they are stored: level-major for fields with a ``level`` attribute, else as given."""
    if "level" not in rows.attrs or len(rows) == 0:
        return rows
    order = np.lexsort((rows.owners, np.asarray(rows.attrs["level"])))  # stable: keeps each image's own order
    if np.array_equal(order, np.arange(len(order))):
        return rows
    return rows.select(order)


class Writer:
    """Exclusive write access to one index folder (see the module docstring). Use :meth:`open` as a context manager."""

    def __init__(self, path: Path, catalog: Catalog, encoder: Callable[[], Encoder] | None = None):
        self.path = Path(path)
        self.catalog = catalog
        self._encoder = encoder
        self._lock_fh: IO[str] | None = None
        self._projection: tuple[str, Projection] | None = None
        self._records: dict[str, str] = {}  # chunk name -> checksum record (JSON) of chunks written, not committed
        self._codecs: dict[str, Any] = {}  # compact fields' codecs (compress/storage.py), keyed by their files

    @classmethod
    def open(cls, path: Path, catalog: Catalog, encoder: Callable[[], Encoder] | None = None) -> Writer:
        """Take the writer lock and sweep what a crashed writer left behind."""
        if catalog.read_only is not None:
            raise IndexReadOnlyError(f"the index at {path} is open read-only ({catalog.read_only}): writes are "
                                     "disabled")
        writer = cls(path, catalog, encoder)
        writer._acquire()
        try:
            catalog.ensure_integrity_columns()
            meta_table.ensure_table(catalog.db)  # indexes made before the photo-metadata table get it here
            writer.sweep()
        except BaseException:
            writer.close()
            raise
        return writer

    def close(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None and self._lock_fh is not None:
                self.sweep_caches()
        except OSError:  # best effort: the next writer sweeps again
            pass
        finally:
            self.close()

    def _acquire(self) -> None:
        try:
            fh = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the writer's lifetime
        except OSError as exc:  # a read-only folder (a root-owned mount, a snapshot): reading still works
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise IndexReadOnlyError(f"the index at {self.path} is read-only ({exc.strerror}): writes are "
                                         "disabled") from None
            raise
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise IndexLockedError(f"another process is writing to the index at {self.path}") from None
        self._lock_fh = fh

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            from .. import encoders

            name = self.catalog.get_meta("encoder")
            enc = encoders.create(name)
            self._encoder = lambda: enc
        return self._encoder()

    def settings(self) -> dict[str, Any]:
        """The committed settings (read now, under the lock: never stale)."""
        return self.catalog.all_meta()

    # ------------------------------------------------------------- sweeping
    def sweep(self) -> None:
        """Delete chunk, projection and ANN-cache files that no committed state references."""
        from ..compress import indexing as compress_indexing
        from ..compress import storage as compact_storage

        committed = {(f, n) for n, f, _ in self.catalog.chunks()}
        sweep_orphans(self.path, committed)
        compress_indexing.sweep_projection_files(self.path, self.catalog.get_meta(compress_indexing.META_KEY))
        compact_storage.sweep_storage_files(self.path, self.catalog.get_meta(compact_storage.META_KEY))
        self.sweep_caches()

    def sweep_caches(self) -> None:
        """Delete the ANN caches (and gathered rows) of older rows generations. Run when a writer opens and when it
        closes cleanly: a commit that dropped a field (``compress --drop-originals``) would otherwise leave its
        gathered float32 rows on disk until the next write. A reader still mapping one keeps its pages (unlink).
        The newest generation of each carried structure (:data:`CARRIED_PREFIX`) stays until a newer one exists."""
        generation = self.catalog.rows_generation()  # caches are named by it (Snapshot.cache_file)
        ann = self.path / "ann"
        if not ann.exists():
            return
        newest: dict[str, int] = {}  # carried structures: the newest generation of each, kept until replaced
        for path in ann.glob(f"{CARRIED_PREFIX}*"):
            stem, _, gen = path.name.split(".")[0].rpartition("-")
            if gen.isdigit():
                newest[stem] = max(newest.get(stem, -1), int(gen))
        for path in ann.glob("*"):
            base = path.name.split(".")[0]
            if base.endswith(f"-{generation}"):
                continue
            stem, _, gen = base.rpartition("-")
            if base.startswith(CARRIED_PREFIX) and gen.isdigit() and newest.get(stem) == int(gen):
                continue
            path.unlink(missing_ok=True)

    # -------------------------------------------------------------- writing
    def write_rows(self, fieldname: str, rows: FieldRows) -> tuple[str, str, int]:
        """Write one chunk file set (not yet committed); returns ``(chunk name, field, rows)``."""
        name = new_chunk_name()
        record = write_chunk(self.path, fieldname, name, storage_order(rows))
        self._records[name] = checksum_json(record)
        return name, fieldname, len(rows)

    def checksum_of(self, name: str) -> str | None:
        """The checksum record of a chunk this writer wrote (stored in the catalog when it is committed)."""
        return self._records.pop(name, None)

    def commit(self, images: list[NewImage], fields: dict[str, FieldRows], failures: Sequence[Any],
               touches: Sequence[tuple[int, int]], removals: Sequence[int]) -> int:
        """Commit encoded images: write their chunks, then record everything in one transaction.

        ``fields`` rows are owned by positions in ``images``; they are
        renumbered to newly reserved image ids here. ``failures`` are items
        with ``path``, ``error``, ``size`` and ``mtime_ns``; ``touches`` are
        (image id, new mtime) of files whose content did not change;
        ``removals`` are image ids replaced by new content. Returns how many images were added.
        """
        from ..compress import indexing as compress_indexing
        from ..compress import storage as compact_storage

        ids = np.asarray(self.catalog.reserve_ids(len(images)), dtype=np.int64)
        projection = self.projection() if "global" in fields else None
        if projection is not None:  # a compressed index: the projected rows go in the same commit
            g = fields["global"]
            fields = {**fields, compress_indexing.FIELD: FieldRows(projection.transform(g.vectors), g.owners)}
        # fields stored compact (`compress --field`): their compact rows in the same commit
        fields = compact_storage.encode_commit(self.path, self.catalog.get_meta(compact_storage.META_KEY), fields,
                                              self._codecs)
        chunks = [self.write_rows(f, FieldRows(rows.vectors, ids[rows.owners], rows.attrs))
                  for f, rows in fields.items()]
        with self.catalog.transaction() as tx:
            tx.remove(list(removals))
            tx.add_images(ids.tolist(), images)  # before failures: ids were reserved from the sequence
            for name, f, n in chunks:
                tx.add_chunk(name, f, n, self.checksum_of(name))
            for item in failures:
                tx.add_failure(item.path, item.error, item.size, item.mtime_ns)
            for image_id, mtime_ns in touches:
                tx.touch(image_id, mtime_ns)
            meta_table.insert(tx.db, [(i, im.meta) for i, im in zip(ids.tolist(), images) if im.meta is not None])
        return len(images)

    def add_image_meta(self, rows: Sequence[tuple[int, dict[str, Any]]]) -> int:
        """Record photo metadata of already indexed images (the backfill; see :mod:`finegrain.exif`)."""
        if not rows:
            return 0
        with self.catalog.transaction() as tx:
            return meta_table.insert(tx.db, rows)

    def replace_fields(self, fieldnames: Sequence[str], new_chunks: Sequence[tuple[str, str, int]],
                       meta: dict[str, Any] | None = None) -> None:
        """In one transaction: drop every chunk of ``fieldnames``, add ``new_chunks`` (from :meth:`write_rows`),
        set ``meta``."""
        old = [(n, f) for n, f, _ in self.catalog.chunks() if f in set(fieldnames)]
        with self.catalog.transaction() as tx:
            tx.drop_chunks([n for n, _ in old])
            for name, f, count in new_chunks:
                tx.add_chunk(name, f, count, self.checksum_of(name))
            for key, value in (meta or {}).items():
                tx.set_meta(key, value)
        for n, f in old:
            delete_chunk(self.path, f, n)

    def set_meta(self, key: str, value: Any) -> None:
        """Change one setting (one committed transaction)."""
        with self.catalog.transaction() as tx:
            tx.set_meta(key, value)

    def remove(self, ids: Sequence[int]) -> int:
        """Mark images removed (their rows stay in chunks until :meth:`compact`);
        unknown or removed ids raise ``KeyError``."""
        unique = sorted({int(i) for i in ids})
        live = set(self.catalog.indexed_ids().tolist())
        unknown = [i for i in unique if i not in live]
        if unknown:
            raise KeyError(f"unknown image ids: {unknown[:10]}")
        with self.catalog.transaction() as tx:
            tx.remove(unique)
        return len(unique)

    def move(self, moves: Sequence[tuple[int, str, int]]) -> int:
        """Give indexed images new paths, ``(image id, new path, new mtime_ns)``, in one transaction (files moved
        or renamed, content unchanged: the vectors stay). An image already live at a new path is removed first."""
        if not moves:
            return 0
        live_ids = set(self.catalog.indexed_ids().tolist())
        unknown = [i for i, _, _ in moves if i not in live_ids]
        if unknown:
            raise KeyError(f"unknown image ids: {unknown[:10]}")
        moved = {int(i) for i, _, _ in moves}
        live = self.catalog.indexed_ids_of(p for _, p, _ in moves)  # images already at a new path
        with self.catalog.transaction() as tx:
            tx.remove([live[p] for _, p, _ in moves if p in live and live[p] not in moved])
            for image_id, _, mtime_ns in moves:  # via a placeholder path: images may trade places
                tx.move(int(image_id), f"\0moving/{int(image_id)}", int(mtime_ns))
            for image_id, path, mtime_ns in moves:
                tx.move(int(image_id), path, int(mtime_ns))
        return len(moves)

    def compact(self, chunk_bytes: int | None = None) -> None:
        """Rewrite every field without removed images, as few chunks as fit ``chunk_bytes`` of vectors each.

        Chunks are read one at a time (memory-mapped) and written in pieces of at most ``chunk_bytes``
        (default :data:`COMPACT_CHUNK_BYTES`; a larger source chunk makes a piece alone), so compacting a
        field larger than memory needs about twice one piece of RAM, not the field. Each field's new chunks
        replace its old ones in one transaction (a crash before it leaves the old ones, and the new files
        are swept as orphans).
        """
        budget = COMPACT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        live = self.catalog.indexed_ids()
        for fieldname in sorted({f for _, f, _ in self.catalog.chunks()}):
            chunks = [name for name, _, _ in self.catalog.chunks(fieldname)]
            written: list[tuple[str, str, int]] = []
            pending: list[FieldRows] = []
            held = 0
            dim = 0
            kept = None
            for name in chunks:
                part = read_chunk(self.path, fieldname, name)
                dim = part.vectors.shape[1]
                kept = part.select(np.isin(part.owners, live))
                if pending and held + kept.vectors.nbytes > budget:  # full: write it before taking more
                    written.append(self.write_rows(fieldname, FieldRows.concat(pending, dim)))
                    pending, held = [], 0
                if len(kept):
                    pending.append(kept)
                    held += kept.vectors.nbytes
            if pending:
                written.append(self.write_rows(fieldname, FieldRows.concat(pending, dim)))
            elif not written and kept is not None:  # an emptied field keeps one empty chunk (its dtype, attrs)
                written.append(self.write_rows(fieldname, kept))
            with self.catalog.transaction() as tx:
                tx.drop_chunks(chunks)
                for new in written:
                    tx.add_chunk(*new, self.checksum_of(new[0]))
            for old in chunks:
                delete_chunk(self.path, fieldname, old)
        with self.catalog.transaction() as tx:
            tx.purge_removed()
            tx.db.execute(f"DELETE FROM {meta_table.TABLE} WHERE id NOT IN (SELECT id FROM images)")

    def merge_small(self, keep: int = 16, chunk_bytes: int | None = None) -> int:
        """Tiered compaction: in each field with more than ``keep`` chunks, merge the smallest ones.

        What ``Index.add`` runs when commits pile up: its cost is the rows of the merged chunks, not the
        whole index (a full :meth:`compact` rewrites everything). Chunks are merged in groups of at most
        ``chunk_bytes`` of vectors (default :data:`MERGE_CHUNK_BYTES`), smallest first, until the field has
        ``keep`` chunks or no two small chunks fit one group, so the memory a merge needs stays bounded
        however large the index grows (merging "all but the largest" read 2 GB of a 7,000-image index at
        once). Rows of removed images in the merged chunks are dropped; the catalog keeps their records
        until a full compaction purges them. Returns how many chunks were merged away.
        """
        budget = MERGE_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        live = self.catalog.indexed_ids()
        merged_away = 0
        for fieldname in sorted({f for _, f, _ in self.catalog.chunks()}):
            while True:
                chunks = self.catalog.chunks(fieldname)
                group = self._small_group(fieldname, chunks, keep, budget)
                if len(group) < 2:
                    break
                parts = [read_chunk(self.path, fieldname, n) for n in group]
                merged = FieldRows.concat([p.select(np.isin(p.owners, live)) for p in parts],
                                          parts[0].vectors.shape[1])
                del parts  # the memory-mapped sources: only the merged rows are held
                new = self.write_rows(fieldname, merged) if len(merged) else None
                del merged
                with self.catalog.transaction() as tx:
                    tx.drop_chunks(group)
                    if new is not None:
                        tx.add_chunk(*new, self.checksum_of(new[0]))
                for old in group:
                    delete_chunk(self.path, fieldname, old)
                merged_away += len(group) - (new is not None)
        return merged_away

    def _small_group(self, fieldname: str, chunks: list[tuple[str, str, int]], keep: int, budget: int) -> list[str]:
        """The smallest chunks whose vectors fit ``budget`` together, as many as bring the field to ``keep``."""
        if len(chunks) <= keep:
            return []
        by_size = sorted(chunks, key=lambda c: (c[2], c[0]))
        first = read_chunk_vectors(self.path, fieldname, by_size[0][0])  # memory-mapped: only its header is read
        row_bytes = first.itemsize * (first.shape[1] if first.ndim == 2 else 1)
        group: list[str] = []
        held = 0
        for name, _, rows in by_size[:len(chunks) - keep + 1]:
            if group and held + rows * row_bytes > budget:
                break
            group.append(name)
            held += rows * row_bytes
        return group

    # ----------------------------------------------------------- projection
    def projection(self) -> Projection | None:
        """The projection committed in the catalog now (read under the lock, so never stale), or None."""
        from ..compress import indexing as compress_indexing

        info = self.catalog.get_meta(compress_indexing.META_KEY)
        if not info:
            return None
        if self._projection is None or self._projection[0] != info["file"]:
            self._projection = (info["file"], compress_indexing.load_index_projection(self.path, info))
        return self._projection[1]
