"""The ``Index``: one folder on disk that holds a collection and answers searches.

Layout of an index folder::

    finegrain.sqlite          catalog: images, failures, chunks, settings
    vectors/<field>/*.npy     vector chunks (memory-mapped on open)
    ann/<field>-<gen>.faiss   cached ANN structure (large collections only)
    .lock                     held by the one process allowed to write

Typical use::

    index = Index.create("photos.fg")            # or Index.open(...)
    index.add(["~/Pictures"])
    for hit in index.search(text="a red bicycle", k=5):
        print(hit.score, hit.path)
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import encoders
from .images import ImageSource, load_image
from .indexer import Indexer, IndexReport
from .store.ann import VectorIndex
from .store.catalog import Catalog, ImageRecord, IndexFormatError
from .decompose.segments import SegmentConfig
from .objects import search as object_search
from .objects.config import ObjectConfig
from .search import multivector
from .search.multivector import MultiVectorConfig, SearchStats
from .store.vectors import FieldRows, delete_chunk, new_chunk_name, read_chunk, sweep_orphans, write_chunk

DEFAULT_ENCODER = "effnet-minilm"
MAX_K = 10_000
MAX_QUERY_CHARS = 2_000
SEARCH_MODES = multivector.MODES + object_search.OBJECT_MODES

__all__ = ["Index", "SearchResult", "IndexFormatError", "IndexLockedError", "DEFAULT_ENCODER"]


class IndexLockedError(RuntimeError):
    """Another process is writing to the index."""


@dataclass(frozen=True)
class SearchResult:
    """One hit: catalog id, file path, similarity score (higher is better) and 0-based rank."""

    id: int
    path: str
    score: float
    rank: int

    def as_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 6), "rank": self.rank}


class Index:
    """An on-disk image index. Use :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, path: Path, catalog: Catalog):
        self.path = path
        self.catalog = catalog
        self._encoder = None
        self._generation = -1
        self._lock_fh = None
        self._load()

    # ------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike, encoder: str = DEFAULT_ENCODER, ann: str = "auto",
               segments: SegmentConfig | None = None, exist_ok: bool = False,
               objects: ObjectConfig | str | None = None) -> "Index":
        """Create an empty index at ``path`` for ``encoder`` (a registry name).

        With ``segments`` the index also stores multi-granularity SLIC segment
        embeddings (needed by the ``single``, ``exhaustive`` and
        ``hierarchical`` search modes). With ``objects`` (an
        :class:`~finegrain.objects.ObjectConfig`, or a proposer name such as
        ``"regions"`` / ``"yolox"``) it also stores small-object descriptors
        (the ``objects``, ``objects-max`` and ``objects-refined`` modes, see docs/mao.md).
        """
        if isinstance(objects, str):
            objects = ObjectConfig(proposals=objects)
        path = Path(path)
        if (path / "finegrain.sqlite").exists():
            if not exist_ok:
                raise FileExistsError(f"an index already exists at {path}")
            return cls.open(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not an empty folder")
        enc = encoders.create(encoder)
        path.mkdir(parents=True, exist_ok=True)
        catalog = Catalog(path, create=True)
        catalog.set_meta("encoder", encoder)
        catalog.set_meta("dim", enc.dim)
        catalog.set_meta("ann", ann)
        catalog.set_meta("segments", segments.to_dict() if segments else None)
        catalog.set_meta("objects", objects.to_dict() if objects else None)
        index = cls(path, catalog)
        index._encoder = enc
        return index

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Index":
        """Open an existing index (read access; writing methods take the writer lock)."""
        path = Path(path)
        if not path.is_dir():
            raise IndexFormatError(f"no finegrain index at {path}")
        return cls(path, Catalog(path))

    def close(self) -> None:
        self._release_lock()
        self.catalog.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def encoder(self) -> encoders.Encoder:
        """The index's encoder, built on first use (so opening an index stays cheap)."""
        if self._encoder is None:
            self._encoder = encoders.create(self.catalog.get_meta("encoder"))
        return self._encoder

    # ------------------------------------------------------------------ load
    def _load(self, attempts: int = 5) -> None:
        """Read the committed state: live images and the global field's vectors.

        Catalog rows come from one snapshot; if a concurrent compaction deletes
        a chunk file between that snapshot and reading it, the load retries.
        """
        for attempt in range(attempts):
            generation, records, chunks = self.catalog.snapshot()
            try:
                self._load_snapshot(generation, records, chunks)
                return
            except FileNotFoundError:
                if attempt == attempts - 1:
                    raise IndexFormatError(f"index at {self.path} lists a vector chunk that is missing") from None

    def _load_snapshot(self, generation: int, records: list[ImageRecord], chunks) -> None:
        self.records: dict[int, ImageRecord] = {r.id: r for r in records}
        dim = int(self.catalog.get_meta("dim"))
        live = np.fromiter(self.records, dtype=np.int64, count=len(self.records))
        parts: dict[str, list[FieldRows]] = {"global": []}
        for name, fieldname, _ in chunks:
            try:
                rows = read_chunk(self.path, fieldname, name)
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as exc:
                raise IndexFormatError(f"index at {self.path} has an unreadable vector chunk {name}: {exc}") from None
            parts.setdefault(fieldname, []).append(rows.select(np.isin(rows.owners, live)))
        #: Every vector field, live rows only: "global" always, "segments" when configured.
        self.fields = {f: FieldRows.concat(p, dim) for f, p in parts.items()}
        self.global_rows = self.fields["global"]
        self._segment_table = None  # built on the first multi-vector search
        # Settings read once per load, not once per query.
        seg = self.catalog.get_meta("segments")
        #: The index's segment decomposition settings, or None if it stores no segments.
        self.segment_config: SegmentConfig | None = SegmentConfig.from_dict(seg) if seg else None
        self._search_config: dict = self.catalog.get_meta("search", {}) or {}
        obj = self.catalog.get_meta("objects")
        #: The index's object settings (docs/mao.md), or None if it stores no objects.
        self.object_config: ObjectConfig | None = ObjectConfig.from_dict(obj) if obj else None
        self._object_table = None  # built on the first objects-max search
        if len(self.global_rows) != len(self.records):
            raise IndexFormatError(f"index at {self.path} is inconsistent: {len(self.records)} images but "
                                   f"{len(self.global_rows)} global vectors")
        cache = self.path / "ann" / f"global-{generation}.faiss"
        self.global_ann = VectorIndex(self.global_rows.vectors, self.catalog.get_meta("ann", "auto"), cache)
        self._generation = generation

    def refresh(self) -> bool:
        """Reload if another process committed since this one loaded; returns whether it did."""
        if self.catalog.generation() != self._generation:
            self._load()
            return True
        return False

    def __len__(self) -> int:
        return len(self.records)

    # ---------------------------------------------------------------- writes
    def add(self, inputs: Sequence[str | os.PathLike], recursive: bool = True, remove_missing: bool = False,
            batch_size: int = 32, commit_every: int = 512, show_progress: bool = False) -> IndexReport:
        """Index the image files under ``inputs`` (files or folders).

        New files are encoded, unchanged ones skipped (same size and mtime,
        or same content hash), changed ones replaced; with ``remove_missing``
        files that vanished from the given folders are removed. Bad files are
        reported in the returned :class:`IndexReport`, never fatal.
        """
        with self._writer():
            report = Indexer(self, batch_size, commit_every).run(inputs, recursive, remove_missing, show_progress)
            if len(self.catalog.chunks("global")) > 32:
                self._compact_locked()
        self._load()
        return report

    def remove(self, ids: Sequence[int]) -> int:
        """Remove images by id; returns how many were removed."""
        ids = [int(i) for i in ids]
        unknown = [i for i in ids if i not in self.records]
        if unknown:
            raise KeyError(f"unknown image ids: {unknown[:10]}")
        with self._writer(), self.catalog.transaction() as tx:
            tx.remove(ids)
        self._load()
        return len(ids)

    def compact(self) -> None:
        """Rewrite vector chunks without removed images and merge small chunks."""
        with self._writer():
            self._compact_locked()
        self._load()

    def _compact_locked(self) -> None:
        live = np.asarray(sorted(r.id for r in self.catalog.images("indexed")), dtype=np.int64)
        fields = sorted({f for _, f, _ in self.catalog.chunks()})
        for fieldname in fields:
            chunks = [name for name, _, _ in self.catalog.chunks(fieldname)]
            parts = [read_chunk(self.path, fieldname, n) for n in chunks]
            merged = FieldRows.concat([p.select(np.isin(p.owners, live)) for p in parts], parts[0].vectors.shape[1])
            name = new_chunk_name()
            write_chunk(self.path, fieldname, name, merged)
            with self.catalog.transaction() as tx:
                tx.drop_chunks(chunks)
                tx.add_chunk(name, fieldname, len(merged))
            for old in chunks:
                delete_chunk(self.path, fieldname, old)
        with self.catalog.transaction() as tx:
            tx.purge_removed()

    def _writer(self):
        """Context manager holding the exclusive writer lock; sweeps files left by a crash."""
        index = self

        class _Lock:
            def __enter__(self_inner):
                index._acquire_lock()
                committed = {(f, n) for n, f, _ in index.catalog.chunks()}
                sweep_orphans(index.path, committed)
                _sweep_ann(index.path, index.catalog.generation())

            def __exit__(self_inner, *exc):
                index._release_lock()

        return _Lock()

    def _acquire_lock(self) -> None:
        fh = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise IndexLockedError(f"another process is writing to the index at {self.path}") from None
        self._lock_fh = fh

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # ---------------------------------------------------------------- search
    def search(self, text: str | None = None, image: ImageSource | None = None, k: int = 10, mode: str = "global",
               bbox: Sequence[float] | None = None, **options) -> list[SearchResult]:
        """Search by ``text`` or by example ``image`` (path, bytes or PIL image; optional ``bbox`` crop).

        ``mode``: ``global`` (one vector per image), or with a segmented index
        ``single``, ``exhaustive``, ``hierarchical`` (HiMIR). ``options``
        override the index's :class:`MultiVectorConfig` for this call only.
        Returns up to ``k`` results, best first.
        """
        return self.search_detailed(text=text, image=image, k=k, mode=mode, bbox=bbox, **options)[0]

    def search_detailed(self, text: str | None = None, image: ImageSource | None = None, k: int = 10,
                        mode: str = "global", bbox: Sequence[float] | None = None, decomposer=None,
                        **options) -> tuple[list[SearchResult], SearchStats, list[str]]:
        """Like :meth:`search`, also returning the work done and the (sub-)queries used."""
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; available: {', '.join(SEARCH_MODES)}")
        _check_k(k)
        if mode == "global":
            query = self.embed_query(text=text, image=image, bbox=bbox)
            results = self.search_embedding(query, k=k)
            return results, SearchStats(sim_ops=len(self), levels_visited=0), [text] if text else []
        if mode in object_search.OBJECT_MODES:
            return self._search_objects(mode, text, image, bbox, k)
        if "segments" not in self.fields or self.segment_config is None:
            raise ValueError(f"search mode {mode!r} needs an index built with segments "
                             "(finegrain index ... --segments 4,9,16,25,36)")
        if text is not None:
            self._check_text(text)
            from .decompose.query import create_decomposer, decompose_query

            queries_text = decompose_query(text, decomposer or create_decomposer(self.search_config_dict().get("decomposer", "rules")))
            queries = self.encoder.encode_texts(queries_text)
        else:
            queries_text = []
            queries = self.embed_query(image=image, bbox=bbox)[None, :]
        config = MultiVectorConfig.from_dict({**self.search_config_dict().get("multivector", {}), **options})
        positions, scores, stats = multivector.search(mode, self.segment_table, self.global_rows.vectors, queries, k, config)
        ids = self.global_rows.owners[positions]
        results = [SearchResult(int(i), self.records[int(i)].path, float(sc), r) for r, (i, sc) in enumerate(zip(ids, scores))]
        return results, stats, queries_text

    def _search_objects(self, mode: str, text, image, bbox, k: int) -> tuple[list[SearchResult], SearchStats, list[str]]:
        """The ``objects``, ``objects-max`` and ``objects-refined`` modes (docs/mao.md)."""
        cfg = self.object_config
        if cfg is None:
            raise ValueError(f"search mode {mode!r} needs an index built with objects "
                             "(finegrain index ... --objects regions)")
        fieldname = object_search.FIELDS[mode]
        if mode == "objects-refined" and not cfg.refine:
            raise ValueError("search mode 'objects-refined' needs an index built with refinement "
                             "(finegrain index ... --objects regions --refine-iters 80)")
        query = self.embed_object_query(text=text, image=image, bbox=bbox)
        order = self.global_rows.owners
        if fieldname not in self.fields:  # an empty index
            return [], SearchStats(), [text] if text else []
        if mode == "objects-max":
            scores, _ = self.object_table.max_scores(query)
        else:
            scores = object_search.field_scores(self.fields[fieldname], order, query)
        positions, best = object_search.top(scores, k)
        results = [SearchResult(int(order[p]), self.records[int(order[p])].path, float(sc), r)
                   for r, (p, sc) in enumerate(zip(positions, best))]
        return results, SearchStats(sim_ops=len(self.fields[fieldname])), [text] if text else []

    def embed_object_query(self, text: str | None = None, image: ImageSource | None = None,
                           bbox: Sequence[float] | None = None) -> np.ndarray:
        """A query vector in the index's object space (image queries; text only with ``space="joint"``)."""
        cfg = self.object_config
        if cfg is None:
            raise ValueError("this index stores no objects (finegrain index ... --objects regions)")
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text= or image=")
        if text is not None:
            if cfg.space != "joint":
                raise ValueError("the object modes of this index search by example image only: its object "
                                 "descriptors are raw image features (space 'raw'); use mode 'global' for text")
            return self.embed_query(text=text)
        from .objects.descriptor import embed_query

        img = load_image(image)
        if bbox is not None:
            img = img.crop(_check_bbox(bbox, img.size))
        return embed_query(self.encoder, img, cfg)

    @property
    def object_table(self) -> object_search.ObjectTable:
        """Per-object rows grouped by image (built once per load)."""
        if self._object_table is None:
            self._object_table = object_search.ObjectTable(self.fields["objects"], self.global_rows.owners)
        return self._object_table

    def object_boxes(self, image_id: int) -> np.ndarray:
        """(n, 4) normalised boxes of an image's stored objects, row 0 the whole image (empty without objects)."""
        self.get(image_id)
        if "objects" not in self.fields:
            return np.zeros((0, 4), np.float32)
        pos = int(np.flatnonzero(self.global_rows.owners == int(image_id))[0])
        return self.object_table.boxes_of(pos)

    @property
    def segment_table(self) -> multivector.SegmentTable:
        """Segments grouped for fast scoring (built once per load)."""
        if self._segment_table is None:
            self._segment_table = multivector.SegmentTable(self.fields["segments"], self.global_rows.owners,
                                                           len(self.segment_config.levels))
        return self._segment_table

    def save_search_config(self, config: dict) -> None:
        """Store search settings in the index (one committed transaction under the writer lock)."""
        with self._writer(), self.catalog.transaction() as tx:
            tx.set_meta("search", config)
        self._search_config = dict(config)
        self._generation = self.catalog.generation()

    def search_config_dict(self) -> dict:
        """Saved search settings (``{"multivector": {...}, "decomposer": "rules"}``), empty by default."""
        return dict(self._search_config)

    def embed_query(self, text: str | None = None, image: ImageSource | None = None,
                    bbox: Sequence[float] | None = None) -> np.ndarray:
        """The (dim,) joint-space embedding of a text or image query."""
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text= or image=")
        if text is not None:
            self._check_text(text)
            return self.encoder.encode_texts([text])[0]
        img = load_image(image)
        if bbox is not None:
            img = img.crop(_check_bbox(bbox, img.size))
        return self.encoder.encode_images([img])[0]

    @staticmethod
    def _check_text(text) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the text query is empty")
        if len(text) > MAX_QUERY_CHARS:
            raise ValueError(f"the text query is longer than {MAX_QUERY_CHARS} characters")

    def search_embedding(self, query: np.ndarray, k: int = 10) -> list[SearchResult]:
        """Global search with a precomputed joint-space embedding."""
        scores, ids = self.search_vectors(query[None, :], k)
        return [SearchResult(int(i), self.records[int(i)].path, float(s), r)
                for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS-style batch search of the global field: (scores, image ids), -1 where empty."""
        _check_k(k)
        scores, rows = self.global_ann.search(queries, k)
        ids = np.where(rows >= 0, self.global_rows.owners[np.maximum(rows, 0)], -1)
        return scores, ids

    # ------------------------------------------------------------------ info
    def get(self, image_id: int) -> ImageRecord:
        """The catalog record of an indexed image; ``KeyError`` if unknown."""
        try:
            return self.records[int(image_id)]
        except (KeyError, ValueError, TypeError):
            raise KeyError(f"unknown image id {image_id!r}") from None

    def failures(self) -> list[ImageRecord]:
        """Files that could not be indexed, with their reasons."""
        return self.catalog.images("failed")

    def info(self) -> dict:
        """Counts, encoder and size on disk (the ``finegrain info`` output)."""
        counts = self.catalog.counts()
        return {
            "path": str(self.path),
            "images": len(self.records),
            "failed": counts.get("failed", 0),
            "removed_pending_compaction": counts.get("removed", 0),
            "encoder": self.catalog.get_meta("encoder"),
            "dim": int(self.catalog.get_meta("dim")),
            "ann": self.global_ann.kind,
            "chunks": len(self.catalog.chunks()),
            "format_version": int(self.catalog.get_meta("format_version")),
            "objects": self.object_config.to_dict() if self.object_config else None,
            "generation": self._generation,
            "bytes_on_disk": _dir_size(self.path),
            "failures": [{"path": r.path, "reason": r.error} for r in self.failures()],
        }


def _check_k(k) -> None:
    if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
        raise ValueError(f"k must be an integer between 1 and {MAX_K}")


def _check_bbox(bbox: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    if len(bbox) != 4:
        raise ValueError("bbox needs four numbers: x0 y0 x1 y1")
    x0, y0, x1, y1 = (float(v) for v in bbox)
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(size[0]), x1), min(float(size[1]), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"bbox {tuple(bbox)} is empty inside a {size[0]}x{size[1]} image")
    return int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))


def _sweep_ann(root: Path, generation: int) -> None:
    for path in (root / "ann").glob("*.faiss*") if (root / "ann").exists() else []:
        if not path.name.endswith(f"-{generation}.faiss"):
            path.unlink(missing_ok=True)


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def remove_index(path: str | os.PathLike) -> None:
    """Delete an index folder (refuses folders that are not finegrain indexes)."""
    path = Path(path)
    if not (path / "finegrain.sqlite").exists():
        raise IndexFormatError(f"{path} is not a finegrain index; not deleting")
    shutil.rmtree(path)
