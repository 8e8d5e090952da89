"""The ``image_meta`` catalog table: capture date, camera make/model and EXIF orientation per image.

One row per indexed image, written by :class:`~finegrain.store.writer.Writer`
in the commit that adds the image (or later by the backfill of
``finegrain index`` for images indexed before this table existed). The
table is created with ``CREATE TABLE IF NOT EXISTS`` by every writer, so an
index written by an older finegrain opens unchanged: readers treat a missing
table (or a missing row) as "no EXIF", and dates fall back to the file's
mtime recorded in ``images``.

``taken`` is a *wall-clock* time in seconds, as the camera wrote it: EXIF
``DateTimeOriginal`` has no time zone, so the clock reading is stored as if
it were UTC (and a file's mtime is converted to the local wall clock the
same way), which makes every date comparable to a filter value typed as a
plain date. ``taken_source`` says where it came from: ``exif`` or ``mtime``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

TABLE = "image_meta"
COLUMNS = ("taken", "taken_source", "make", "model", "orientation")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id           INTEGER PRIMARY KEY,
    taken        REAL,
    taken_source TEXT CHECK (taken_source IN ('exif', 'mtime')),
    make         TEXT,
    model        TEXT,
    orientation  INTEGER
)
"""

__all__ = ["TABLE", "COLUMNS", "ensure_table", "has_table", "insert", "lacking", "load", "row", "counts",
           "wall_clock_seconds", "mtime_wall_clock"]


def ensure_table(db: sqlite3.Connection) -> None:
    """Create the table if this catalog predates it (writers call this; readers never need it)."""
    db.execute(SCHEMA)


def has_table(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone() is not None


def insert(db: sqlite3.Connection, rows: Iterable[tuple[int, Mapping[str, Any]]]) -> int:
    """Insert or replace ``(image id, {taken, taken_source, make, model, orientation})`` rows (inside a transaction)."""
    values = [(int(i), *(m.get(c) for c in COLUMNS)) for i, m in rows]
    db.executemany(f"INSERT OR REPLACE INTO {TABLE}(id, {', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)", values)
    return len(values)


def lacking(db: sqlite3.Connection) -> list[tuple[int, str, int | None]]:
    """``(id, path, mtime_ns)`` of indexed images without a row (what the backfill reads)."""
    if not has_table(db):
        return [tuple(r) for r in db.execute("SELECT id, path, mtime_ns FROM images WHERE status = 'indexed' "
                                             "ORDER BY id").fetchall()]
    return [tuple(r) for r in db.execute(
        f"SELECT id, path, mtime_ns FROM images WHERE status = 'indexed' "
        f"AND id NOT IN (SELECT id FROM {TABLE}) ORDER BY id").fetchall()]


def load(db: sqlite3.Connection) -> dict[int, tuple[float | None, str | None, str | None, str | None, int | None]]:
    """Every row by image id: ``(taken, taken_source, make, model, orientation)`` (empty without the table)."""
    if not has_table(db):
        return {}
    return {int(r[0]): tuple(r[1:]) for r in db.execute(f"SELECT id, {', '.join(COLUMNS)} FROM {TABLE}")}


def counts(db: sqlite3.Connection) -> dict[str, int]:
    """Indexed images by date source: ``exif``, ``mtime``, ``missing`` (no row yet: run ``finegrain index``)."""
    total = int(db.execute("SELECT COUNT(*) FROM images WHERE status = 'indexed'").fetchone()[0])
    out = {"exif": 0, "mtime": 0}
    if has_table(db):
        for source, n in db.execute(f"SELECT m.taken_source, COUNT(*) FROM {TABLE} m JOIN images i ON i.id = m.id "
                                    f"WHERE i.status = 'indexed' GROUP BY m.taken_source"):
            out[str(source)] = int(n)
    out["missing"] = total - out["exif"] - out["mtime"]
    return out


def wall_clock_seconds(dt: datetime) -> float:
    """A naive wall-clock datetime as stored in ``taken`` (the clock reading taken as UTC)."""
    return dt.replace(tzinfo=UTC).timestamp()


def mtime_wall_clock(mtime_ns: int) -> float:
    """A file mtime as ``taken``: the local wall-clock reading of that instant, stored like an EXIF date."""
    return wall_clock_seconds(datetime.fromtimestamp(mtime_ns / 1e9))


def row(db: sqlite3.Connection, image_id: int) -> dict[str, Any] | None:
    """One image's row as ``{taken, taken_source, make, model, orientation}`` (None without a row or table)."""
    if not has_table(db):
        return None
    found = db.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE id = ?", (int(image_id),)).fetchone()
    return None if found is None else dict(zip(COLUMNS, found))
