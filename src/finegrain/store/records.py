"""The indexed images of a snapshot, held column by column.

A snapshot used to keep one ``ImageRecord`` object per image: about 600
bytes of Python objects each, 0.6 GB at 10^6 images, for the life of every
snapshot. :class:`RecordTable` keeps the same rows as numpy columns (ids,
integers, and the path and sha256 texts as one UTF-8 buffer each with
offsets): about 150 bytes an image. It is a read-only
``Mapping[int, ImageRecord]``, so ``records[id]``, ``id in records``,
``records.get(id)``, ``records.values()`` and ``records.items()`` work as
they did on the dict; each lookup builds the one record it returns (about
4 us), so a loop over every image reads columns instead (:meth:`paths`,
:meth:`texts`, :meth:`column`). Keys are integer ids (Python or numpy
ints): ``3.0`` or ``True``, which a dict would have matched, are absent.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass

import numpy as np

__all__ = ["ImageRecord", "LiveByPath", "RecordTable"]

#: The catalog columns a table is built from, in this order (``Catalog.indexed_records`` reads them).
COLUMNS = ("id", "path", "sha256", "size", "mtime_ns", "width", "height")
_TEXTS = ("path", "sha256")
_INTS = ("size", "mtime_ns", "width", "height")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_BATCH = 65_536  # rows converted at a time while building (bounds the transient Python objects)


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row (``status``: indexed, failed or removed)."""

    id: int
    path: str
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    width: int | None
    height: int | None
    status: str
    error: str | None


class _Texts:
    """Strings (or None) as one UTF-8 buffer plus offsets: ``texts[i]``."""

    def __init__(self, buffer: bytes, offsets: np.ndarray, missing: np.ndarray | None):
        self.buffer, self.offsets, self.missing = buffer, offsets, missing

    @staticmethod
    def piece(values: Sequence[str | None]) -> tuple[bytes, np.ndarray, np.ndarray]:
        """One batch as (buffer, lengths, missing), ready for :meth:`join`."""
        encoded = [b"" if s is None else s.encode("utf-8", "surrogatepass") for s in values]
        return (b"".join(encoded), np.fromiter(map(len, encoded), np.int64, count=len(encoded)),
                np.fromiter((s is None for s in values), bool, count=len(values)))

    @classmethod
    def join(cls, pieces: list[tuple[bytes, np.ndarray, np.ndarray]]) -> _Texts:
        lengths = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        missing = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, bool)
        return cls(b"".join(p[0] for p in pieces), offsets, missing if missing.any() else None)

    def __getitem__(self, i: int) -> str | None:
        if self.missing is not None and self.missing[i]:
            return None
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].decode("utf-8", "surrogatepass")

    def nbytes(self) -> int:
        return len(self.buffer) + self.offsets.nbytes + (0 if self.missing is None else self.missing.nbytes)


