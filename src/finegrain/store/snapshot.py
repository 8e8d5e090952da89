"""An immutable view of an index at one catalog generation: what every search reads.

Opening a snapshot reads catalog rows only (images, chunk list, settings).
A vector field is read on first use: its chunk files are memory-mapped, and
when the field is one chunk whose rows are all live (the state after
``compact``) the mapped arrays are used as they are, so the pages a search
touches are the only memory it costs. Several chunks, or rows of removed
images, are gathered into one array (a copy) once per snapshot; a large
gathered field (256 MiB and up) is written to a cache file beside the ANN
caches and memory-mapped, so it costs page cache rather than heap.

Structures derived from the vectors (segment tables, ANN indexes, the local
searcher) are built on first use and cached on the snapshot
(:meth:`Snapshot.derived`), so they can never be mixed with another
generation's vectors. Positions: image ids sorted ascending are the
"positions" 0..n-1 every retriever scores in (the ``global`` field's rows
are stored in that order).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import integrity
from .catalog import ROWS_GENERATION, Catalog, IndexFormatError
from .pages import release_free_heap
from .records import RecordTable
from .vectors import FieldRows, check_chunk, read_chunk

if TYPE_CHECKING:  # pragma: no cover
    from ..compress.base import Projection
    from ..decompose.segments import SegmentConfig
    from ..encoders.base import Encoder
    from ..local.store import LocalConfig
    from ..objects.config import ObjectConfig

T = TypeVar("T")

__all__ = ["Snapshot", "StaleSnapshotError"]


class StaleSnapshotError(FileNotFoundError):
    """A chunk this snapshot lists was deleted by a later compaction: re-open at the new generation."""


class Snapshot:
    """Committed state of an index at one generation (see the module docstring). Build with :meth:`load`."""

    def __init__(self, path: Path, generation: int, records: RecordTable, chunks: list[tuple[str, str, int]],
                 settings: dict[str, Any], encoder: Callable[[], Encoder],
                 marks: Mapping[str, tuple[str | None, str | None]] | None = None, max_id: int | None = None):
        self.path = Path(path)
        self.generation = int(generation)
        #: The last generation whose commit changed rows (not only search settings): names derived caches.
        self.rows_generation = int(settings.get(ROWS_GENERATION, generation))
        #: Live (indexed) images by id (a read-only mapping held column-wise; row = position).
        self.records = records
        #: Live image ids, ascending: position -> id.
        self.ids = records.ids
        self._chunks: dict[str, list[str]] = {}
        self._rows: dict[str, int] = {}
        for name, fieldname, n in chunks:
            self._chunks.setdefault(fieldname, []).append(name)
            self._rows[name] = int(n)
        #: Every catalog setting (encoder, dim, segments, local, objects, projection, search...).
        self.settings = dict(settings)
        self._encoder = encoder
        #: Per chunk: (checksum record JSON or None when unverified, damage recorded by ``finegrain check``).
        self._marks = dict(marks or {})
        self._max_id = max_id  # no chunk row may be owned by a larger image id
        self._fields: dict[str, FieldRows] = {}
        self._derived: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, catalog: Catalog, encoder: Callable[[], Encoder]) -> Snapshot:
        """Read the catalog's committed state in one transaction (no vector is read)."""
        generation, records, chunks, settings = catalog.read_state()
        release_free_heap()  # the rows' temporary Python objects, freed but kept by glibc otherwise
        # Read after the state: a chunk committed meanwhile is not listed, and its mark is simply unused.
        return cls(path, generation, records, chunks, settings, encoder, catalog.chunk_marks(), catalog.max_image_id())

    def check_files(self) -> None:
        """Check every listed chunk's headers and sizes against the catalog (no vector is read).

        ``StaleSnapshotError`` if a chunk vanished because a compaction committed meanwhile (re-load and
        retry), ``IndexFormatError`` naming the first damaged file otherwise.
        """
        for fieldname, names in self._chunks.items():
            for name in names:
                problem = check_chunk(self.path, fieldname, name, self._rows[name],
                                      integrity.expected_files(self._marks.get(name, (None, None))[0]))
                if problem is not None:
                    if "is missing" in problem:
                        raise StaleSnapshotError(problem)
                    raise IndexFormatError(f"index at {self.path} has a damaged vector chunk: {problem}; "
                                           "run `finegrain check` for a full report")
        for fieldname in integrity.ONE_ROW_FIELDS:  # small (8 bytes an image): their owners are read now
            owners = []
            for name in self._chunks.get(fieldname, []):
                try:
                    owners.append(integrity.read_owners(self.path, fieldname, name))
                except FileNotFoundError:
                    raise StaleSnapshotError(f"chunk {name} of generation {self.generation} is missing") from None
                except ValueError as exc:
                    raise IndexFormatError(f"index at {self.path} has a damaged vector chunk: {exc}") from None
                self._check_owners(fieldname, name, owners[-1])
            problem = integrity.duplicate_owners(fieldname, owners)
            if problem is not None:
                raise IndexFormatError(f"index at {self.path} has a damaged vector chunk: {problem}; "
                                       "run `finegrain check` for a full report")

    def _check_owners(self, fieldname: str, name: str, owners: np.ndarray) -> None:
        """Refuse a chunk whose owner ids are not image ids the catalog ever gave (a changed owner file)."""
        problem = integrity.owner_range_problem(fieldname, name, owners, self._max_id)
        if problem is not None:
            raise IndexFormatError(f"index at {self.path} has a damaged vector chunk: {problem}; "
                                   "run `finegrain check` for a full report")

    def damage(self) -> dict[str, str]:
        """Chunks ``finegrain check`` recorded as damaged, with the reason (searches needing them are refused)."""
        return {name: reason for name, (_, reason) in self._marks.items() if reason and name in self._rows}

    # --------------------------------------------------------------- settings
    @property
    def encoder(self) -> Encoder:
        """The index's encoder (shared by every snapshot of an open index; built on first use)."""
        return self._encoder()

    @property
    def encoder_name(self) -> str:
        return str(self.settings.get("encoder"))

    @property
    def dim(self) -> int:
        return int(self.settings["dim"])

    @property
    def segment_config(self) -> SegmentConfig | None:
        from ..decompose.segments import SegmentConfig

        seg = self.settings.get("segments")
        return SegmentConfig.from_dict(seg) if seg else None

    @property
    def object_config(self) -> ObjectConfig | None:
        from ..objects.config import ObjectConfig

        obj = self.settings.get("objects")
        return ObjectConfig.from_dict(obj) if obj else None

    @property
    def local_config(self) -> LocalConfig | None:
        from ..local.store import LocalConfig

        return LocalConfig.from_dict(self.settings.get("local"))

    @property
    def search_settings(self) -> dict:
        """Saved search settings (``{"multivector": {...}, "decomposer": "rules"}``; ``finegrain tune``)."""
        return dict(self.settings.get("search") or {})

    @property
    def projection_info(self) -> dict | None:
        """The active projection's catalog setting (``finegrain compress``), or None."""
        from ..compress import indexing as compress_indexing

        return self.settings.get(compress_indexing.META_KEY) or None

    @property
    def projection(self) -> Projection | None:
        """The fitted projection applied to queries of global search, or None."""
        info = self.projection_info
        if not info:
            return None
        from ..compress import indexing as compress_indexing

        def build() -> Projection:
            try:
                return compress_indexing.load_index_projection(self.path, info)
            except FileNotFoundError:
                raise StaleSnapshotError(f"projection file of generation {self.generation} is gone") from None
            except (OSError, ValueError, KeyError) as exc:
                raise IndexFormatError(f"index at {self.path} has an unreadable projection: {exc}") from None

        return self.derived("projection", build)

    def __len__(self) -> int:
        return len(self.records)

    # ----------------------------------------------------------------- fields
    def has_field(self, name: str) -> bool:
        """Whether the catalog lists chunks of field ``name`` (``global`` always exists)."""
        return name == "global" or name in self._chunks

    def chunk_names(self, name: str) -> list[str]:
        """The chunk files of field ``name`` in commit order (what :meth:`field_parts` reads, one part each).
        Chunks are immutable and their names unique, so two states with the same leading names hold the
        same rows there (removals aside: compare the parts' live rows)."""
        return list(self._chunks.get(name, []))

    def field_names(self) -> list[str]:
        return sorted(set(self._chunks) | {"global"})

    def field(self, name: str) -> FieldRows:
        """Live rows of field ``name`` (memory-mapped when possible); ``KeyError`` if the index has none."""
        if name in self._fields:
            return self._fields[name]
        if not self.has_field(name):
            raise KeyError(f"the index has no {name!r} field")
        with self._lock_for("field:" + name):
            if name not in self._fields:
                self._fields[name] = self._read_field(name)
        return self._fields[name]

    def field_parts(self, name: str) -> list[FieldRows]:
        """Live rows of field ``name`` chunk by chunk, in commit order (each one memory-mapped when fully live).

        For structures that can work per chunk (the segment table) instead of on one gathered copy.
        """
        if not self.has_field(name):
            raise KeyError(f"the index has no {name!r} field")
        # Not cached: the structures built from them keep what they need (the segment table keeps views of
        # the vectors), so the chunks' owners and attributes are unmapped once those are built.
        return [_live_rows([p], self.ids, p.vectors.shape[1]) for p in self._read_chunks(name)]

    @property
    def fields(self) -> Mapping[str, FieldRows]:
        """Every field, read on first access (a read-only mapping)."""
        return _LazyFields(self)

    @property
    def global_rows(self) -> FieldRows:
        return self.field("global")

    @property
    def search_rows(self) -> FieldRows:
        """Rows global search scores against: the projected ``compressed`` field when compressed, else ``global``."""
        info = self.projection_info
        if not info:
            return self.global_rows
        from ..compress import indexing as compress_indexing

        rows = self.field(compress_indexing.FIELD)
        if len(rows) != len(self) or rows.vectors.shape[1] != int(info["dim"]):
            raise IndexFormatError(f"index at {self.path} is inconsistent: {len(rows)} compressed rows of "
                                   f"{rows.vectors.shape[1]} dims for {len(self)} images ({info['dim']} dims)")
        return rows

    def positions(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Positions (indices into :attr:`ids`) of image ids that are all live."""
        return np.searchsorted(self.ids, np.asarray(ids, np.int64))

    def _read_chunks(self, name: str) -> list[FieldRows]:
        parts: list[FieldRows] = []
        for chunk in self._chunks.get(name, []):
            damage = self._marks.get(chunk, (None, None))[1]
            if damage:  # found by `finegrain check` (a flipped bit, NaN): never searched until repaired
                raise IndexFormatError(f"index at {self.path}: vector chunk {chunk} of field {name} is damaged "
                                       f"({damage}); searches that need it are refused: run `finegrain check "
                                       "--index INDEX --repair` to see what can be done")
            try:
                part = read_chunk(self.path, name, chunk)
            except FileNotFoundError:
                raise StaleSnapshotError(f"chunk {chunk} of generation {self.generation} was compacted away") from None
            except (OSError, ValueError) as exc:
                raise IndexFormatError(f"index at {self.path} has an unreadable vector chunk {chunk}: {exc}") from None
            self._check_owners(name, chunk, part.owners)
            parts.append(part)
        return parts

    def _read_field(self, name: str) -> FieldRows:
        parts = self._read_chunks(name)
        if name == "global":
            dim = self.dim
        else:
            dim = parts[0].vectors.shape[1] if parts else 0
        rows = _live_rows(parts, self.ids, dim, self.cache_file(f"rows-{name}", ".npy"))
        if name == "global":
            if len(rows) != len(self.ids):
                raise IndexFormatError(f"index at {self.path} is inconsistent: {len(self.ids)} images but "
                                       f"{len(rows)} global vectors")
            if not np.array_equal(rows.owners, self.ids):  # not in id order (never written so): put it in order
                rows = rows.select(np.argsort(rows.owners, kind="stable"))
        return rows

    # ------------------------------------------------------- derived caches
    def derived(self, key: str, build: Callable[[], T]) -> T:
        """A structure derived from this snapshot, built once (thread-safe) and cached with it."""
        if key in self._derived:
            return self._derived[key]
        with self._lock_for("derived:" + key):
            if key not in self._derived:
                self._derived[key] = build()
                # A build frees many temporary arrays; glibc would keep that memory in the process.
                release_free_heap()
        return self._derived[key]

    def built(self, key: str) -> Any | None:
        """The structure :meth:`derived` cached under ``key``, or None if none was built yet (never builds)."""
        return self._derived.get(key)

    def _lock_for(self, key: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    def cache_file(self, name: str, suffix: str = ".faiss") -> Path:
        """Where a structure derived from these rows may be cached on disk (``ann/<name>-<rows generation><suffix>``:
        saving search settings keeps it, any other commit names a new one)."""
        return self.path / "ann" / f"{name}-{self.rows_generation}{suffix}"


#: A field gathered from several chunks is written to a memory-mapped cache file from this size up: a
#: million images' global rows are 2 GB, which a search that reads a few thousand of them (the candidate
#: stage's global scores; the ANN structure keeps its own copy) need not hold in its heap.
MAPPED_GATHER_BYTES = 256 << 20


def _live_rows(parts: list[FieldRows], ids: np.ndarray, dim: int, cache: Path | None = None) -> FieldRows:
    """Rows of live images: the mapped chunk itself when it is the only one and fully live, else a gathered copy
    (in ``cache``, memory-mapped, when it is large; in memory when small or when the file cannot be written)."""
    kept = []
    for part in parts:
        live = np.isin(part.owners, ids)
        kept.append(part if live.all() else part.select(live))  # a fully live chunk is read once, by concat
    if len(kept) == 1:
        return kept[0]
    return FieldRows.concat(kept, dim, None if cache is None else _gathered_file(kept, dim, cache))


def _gathered_file(parts: list[FieldRows], dim: int, path: Path) -> np.ndarray | None:
    """The parts' vectors concatenated in the file ``path`` (written once, then reused), memory-mapped; None
    when they are small or the file cannot be written (read-only index, full disk): the caller gathers in memory."""
    from .ann import save_cache_file
    from .vectors import load_npy

    if not parts:  # a field with no chunks (a new or emptied index): nothing to gather
        return None
    n = sum(len(p) for p in parts)
    dtype = parts[0].vectors.dtype
    if n * dim * dtype.itemsize < MAPPED_GATHER_BYTES:
        return None
    if path.exists():  # named by the rows generation: the same rows, unless a crash or a hand damaged it
        try:
            arr = load_npy(path, mmap=True)
            if arr.shape == (n, dim) and arr.dtype == dtype:
                return arr
        except (OSError, ValueError):
            pass

    def write(tmp: Path) -> None:  # plain writes: a full disk raises here, where a mapped write would crash
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": (n, dim)})
            for p in parts:
                np.ascontiguousarray(p.vectors).tofile(fh)

    return load_npy(path, mmap=True) if save_cache_file(path, write, size=n * dim * dtype.itemsize) else None


class _LazyFields(Mapping[str, FieldRows]):
    def __init__(self, snapshot: Snapshot):
        self._s = snapshot

    def __getitem__(self, name: str) -> FieldRows:
        return self._s.field(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._s.has_field(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._s.field_names())

    def __len__(self) -> int:
        return len(self._s.field_names())
