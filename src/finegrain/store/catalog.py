"""The SQLite catalog of an index: images, vector chunks and settings.

SQLite is the commit point of the whole index. Vector chunk files are
written first (atomically renamed into place) and only become part of the
index when the transaction that lists them commits, together with the image
rows they hold. A crash at any moment leaves either the old or the new state;
files no transaction references are swept by the next writer.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .pages import release_free_heap
from .records import ImageRecord, LiveByPath, RecordTable

FORMAT_VERSION = 1
CATALOG_NAME = "finegrain.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    path     TEXT NOT NULL,
    sha256   TEXT,
    size     INTEGER,
    mtime_ns INTEGER,
    width    INTEGER,
    height   INTEGER,
    status   TEXT NOT NULL CHECK (status IN ('indexed', 'failed', 'removed')),
    error    TEXT,
    updated  REAL NOT NULL
);
-- one live row per path; removed rows are kept as history until compaction
CREATE UNIQUE INDEX IF NOT EXISTS images_live_path ON images(path) WHERE status != 'removed';
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
CREATE TABLE IF NOT EXISTS chunks (
    name    TEXT PRIMARY KEY,
    field   TEXT NOT NULL,
    rows    INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


#: Nullable columns of the chunks table added by ``Catalog.ensure_integrity_columns`` (see store/integrity.py).
INTEGRITY_COLUMNS = ("checksum", "damaged")
#: Meta key of :meth:`Catalog.rows_generation`.
ROWS_GENERATION = "rows_generation"
_READ_ONLY_ERRORS = ("unable to open database file", "readonly database", "disk I/O error", "database or disk is full")


class IndexFormatError(RuntimeError):
    """The index folder is missing, corrupt, or written by a newer finegrain."""


def _read_only_reason(path: Path) -> str | None:
    """Why the catalog at ``path`` cannot be written (checked before opening), or None."""
    folder = path.parent
    if not os.access(folder, os.W_OK) or not os.access(path, os.W_OK):
        return f"{folder} is not writable"
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return f"{folder} is on a read-only file system"
    return None


def _open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection: ``mode=ro`` when SQLite can use the WAL files, else ``immutable=1``.

    ``immutable`` reads the catalog file alone; it is only used when the WAL index cannot be opened, and a
    catalog whose last writer died leaves committed pages in ``-wal`` that such a read would not see, so a
    non-empty ``-wal`` file makes the open fail with a clear error instead.
    """
    uri = "file:" + urllib.parse.quote(str(path.resolve()))
    try:
        db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise IndexFormatError(f"index catalog {path} cannot be opened read-only: its folder is not writable and "
                               f"{wal.name} holds commits not yet merged into the catalog (open it once where "
                               "the folder is writable)")
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=30, isolation_level=None,
                           check_same_thread=False)