class _Ints:
    """Integers (or None) as an int64 column with a mask of the missing ones."""

    def __init__(self, values: np.ndarray, missing: np.ndarray | None):
        self.values, self.missing = values, missing

    @staticmethod
    def piece(values: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
        """One batch as (values with 0 for None, missing), ready for :meth:`join`."""
        return (np.fromiter((0 if v is None else v for v in values), np.int64, count=len(values)),
                np.fromiter((v is None for v in values), bool, count=len(values)))

    @classmethod
    def join(cls, pieces: list[tuple[np.ndarray, np.ndarray]]) -> _Ints:
        if not pieces:
            return cls(np.zeros(0, np.int64), None)
        missing = np.concatenate([p[1] for p in pieces])
        return cls(np.concatenate([p[0] for p in pieces]), missing if missing.any() else None)

    def __getitem__(self, i: int) -> int | None:
        if self.missing is not None and self.missing[i]:
            return None
        return int(self.values[i])

    def array(self, fill: int = 0) -> np.ndarray:
        """Every value, ``fill`` where missing (a copy)."""
        out = self.values.copy()
        if self.missing is not None:
            out[self.missing] = fill
        return out

    def nbytes(self) -> int:
        return self.values.nbytes + (0 if self.missing is None else self.missing.nbytes)


class RecordTable(Mapping[int, ImageRecord]):
    """Indexed images by id, column-wise (see the module docstring). Build with :meth:`from_rows`.

    Rows are kept in ascending id order, so a record's row is its snapshot
    position (:attr:`ids` is the snapshot's ``ids``).
    """

    def __init__(self, ids: np.ndarray, texts: dict[str, _Texts], ints: dict[str, _Ints]):
        ids.flags.writeable = False  # shared as Snapshot.ids; lookups need it to stay sorted
        self.ids = ids
        self._texts = texts
        self._ints = ints

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence]) -> RecordTable:
        """A table of catalog rows ``(id, path, sha256, size, mtime_ns, width, height)`` of indexed images,
        in ascending id order (``ValueError`` otherwise). Converted a batch at a time, so the rows' Python
        objects never all exist at once."""
        ids: list[np.ndarray] = []
        texts: dict[str, list] = {name: [] for name in _TEXTS}
        ints: dict[str, list] = {name: [] for name in _INTS}
        batch: list[Sequence] = []

        def flush() -> None:
            if not batch:
                return
            try:
                columns = dict(zip(COLUMNS, zip(*batch, strict=True), strict=True))
                ids.append(np.fromiter(columns["id"], np.int64, count=len(batch)))
                for name in _TEXTS:
                    texts[name].append(_Texts.piece(columns[name]))
                for name in _INTS:
                    ints[name].append(_Ints.piece(columns[name]))
            except (AttributeError, TypeError, OverflowError) as exc:  # a damaged catalog: a value of the wrong type
                raise ValueError(f"a catalog row holds a value of the wrong type or size ({exc})") from None
            batch.clear()

        for row in rows:
            batch.append(row)
            if len(batch) == _BATCH:
                flush()
        flush()
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        if len(all_ids) > 1 and not bool(np.all(all_ids[1:] > all_ids[:-1])):
            raise ValueError("catalog rows must come in ascending id order, each id once")
        return cls(all_ids, {n: _Texts.join(p) for n, p in texts.items()}, {n: _Ints.join(p) for n, p in ints.items()})

    # ----------------------------------------------------------------- Mapping
    def _find(self, image_id: object) -> int:
        """The row of ``image_id``, or -1 (also for a non-integer)."""
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)) \
                or not _INT64_MIN <= image_id <= _INT64_MAX:
            return -1
        row = int(np.searchsorted(self.ids, image_id))
        return row if row < len(self.ids) and self.ids[row] == image_id else -1

    def __getitem__(self, image_id: int) -> ImageRecord:
        row = self._find(image_id)
        if row < 0:
            raise KeyError(image_id)
        return self.record_at(row)

    def __contains__(self, image_id: object) -> bool:
        return self._find(image_id) >= 0

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def values(self) -> _Values:
        return _Values(self)

    def items(self) -> _Items:
        return _Items(self)

    # ------------------------------------------------------------ by position
    def record_at(self, row: int) -> ImageRecord:
        """The record of row (snapshot position) ``row``."""
        size, mtime_ns, width, height = (self._ints[c][row] for c in _INTS)
        return ImageRecord(int(self.ids[row]), str(self._texts["path"][row]), self._texts["sha256"][row],
                           size, mtime_ns, width, height, "indexed", None)

    def path_at(self, row: int) -> str:
        """The path of row ``row`` (no record built)."""
        return str(self._texts["path"][row])

    def paths(self, rows: Iterable[int] | None = None) -> list[str]:
        """Paths of the given rows (every row by default), in that order."""
        return [str(p) for p in self.texts("path", rows)]

    def texts(self, name: str, rows: Iterable[int] | None = None) -> list[str | None]:
        """A text column (``path``, ``sha256``) of the given rows (every row by default), None where unknown."""
        if name not in self._texts:
            raise KeyError(f"no text column {name!r} (have {', '.join(_TEXTS)})")
        texts = self._texts[name]
        return [texts[int(r)] for r in (range(len(self.ids)) if rows is None else rows)]

    def column(self, name: str, fill: int = 0) -> np.ndarray:
        """An integer column (``size``, ``mtime_ns``, ``width``, ``height``) by row, ``fill`` where unknown."""
        if name not in self._ints:
            raise KeyError(f"no integer column {name!r} (have {', '.join(_INTS)})")
        return self._ints[name].array(fill)

    def known(self, name: str) -> np.ndarray:
        """Whether each row's integer column ``name`` is known (not NULL in the catalog)."""
        missing = self._ints[name].missing
        return np.ones(len(self.ids), bool) if missing is None else ~missing

    def nbytes(self) -> int:
        """Bytes held by the columns (what the table costs in memory, less small object overheads)."""
        return (self.ids.nbytes + sum(t.nbytes() for t in self._texts.values())
                + sum(c.nbytes() for c in self._ints.values()))


