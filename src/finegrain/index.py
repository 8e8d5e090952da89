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
import math
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import encoders
from .images import ImageSource, load_image
from .indexer import Indexer, IndexReport
from .store.ann import KINDS as ANN_KINDS, VectorIndex
from .store.catalog import Catalog, ImageRecord, IndexFormatError
from .decompose.segments import SegmentConfig
from .objects import search as object_search
from .objects.config import ObjectConfig
from .search import multivector
from .search.multivector import MultiVectorConfig, SearchStats
from .store.vectors import FieldRows, delete_chunk, new_chunk_name, read_chunk, sweep_orphans, write_chunk
from .compress import indexing as _compress
from .local.search import LOCAL_MODES, LocalSearcher
from .local.store import LocalConfig, LocalStore
from .progress import progress_bar

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
        self._projection_cache: tuple[str, object] | None = None  # (file name, loaded Projection)
        self.local_store: LocalStore | None = None
        self._load()

    # ------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike, encoder: str = DEFAULT_ENCODER, ann: str = "auto",
               segments: SegmentConfig | None = None, exist_ok: bool = False,
               local: "LocalConfig | str | None" = None, objects: "ObjectConfig | str | None" = None) -> "Index":
        """Create an empty index at ``path`` for ``encoder`` (a registry name).

        With ``segments`` the index also stores multi-granularity SLIC segment
        embeddings (needed by the ``single``, ``exhaustive`` and
        ``hierarchical`` search modes). With ``local`` (an extractor name,
        ``"cnn"``, ``"sift"`` or ``"disk"``, or a :class:`~finegrain.local.store.LocalConfig`)
        it also stores local features and an instance descriptor (needed by the
        ``global+local``, ``local`` and ``l2g`` modes; see docs/l2g.md).
        With ``objects`` (an :class:`~finegrain.objects.ObjectConfig`, or a
        proposer name such as ``"regions"`` / ``"yolox"``) it also stores
        small-object descriptors (the ``objects``, ``objects-max`` and
        ``objects-refined`` modes, see docs/mao.md).
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
        if ann not in ANN_KINDS:  # checked before anything is written: a bad setting must not leave a broken index
            raise ValueError(f"unknown index kind {ann!r}; choose one of {', '.join(ANN_KINDS)}")
        enc = encoders.create(encoder)
        local_cfg = LocalConfig.from_dict(local) if not isinstance(local, LocalConfig) else local
        path.mkdir(parents=True, exist_ok=True)
        catalog = Catalog(path, create=True)
        catalog.set_meta("encoder", encoder)
        catalog.set_meta("dim", enc.dim)
        catalog.set_meta("ann", ann)
        catalog.set_meta("segments", segments.to_dict() if segments else None)
        catalog.set_meta("local", local_cfg.to_dict() if local_cfg else None)
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
        catalog = Catalog(path)
        try:
            return cls(path, catalog)
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:  # damaged tables or settings
            catalog.close()
            raise IndexFormatError(f"index at {path} is damaged: {type(exc).__name__}: {exc}") from None

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
        #: The active projection's catalog setting (``finegrain compress``), or None.
        self.projection_info: dict | None = self.catalog.get_meta(_compress.META_KEY)
        field_dims = {_compress.FIELD: int(self.projection_info["dim"])} if self.projection_info else {}
        self.fields = {f: FieldRows.concat(p, field_dims.get(f, dim)) for f, p in parts.items()}
        self.global_rows = self.fields["global"]
        #: Rows global search scores against: the projected ``compressed`` field when compressed, else ``global``.
        self.search_rows = self._load_projection(len(self.records))
        self._segment_table = None  # built on the first multi-vector search
        # Settings read once per load, not once per query.
        seg = self.catalog.get_meta("segments")
        #: The index's segment decomposition settings, or None if it stores no segments.
        self.segment_config: SegmentConfig | None = SegmentConfig.from_dict(seg) if seg else None
        self._search_config: dict = self.catalog.get_meta("search", {}) or {}
        local_cfg = LocalConfig.from_dict(self.catalog.get_meta("local"))
        if local_cfg is None:
            self.local_store = None
        elif self.local_store is None or self.local_store.config != local_cfg:
            #: Local-feature extraction and fitted whitening (None if the index stores no local features).
            self.local_store = LocalStore(self.path, local_cfg)
        self._local_searcher = None  # built on the first local-feature search
        obj = self.catalog.get_meta("objects")
        #: The index's object settings (docs/mao.md), or None if it stores no objects.
        self.object_config: ObjectConfig | None = ObjectConfig.from_dict(obj) if obj else None
        self._object_table = None  # built on the first objects-max search
        if len(self.global_rows) != len(self.records):
            raise IndexFormatError(f"index at {self.path} is inconsistent: {len(self.records)} images but "
                                   f"{len(self.global_rows)} global vectors")
        cache = self.path / "ann" / f"global-{generation}.faiss"
        self.global_ann = VectorIndex(self.search_rows.vectors, self.catalog.get_meta("ann", "auto"), cache)
        self._nested_ann: dict[int, VectorIndex] = {}  # SS2D sizes searched so far (built on first use)
        self._generation = generation

    def _load_projection(self, n_images: int) -> FieldRows:
        """Load the stored projection (cached by file) and return the rows global search uses."""
        info = self.projection_info
        if not info:
            self.projection = None
            return self.global_rows
        rows = self.fields.get(_compress.FIELD)
        if rows is None or len(rows) != n_images or rows.vectors.shape[1] != int(info["dim"]):
            raise FileNotFoundError("compressed rows do not match the catalog snapshot")  # a compress committed meanwhile: retry
        if self._projection_cache is None or self._projection_cache[0] != info["file"]:
            try:
                self._projection_cache = (info["file"], _compress.load_index_projection(self.path, info))
            except FileNotFoundError:
                raise
            except (OSError, ValueError, KeyError) as exc:
                raise IndexFormatError(f"index at {self.path} has an unreadable projection: {exc}") from None
        #: The fitted :class:`~finegrain.compress.Projection` applied to queries and new images, or None.
        self.projection = self._projection_cache[1]
        return rows

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
            batch_size: int = 32, commit_every: int = 512, show_progress: bool = False, engine: str = "local",
            ray_address: str | None = None) -> IndexReport:
        """Index the image files under ``inputs`` (files or folders).

        New files are encoded, unchanged ones skipped (same size and mtime,
        or same content hash), changed ones replaced; with ``remove_missing``
        files that vanished from the given folders are removed. Bad files are
        reported in the returned :class:`IndexReport`, never fatal.
        ``engine="ray"`` runs decoding and encoding as Ray Data jobs (local
        runtime, or the cluster at ``ray_address``); see :mod:`finegrain.ray_engine`.
        """
        if engine == "local":
            indexer = Indexer(self, batch_size, commit_every)
        elif engine == "ray":
            from .ray_engine import RayIndexer

            indexer = RayIndexer(self, batch_size, commit_every, address=ray_address)
        else:
            raise ValueError(f"unknown engine {engine!r}; available: local, ray")
        with self._writer():
            report = indexer.run(inputs, recursive, remove_missing, show_progress)
            if len(self.catalog.chunks("global")) > 32:
                self._compact_locked()
        self._load()
        return report

    def remove(self, ids: Sequence[int]) -> int:
        """Remove images by id; returns how many were removed."""
        ids = list(dict.fromkeys(int(i) for i in ids))  # an id given twice is removed once
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
                _compress.sweep_projection_files(index.path, index.catalog.get_meta(_compress.META_KEY))
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
               bbox: Sequence[float] | None = None, dim: int | None = None, **options) -> list[SearchResult]:
        """Search by ``text`` or by example ``image`` (path, bytes or PIL image; optional ``bbox`` crop).

        ``mode``: ``global`` (one vector per image), or with a segmented index
        ``single``, ``exhaustive``, ``hierarchical`` (HiMIR). ``options``
        override the index's :class:`MultiVectorConfig` for this call only.
        ``dim`` picks a nested size of an SS2D-compressed index (leading
        ``dim`` dimensions, re-normalised). Returns up to ``k`` results, best first.
        """
        return self.search_detailed(text=text, image=image, k=k, mode=mode, bbox=bbox, dim=dim, **options)[0]

    def search_detailed(self, text: str | None = None, image: ImageSource | None = None, k: int = 10,
                        mode: str = "global", bbox: Sequence[float] | None = None, decomposer=None,
                        dim: int | None = None, **options) -> tuple[list[SearchResult], SearchStats, list[str]]:
        """Like :meth:`search`, also returning the work done and the (sub-)queries used."""
        if mode not in SEARCH_MODES and mode not in LOCAL_MODES:
            raise ValueError(f"unknown search mode {mode!r}; available: {', '.join(SEARCH_MODES + LOCAL_MODES)}")
        _check_k(k)
        if mode in LOCAL_MODES or (mode == "global" and options.get("global_field") == "instance"):
            return self._search_local(mode, text, image, k, bbox, options)
        if mode == "global":
            _compress.check_search_dim(self.projection_info, dim)  # a bad dim fails before encoding the query
            query = self.embed_query(text=text, image=image, bbox=bbox)
            results = self.search_embedding(query, k=k, dim=dim)
            return results, SearchStats(sim_ops=len(self), levels_visited=0), [text] if text else []
        if dim is not None:
            raise ValueError(f"dim= applies to global search only, not to mode {mode!r}")
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
    def local_searcher(self) -> LocalSearcher:
        """The local-feature searcher of the loaded state (built once per load); ValueError without local features."""
        if self.local_store is None:
            raise ValueError("this index stores no local features; create it with local features "
                             "(finegrain index ... --local cnn, or Index.create(..., local=\"cnn\"))")
        if self._local_searcher is None:
            self._local_searcher = LocalSearcher(self)
        return self._local_searcher

    def _search_local(self, mode: str, text, image, k: int, bbox, options: dict
                      ) -> tuple[list[SearchResult], SearchStats, list[str]]:
        if text is not None or image is None:
            raise ValueError(f"search mode {mode!r} takes an image query (image=..., optional bbox)")
        if self.local_store is None:
            raise ValueError(f"search mode {mode!r} needs an index with local features; create it with "
                             "`finegrain index ... --local cnn` (or Index.create(..., local=\"cnn\"))")
        if bbox is not None:
            img = load_image(image)
            _check_bbox_inside(bbox, img.size)
            image = img
        ids, scores = self.local_searcher.search(mode, image, bbox, k, **options)
        results = [SearchResult(int(i), self.records[int(i)].path, float(s), r) for r, (i, s) in enumerate(zip(ids, scores))]
        return results, SearchStats(sim_ops=len(self), levels_visited=0), []

    def refit_local(self, show_progress: bool = False, batch: int = 256) -> int:
        """Refit the local-feature whitening on the whole collection and re-extract every image.

        Returns the number of images re-extracted. The new chunks replace the
        old ``local``/``instance`` chunks in one catalog transaction.
        """
        from .local.store import INSTANCE_FIELD, LOCAL_FIELD

        if self.local_store is None:
            raise ValueError("this index stores no local features (create it with --local cnn)")
        with self._writer():
            store = self.local_store
            live = sorted(self.catalog.images("indexed"), key=lambda r: r.path)
            store.reset()
            store.fit([r.path for r in live], show_progress)
            new_chunks: list[tuple[str, str, int]] = []
            with progress_bar(len(live), "re-extracting local features", show_progress) as bar:
                for s in range(0, len(live), batch):
                    part = live[s:s + batch]
                    items = []
                    for r in part:
                        items.append(store.extract(r.path))
                        bar.advance(1)
                    for fieldname, rows in store.rows(items, [r.id for r in part]).items():
                        name = new_chunk_name()
                        write_chunk(self.path, fieldname, name, rows)
                        new_chunks.append((name, fieldname, len(rows)))
            old = [(n, f) for n, f, _ in self.catalog.chunks() if f in (LOCAL_FIELD, INSTANCE_FIELD)]
            with self.catalog.transaction() as tx:
                tx.drop_chunks([n for n, _ in old])
                for name, fieldname, count in new_chunks:
                    tx.add_chunk(name, fieldname, count)
            for n, f in old:
                delete_chunk(self.path, f, n)
        self._load()
        return len(live)

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

    def available_modes(self) -> list[str]:
        """The search modes this index supports, given what it stores (segments, local features, objects)."""
        modes = ["global"]
        if self.segment_config is not None and "segments" in self.fields:
            modes += list(multivector.MODES[1:])
        if self.local_store is not None:
            modes += list(LOCAL_MODES)
        if self.object_config is not None:
            modes += [m for m in object_search.OBJECT_MODES if m != "objects-refined" or self.object_config.refine]
        return modes

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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (e.g. "\ud800" in JSON): tokenizers raise TypeError
            raise ValueError("the text query is not valid Unicode (it contains lone surrogates)") from None

    def search_embedding(self, query: np.ndarray, k: int = 10, dim: int | None = None) -> list[SearchResult]:
        """Global search with a precomputed joint-space embedding (projected here if the index is compressed)."""
        scores, ids = self.search_vectors(query[None, :], k, dim=dim)
        return [SearchResult(int(i), self.records[int(i)].path, float(s), r)
                for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]

    def search_vectors(self, queries: np.ndarray, k: int, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS-style batch search of the global field: (scores, image ids), -1 where empty.

        ``queries`` are (n, d) joint-space embeddings (what the encoder gives);
        on a compressed index they go through the stored projection first.
        ``dim`` picks a nested size of an SS2D index.
        """
        _check_k(k)
        nested = _compress.check_search_dim(self.projection_info, dim)
        ann = self.global_ann
        if self.projection is not None:
            queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
            if queries.shape[1] != self.projection.input_dim_:
                raise ValueError(f"query dimension {queries.shape[1]} does not match the index's embeddings "
                                 f"({self.projection.input_dim_}; they are projected to {self.projection.n_components_})")
            queries = self.projection.transform(queries)
            if nested is not None:
                queries = _compress.truncate(queries, nested)
                ann = self._nested_index(nested)
        scores, rows = ann.search(queries, k)
        ids = np.where(rows >= 0, self.search_rows.owners[np.maximum(rows, 0)], -1)
        return scores, ids

    def _nested_index(self, dim: int) -> VectorIndex:
        """Top-k structure over the leading ``dim`` projected dimensions (built once per load and size)."""
        if dim not in self._nested_ann:
            cache = self.path / "ann" / f"{_compress.FIELD}{dim}-{self._generation}.faiss"
            self._nested_ann[dim] = VectorIndex(_compress.truncate(self.search_rows.vectors, dim),
                                                self.catalog.get_meta("ann", "auto"), cache)
        return self._nested_ann[dim]

    def compress(self, method: str, dim: int | None = None, show_progress: bool = False, **params) -> dict:
        """Fit a projection (``pca``, ``aesvc``, ``ss2d``; ``none`` removes it) on this index and store it.

        See :func:`finegrain.compress.indexing.compress_index`; ``params`` go to
        the projection's constructor. Returns the stored projection setting.
        """
        return _compress.compress_index(self, method, dim, params, show_progress)

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

    def _local_info(self) -> dict | None:
        """Local-feature settings and storage (None without local features)."""
        if self.local_store is None:
            return None
        from .local.store import INSTANCE_FIELD, LOCAL_FIELD

        rows = self.fields.get(LOCAL_FIELD)
        n_desc = 0 if rows is None else len(rows)
        per_row = 0 if rows is None else rows.vectors.itemsize * rows.vectors.shape[1] + 4 * 3 + 2 + 8
        inst = self.fields.get(INSTANCE_FIELD)
        inst_bytes = 0 if inst is None else inst.vectors.itemsize * inst.vectors.shape[1] + 8
        return {"extractor": self.local_store.config.extractor, "params": self.local_store.config.params,
                "fitted": self.local_store.state_path.exists(), "descriptors": n_desc,
                "descriptors_per_image": round(n_desc / max(1, len(self)), 1),
                "bytes_per_image": round((n_desc * per_row) / max(1, len(self)) + inst_bytes, 1)}

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
            "projection": self.projection_info,
            "bytes_per_image": 4 * int(self.search_rows.vectors.shape[1]),
            "ann": self.global_ann.kind,
            "local": self._local_info(),
            "chunks": len(self.catalog.chunks()),
            "format_version": int(self.catalog.get_meta("format_version")),
            "objects": self.object_config.to_dict() if self.object_config else None,
            "generation": self._generation,
            "bytes_on_disk": _dir_size(self.path),
            "failures": [{"path": r.path, "reason": r.error} for r in self.failures()],
        }


def _check_bbox_inside(bbox: Sequence[float], size: tuple[int, int]) -> None:
    """A query box for the local modes must lie inside the image (a box off the image is a caller bug)."""
    if len(bbox) != 4:
        raise ValueError("bbox needs four numbers: x0 y0 x1 y1")
    x0, y0, x1, y1 = _finite_bbox(bbox)
    W, H = size
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(f"bbox {tuple(bbox)} is not inside the {W}x{H} query image (need 0 <= x0 < x1 <= {W}, "
                         f"0 <= y0 < y1 <= {H})")


def _check_k(k) -> None:
    if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
        raise ValueError(f"k must be an integer between 1 and {MAX_K}")


def _check_bbox(bbox: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    if len(bbox) != 4:
        raise ValueError("bbox needs four numbers: x0 y0 x1 y1")
    x0, y0, x1, y1 = _finite_bbox(bbox)
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(size[0]), x1), min(float(size[1]), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"bbox {tuple(bbox)} is empty inside a {size[0]}x{size[1]} image")
    return int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))


def _finite_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):  # NaN compares false: it silently meant "whole image"
        raise ValueError(f"bbox {tuple(bbox)} has a value that is not a finite number")
    return x0, y0, x1, y1


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