def _open_writable(path: Path, create: bool, wait_s: float = 30.0) -> sqlite3.Connection:
    """A WAL connection (with the schema when ``create``).

    Two processes creating one new catalog can get "database is locked" at once from the journal-mode
    switch or the schema script: SQLite returns BUSY without waiting where waiting could deadlock. Such an
    open is retried from scratch until ``wait_s`` has passed; any other error is raised at once.
    """
    deadline = time.monotonic() + wait_s
    while True:
        db = sqlite3.connect(path, timeout=wait_s, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if create:
                db.executescript(_SCHEMA)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(frozen=True)
class NewImage:
    """An image ready to commit: its vectors are in the chunk committed with it."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int
    meta: dict | None = None  # photo metadata (store/meta.py's columns), JSON-safe for the Ray engine's manifests


class Catalog:
    """Thin wrapper over the SQLite file; every write is one transaction."""

    def __init__(self, root: Path, create: bool = False):
        self.path = Path(root) / CATALOG_NAME
        #: Why this catalog was opened read-only (a read-only folder, a full disk), or None when writable.
        self.read_only: str | None = None
        if not create and not self.path.exists():
            raise IndexFormatError(f"no finegrain index at {root} (missing {CATALOG_NAME})")
        try:
            if not create:
                self.read_only = _read_only_reason(self.path)
            if self.read_only is None:
                try:
                    self.db = _open_writable(self.path, create)
                except sqlite3.OperationalError as exc:
                    # WAL needs its -wal/-shm files next to the catalog: a read-only mount or a full disk
                    # refuses them; reading still works through a read-only open.
                    if create or not any(s in str(exc) for s in _READ_ONLY_ERRORS):
                        raise
                    self.read_only = f"the catalog cannot be opened for writing ({exc})"
            if self.read_only is not None:
                self.db = _open_read_only(self.path)
            version = self.get_meta("format_version")
        except sqlite3.DatabaseError as exc:
            raise IndexFormatError(f"index catalog {self.path} is unreadable: {exc}") from None
        if version is None:
            if not create:
                raise IndexFormatError(f"index catalog {self.path} has no format version (not a finegrain index?)")
            self.set_meta("format_version", FORMAT_VERSION)
        elif int(version) > FORMAT_VERSION:
            raise IndexFormatError(
                f"index at {root} has format version {version}, newer than this finegrain supports "
                f"({FORMAT_VERSION}); upgrade finegrain to open it"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- meta
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def generation(self) -> int:
        """Counter bumped by every commit; readers compare it to notice changes."""
        return int(self.get_meta("generation", 0))

    def rows_generation(self) -> int:
        """The generation of the last commit that changed more than the saved search settings: structures
        derived from the rows (ANN caches) are named by it, so ``finegrain tune`` does not invalidate them."""
        return int(self.get_meta(ROWS_GENERATION, self.generation()))

    # ---------------------------------------------------------------- reads
    def images(self, status: str | None = "indexed") -> list[ImageRecord]:
        sql = "SELECT id, path, sha256, size, mtime_ns, width, height, status, error FROM images"
        rows = self.db.execute(sql + (" WHERE status = ? ORDER BY id" if status else " ORDER BY id"),
                               (status,) if status else ()).fetchall()
        return [ImageRecord(*r) for r in rows]

    def live_by_path(self) -> LiveByPath:
        """Indexed and failed rows keyed by path (what a re-run compares against), held column-wise."""
        live = LiveByPath(self.indexed_records(), {r.path: r for r in self.images("failed")})
        release_free_heap()  # the rows' temporary Python objects, freed but kept by glibc otherwise
        return live

    def get(self, image_id: int) -> ImageRecord | None:
        row = self.db.execute("SELECT id, path, sha256, size, mtime_ns, width, height, status, error "
                              "FROM images WHERE id = ?", (int(image_id),)).fetchone()
        return ImageRecord(*row) if row else None

    def chunks(self, field: str | None = None) -> list[tuple[str, str, int]]:
        sql = "SELECT name, field, rows FROM chunks"
        rows = self.db.execute(sql + (" WHERE field = ? ORDER BY created, name" if field
                                      else " ORDER BY created, name"),
                               (field,) if field else ()).fetchall()
        return [tuple(r) for r in rows]

    def indexed_records(self) -> RecordTable:
        """Every indexed image, as a column-wise table (what a snapshot holds; ~150 bytes an image)."""
        cursor = self.db.execute("SELECT id, path, sha256, size, mtime_ns, width, height FROM images "
                                 "WHERE status = 'indexed' ORDER BY id")
        return RecordTable.from_rows(cursor)

    def indexed_ids(self) -> np.ndarray:
        """Ids of the indexed images, ascending (int64; no record objects, so cheap at 10^6 images)."""
        rows = self.db.execute("SELECT id FROM images WHERE status = 'indexed' ORDER BY id")
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def indexed_ids_of(self, paths: Iterable[str]) -> dict[str, int]:
        """Path -> id of those of ``paths`` that are indexed: one lookup each in the live-path index (a move of
        a few files reads a few rows, not every path)."""
        out = {}
        for path in set(paths):
            row = self.db.execute("SELECT id, status FROM images WHERE path = ? AND status != 'removed'",
                                  (path,)).fetchone()
            if row is not None and row[1] == "indexed":
                out[path] = int(row[0])
        return out

    def all_meta(self) -> dict:
        """Every setting, decoded."""
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta").fetchall()}

    def read_state(self) -> tuple[int, RecordTable, list[tuple[str, str, int]], dict]:
        """Generation, indexed images, chunks and settings, read in one transaction (what a snapshot holds)."""
        self.db.execute("BEGIN")
        try:
            return self.generation(), self.indexed_records(), self.chunks(), self.all_meta()
        finally:
            self.db.execute("COMMIT")

    # ------------------------------------------------------------- integrity
    def chunk_columns(self) -> set[str]:
        """Columns of the chunks table (``checksum``/``damaged`` exist once a writer of this version migrated it)."""
        return {row[1] for row in self.db.execute("PRAGMA table_info(chunks)").fetchall()}

    def ensure_integrity_columns(self) -> None:
        """Add the nullable ``checksum`` and ``damaged`` columns to the chunks table (a writer's migration).

        Older finegrain versions read and write the table as before (they name their columns); the chunks
        they add have no checksum, which means "unverified", not damaged. The format version is unchanged.
        """
        missing = [c for c in INTEGRITY_COLUMNS if c not in self.chunk_columns()]
        if missing:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for column in INTEGRITY_COLUMNS:
                    if column not in self.chunk_columns():
                        self.db.execute(f"ALTER TABLE chunks ADD COLUMN {column} TEXT")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def chunk_marks(self) -> dict[str, tuple[str | None, str | None]]:
        """``{chunk name: (checksum JSON or None, damage found by finegrain check or None)}``."""
        if not set(INTEGRITY_COLUMNS) <= self.chunk_columns():
            return {}
        rows = self.db.execute("SELECT name, checksum, damaged FROM chunks").fetchall()
        return {name: (checksum, damaged) for name, checksum, damaged in rows}

    def max_image_id(self) -> int:
        """The largest image id ever given (no chunk row can be owned by a larger one)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
        top = self.db.execute("SELECT MAX(id) FROM images").fetchone()
        return max(int(row[0]) if row else 0, int(top[0] or 0))

    def known_ids(self) -> set[int]:
        """Ids of images that can own chunk rows: indexed, and removed but not yet compacted away."""
        rows = self.db.execute("SELECT id FROM images WHERE status IN ('indexed', 'removed')").fetchall()
        return {int(r[0]) for r in rows}

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    # --------------------------------------------------------------- writes
    def transaction(self) -> _Transaction:
        return _Transaction(self)

    def reserve_ids(self, n: int) -> list[int]:
        """Ids the next ``n`` inserted images will get (valid under the writer lock)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
        start = (row[0] if row else 0) + 1
        return list(range(start, start + n))


# A failure row of a path is replaced by its next outcome. "status != 'removed'" repeats the partial index's
# condition (images_live_path) so that SQLite searches that index: without it each call scanned the whole
# table, and adding n images cost O(n^2) (a 100,000-image build spent most of its 1,100 s here).
DELETE_FAILED_ROW = "DELETE FROM images WHERE path = ? AND status != 'removed' AND status = 'failed'"


class _Transaction:
    """``with catalog.transaction() as tx:`` -- BEGIN IMMEDIATE ... COMMIT, rolled back on error."""

    def __init__(self, catalog: Catalog):
        self.c = catalog
        self.db = catalog.db
        self.rows_changed = False  # anything but search settings and checksums (see Catalog.rows_generation)

    def __enter__(self) -> _Transaction:
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            old = self.c.generation()
            rows = old + 1 if self.rows_changed else self.c.rows_generation()
            self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                [("generation", json.dumps(old + 1)), (ROWS_GENERATION, json.dumps(rows))])
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")

    def add_images(self, ids: list[int], images: Iterable[NewImage]) -> None:
        self.rows_changed = True
        now = time.time()
        rows = [(image_id, im.path, im.sha256, im.size, im.mtime_ns, im.width, im.height, now)
                for image_id, im in zip(ids, images)]
        # A file that failed before and now succeeds replaces its failure row.
        self.db.executemany(DELETE_FAILED_ROW, [(r[1],) for r in rows])
        self.db.executemany(
            "INSERT INTO images(id, path, sha256, size, mtime_ns, width, height, status, error, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'indexed', NULL, ?)", rows)

    def add_failure(self, path: str, error: str, size: int | None = None, mtime_ns: int | None = None) -> None:
        self.rows_changed = True
        self.db.execute(DELETE_FAILED_ROW, (path,))
        self.db.execute("INSERT INTO images(path, size, mtime_ns, status, error, updated) "
                        "VALUES (?, ?, ?, 'failed', ?, ?)",
                        (path, size, mtime_ns, error, time.time()))

    def clear_failure(self, path: str) -> None:
        self.rows_changed = True
        self.db.execute(DELETE_FAILED_ROW, (path,))

    def move(self, image_id: int, path: str, mtime_ns: int) -> None:
        """An indexed image's file was moved or renamed: same content, same vectors, a new path."""
        self.rows_changed = True
        self.db.execute(DELETE_FAILED_ROW, (path,))
        self.db.execute("UPDATE images SET path = ?, mtime_ns = ?, updated = ? WHERE id = ? AND status = 'indexed'",
                        (path, mtime_ns, time.time(), image_id))

    def touch(self, image_id: int, mtime_ns: int) -> None:
        """Record a new mtime for an image whose content hash did not change."""
        self.rows_changed = True
        self.db.execute("UPDATE images SET mtime_ns = ? WHERE id = ?", (mtime_ns, image_id))

    def remove(self, image_ids: Iterable[int]) -> None:
        self.rows_changed = True
        self.db.executemany("UPDATE images SET status = 'removed', updated = ? WHERE id = ? AND status = 'indexed'",
                            [(time.time(), int(i)) for i in image_ids])

    def add_chunk(self, name: str, field: str, rows: int, checksum: str | None = None) -> None:
        self.rows_changed = True
        if checksum is None:  # the statement every version writes (no checksum: unverified)
            self.db.execute("INSERT INTO chunks(name, field, rows, created) VALUES (?, ?, ?, ?)",
                            (name, field, rows, time.time()))
        else:
            self.db.execute("INSERT INTO chunks(name, field, rows, created, checksum) VALUES (?, ?, ?, ?, ?)",
                            (name, field, rows, time.time(), checksum))

    def set_checksum(self, name: str, checksum: str) -> None:
        self.db.execute("UPDATE chunks SET checksum = ? WHERE name = ?", (checksum, name))

    def mark_damaged(self, name: str, reason: str | None) -> None:
        """Record (or, with None, clear) damage that ``finegrain check`` found in a chunk: searches refuse it."""
        self.rows_changed = True
        self.db.execute("UPDATE chunks SET damaged = ? WHERE name = ?", (reason, name))

    def drop_chunks(self, names: Iterable[str]) -> None:
        self.rows_changed = True
        self.db.executemany("DELETE FROM chunks WHERE name = ?", [(n,) for n in names])

    def purge_removed(self) -> None:
        self.rows_changed = True
        self.db.execute("DELETE FROM images WHERE status = 'removed'")

    def set_meta(self, key: str, value) -> None:
        self.rows_changed = self.rows_changed or key != "search"
        self.c.set_meta(key, value)