class _Values(ValuesView[ImageRecord]):
    """``table.values()``, walked row by row (no id lookup per record)."""

    _mapping: RecordTable

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self._mapping.record_at(row) for row in range(len(self._mapping)))


class _Items(ItemsView[int, ImageRecord]):
    """``table.items()``, walked row by row."""

    _mapping: RecordTable

    def __iter__(self) -> Iterator[tuple[int, ImageRecord]]:
        table = self._mapping
        return ((int(table.ids[row]), table.record_at(row)) for row in range(len(table)))


class LiveByPath(Mapping[str, ImageRecord]):
    """The live catalog rows (indexed and failed) by path: what an indexing run compares files against.

    A dict of records cost about 600 MB at 10^6 images; here the indexed rows stay a :class:`RecordTable`
    and a path is found through a sorted column of its hash (16 bytes an image), checked against the stored
    path. Failed rows (few) are a plain dict. Lookups are read-only, so worker threads may share it.
    """

    def __init__(self, indexed: RecordTable, failed: dict[str, ImageRecord]):
        self._table = indexed
        self._failed = failed
        # hash() of a str is stable within the process, which is all an in-memory lookup needs.
        hashes = np.fromiter((hash(indexed.path_at(row)) for row in range(len(indexed))), np.int64,
                             count=len(indexed))
        self._rows = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._rows]

    def _row(self, path: object) -> int:
        """The indexed row of ``path``, or -1."""
        if not isinstance(path, str):
            return -1
        h = hash(path)
        at = int(np.searchsorted(self._hashes, h))
        while at < len(self._hashes) and self._hashes[at] == h:  # equal hashes: compare the paths
            row = int(self._rows[at])
            if self._table.path_at(row) == path:
                return row
            at += 1
        return -1

    def indexed_rows(self, paths: Sequence[str]) -> np.ndarray:
        """The indexed row of each path, -1 where it has none (one vectorised search; ~1 us a path)."""
        hashes = np.fromiter((hash(p) for p in paths), np.int64, count=len(paths))
        at = np.searchsorted(self._hashes, hashes)
        rows = np.full(len(paths), -1, np.int64)
        hit = np.flatnonzero(at < len(self._hashes))
        hit = hit[self._hashes[at[hit]] == hashes[hit]]
        first = self._rows[at[hit]]
        for i, row in zip(hit.tolist(), first.tolist()):  # a hash match: confirm the path
            rows[i] = row if self._table.path_at(row) == paths[i] else self._row(paths[i])  # else: equal hashes
        return rows

    def stat_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(size, mtime_ns, known)`` of the indexed rows; ``known`` is False where either is NULL."""
        table = self._table
        return (table.column("size"), table.column("mtime_ns"),
                table.known("size") & table.known("mtime_ns"))

    def __getitem__(self, path: str) -> ImageRecord:
        row = self._row(path)
        if row >= 0:
            return self._table.record_at(row)
        return self._failed[path]

    def __contains__(self, path: object) -> bool:
        return self._row(path) >= 0 or path in self._failed

    def __iter__(self) -> Iterator[str]:
        yield from (self._table.path_at(row) for row in range(len(self._table)))
        yield from self._failed

    def __len__(self) -> int:
        return len(self._table) + len(self._failed)

    def items(self) -> _PathItems:
        return _PathItems(self)

    def records(self) -> Iterator[ImageRecord]:
        """Every live record, indexed rows first (row by row, no lookup per record)."""
        yield from (self._table.record_at(row) for row in range(len(self._table)))
        yield from self._failed.values()


class _PathItems(ItemsView[str, ImageRecord]):
    """``live.items()``, walked row by row."""

    _mapping: LiveByPath

    def __iter__(self) -> Iterator[tuple[str, ImageRecord]]:
        return ((r.path, r) for r in self._mapping.records())
