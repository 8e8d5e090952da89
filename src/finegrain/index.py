"""The ``Index``: one folder on disk that holds a collection and answers searches; a thin facade.

Layout of an index folder::

    finegrain.sqlite          catalog: images, failures, chunks, settings (the commit point)
    vectors/<field>/*.npy     vector chunks (memory-mapped on read)
    ann/<name>-<gen>.*        cached search structures (per catalog generation)
    .lock                     held by the one process allowed to write

Reading goes through an immutable :class:`~finegrain.store.snapshot.Snapshot`
of the committed state; every change goes through the one
:class:`~finegrain.store.writer.Writer`; every search mode through the
:mod:`finegrain.retrieval` registry. ``Index`` ties the three together.

Typical use::

    index = Index.create("photos.fg")            # or Index.open(...)
    index.add(["~/Pictures"])
    for hit in index.search(text="a red bicycle", k=5):
        print(hit.score, hit.path)
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import encoders, exif, retrieval
from .decompose.segments import SegmentConfig
from .images import ImageSource
from .indexer import Indexer, IndexReport
from .local.store import LocalConfig
from .objects.config import ObjectConfig
from .retrieval import MAX_K, MAX_QUERY_CHARS, Query, SearchResponse, SearchResult, SearchStats, Term
from .retrieval.terms import build_query
from .store import meta as photo_meta
from .store.ann import AUTO_ANN_THRESHOLD, check_kind
from .store.catalog import Catalog, ImageRecord, IndexFormatError
from .store.records import RecordTable
from .store.snapshot import Snapshot, StaleSnapshotError
from .store.vectors import FieldRows
from .store.writer import IndexLockedError, Writer

if TYPE_CHECKING:  # pragma: no cover
    from .explain import Explanation
    from .local.search import LocalSearcher
    from .objects.search import ObjectTable
    from .retrieval.local import L2GCandidates
    from .search.multivector import SegmentTable

DEFAULT_ENCODER = "effnet-minilm"

__all__ = ["Index", "SearchResult", "SearchResponse", "SearchStats", "IndexFormatError", "IndexLockedError",
           "DEFAULT_ENCODER", "MAX_K", "MAX_QUERY_CHARS"]


def _settings(encoder: str, dim: int | None, ann: str, segments: SegmentConfig | None, local: LocalConfig | None,
              objects: ObjectConfig | None) -> dict[str, Any]:
    """The settings a new index stores (what ``exist_ok`` compares)."""
    return {"encoder": encoder, "dim": dim, "ann": ann, "segments": segments.to_dict() if segments else None,
            "local": local.to_dict() if local else None, "objects": objects.to_dict() if objects else None}


def settings_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: stored X, asked Y`` for each setting that differs (``dim`` follows the encoder, so it is skipped)."""
    def plain(value: Any) -> Any:  # as stored: JSON (tuples become lists)
        return json.loads(json.dumps(value))

    return [f"{key}: stored {stored.get(key)!r}, asked {plain(value)!r}" for key, value in wanted.items()
            if key != "dim" and stored.get(key) != plain(value)]


class Index:
    """An on-disk image index. Use :meth:`create` or :meth:`open`, not the constructor.

    ``encoder`` (optional) is an already built encoder to share (the HTTP
    service passes one batching encoder to every index it opens); by default
    the index builds its own on first use.
    """

    def __init__(self, path: Path, catalog: Catalog, encoder: encoders.Encoder | None = None):
        self.path = Path(path)
        self.catalog = catalog
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self._snapshot = self._load()

    def _load(self, attempts: int = 5) -> Snapshot:
        """The committed state, its chunk files checked (headers only); retried if a compaction races the check."""
        for _ in range(attempts):
            snapshot = Snapshot.load(self.path, self.catalog, lambda: self.encoder)
            try:
                snapshot.check_files()
                return snapshot
            except StaleSnapshotError:
                if self.catalog.generation() == snapshot.generation:  # nothing committed meanwhile: really missing
                    raise IndexFormatError(f"index at {self.path} lists a vector chunk that is missing") from None
        raise IndexFormatError(f"index at {self.path} keeps changing while being opened; try again")

    # ------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike, encoder: str = DEFAULT_ENCODER, ann: str = "auto",
               segments: SegmentConfig | None = None, exist_ok: bool = False,
               local: LocalConfig | str | dict | None = None, objects: ObjectConfig | str | None = None) -> Index:
        """Create an empty index at ``path`` for ``encoder`` (a registry name).

        With ``segments`` the index also stores multi-granularity SLIC segment
        embeddings (the ``single``, ``exhaustive`` and ``hierarchical`` modes).
        With ``local`` (an extractor name, ``"cnn"``, ``"sift"`` or ``"disk"``,
        or a :class:`~finegrain.local.store.LocalConfig`) it also stores local
        features and an instance descriptor (the ``instance``,
        ``global+local``, ``local`` and ``l2g`` modes; see docs/l2g.md).
        With ``objects`` (an :class:`~finegrain.objects.ObjectConfig`, or a
        proposer name such as ``"regions"`` / ``"yolox"``) it also stores
        small-object descriptors (the ``objects``, ``objects-max`` and
        ``objects-refined`` modes, see docs/mao.md).

        With ``exist_ok`` an existing index is opened instead, if it was
        created with the same settings; different settings raise
        ``ValueError`` naming each difference (never a silent mismatch).

        Every setting is checked before the folder is made: a bad value raises
        ``ValueError``, an extractor or proposer whose optional package is not
        installed raises :class:`~finegrain.local.features.ExtractorUnavailable`
        or :class:`~finegrain.objects.proposals.ProposerUnavailable` (naming the
        extra to install), and nothing is written.
        """
        check_kind(ann)
        if isinstance(objects, str):
            objects = ObjectConfig(proposals=objects)
        local_cfg = local if isinstance(local, LocalConfig) else LocalConfig.from_dict(local)
        wanted = _settings(encoder, None, ann, segments, local_cfg, objects)
        path = Path(path)
        started = (path / "finegrain.sqlite").exists()
        if started and _has_settings(path):
            if not exist_ok:
                raise FileExistsError(f"an index already exists at {path}")
            index = cls.open(path)
            index._check_settings(wanted)
            return index
        if not started and path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not an empty folder")
        # Checked before anything is written: a bad setting or a missing optional package must not leave an
        # empty index whose settings are fixed (a corrected retry would be refused as "other settings").
        _check_available(local_cfg, objects)
        enc = encoders.create(encoder)
        path.mkdir(parents=True, exist_ok=True)
        catalog = Catalog(path, create=True)
        try:
            # Settings are written under the writer lock: two processes creating the same index race here,
            # and the second one compares instead of overwriting (a catalog never says "local" without it).
            with Writer.open(path, catalog) as w:
                if catalog.get_meta("encoder") is None:
                    with catalog.transaction() as tx:
                        for key, value in {**wanted, "dim": enc.dim}.items():
                            tx.set_meta(key, value)
                else:
                    diff = settings_differences(catalog.all_meta(), wanted)
                    if diff:
                        raise ValueError(f"the index at {path} was just created by another process with other "
                                         f"settings: {'; '.join(diff)}")
                    if not exist_ok:
                        raise FileExistsError(f"an index already exists at {path}")
                del w
        except BaseException:
            catalog.close()
            raise
        return cls(path, catalog, enc)

    @classmethod
    def open(cls, path: str | os.PathLike, encoder: encoders.Encoder | None = None) -> Index:
        """Open an existing index (read access; writing methods take the writer lock)."""
        path = Path(path)
        if not path.is_dir():
            raise IndexFormatError(f"no finegrain index at {path}")
        catalog = Catalog(path)
        try:
            index = cls(path, catalog, encoder)
            if index._snapshot.settings.get("encoder") is None:
                raise IndexFormatError(f"index at {path} has no settings: its creation was interrupted or is "
                                       "still running (Index.create / finegrain index on it completes it)")
            return index
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:  # damaged tables or settings
            catalog.close()
            raise IndexFormatError(f"index at {path} is damaged: {type(exc).__name__}: {exc}") from None
        except BaseException:
            catalog.close()
            raise

    def _check_settings(self, wanted: Mapping[str, Any]) -> None:
        diff = settings_differences(self.snapshot.settings, wanted)
        if diff:
            self.close()
            raise ValueError(f"the index at {self.path} was created with other settings: {'; '.join(diff)}. "
                             "Use a new index folder for these settings (adding a field to an existing index "
                             "is not supported yet)")

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def encoder(self) -> encoders.Encoder:
        """The index's encoder, built on first use (so opening an index stays cheap)."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    self._encoder = encoders.create(self._snapshot.settings["encoder"])
        return self._encoder

    # ------------------------------------------------------------- the state
    @property
    def snapshot(self) -> Snapshot:
        """The committed state searches read (replaced by :meth:`refresh`, never changed in place)."""
        return self._snapshot

    @property
    def generation(self) -> int:
        return self._snapshot.generation

    @property
    def read_only(self) -> str | None:
        """Why this index was opened read-only (a read-only folder, a full disk): writes are disabled; else None."""
        return self.catalog.read_only

    def refresh(self) -> bool:
        """Load the newest committed state if another process (or this one) committed; returns whether it did."""
        if self.catalog.generation() != self._snapshot.generation:
            self._snapshot = self._load()
            return True
        return False

    def __len__(self) -> int:
        return len(self._snapshot)

    @property
    def records(self) -> RecordTable:
        """Live images by id."""
        return self._snapshot.records

    @property
    def fields(self) -> Mapping[str, FieldRows]:
        """Every vector field of the current state, read on first access."""
        return self._snapshot.fields

    @property
    def global_rows(self) -> FieldRows:
        return self._snapshot.global_rows

    @property
    def search_rows(self) -> FieldRows:
        """Rows global search scores against (the ``compressed`` field on a compressed index)."""
        return self._snapshot.search_rows

    @property
    def segment_config(self) -> SegmentConfig | None:
        return self._snapshot.segment_config

    @property
    def object_config(self) -> ObjectConfig | None:
        return self._snapshot.object_config

    @property
    def local_config(self) -> LocalConfig | None:
        return self._snapshot.local_config

    @property
    def projection_info(self) -> dict | None:
        return self._snapshot.projection_info

    @property
    def projection(self):  # noqa: ANN201 - Projection | None
        return self._snapshot.projection

    # ---------------------------------------------------------------- writes
    @contextmanager
    def writer(self) -> Iterator[Writer]:
        """Exclusive write access (``IndexLockedError`` if another process writes); the state is reloaded after."""
        try:
            with Writer.open(self.path, self.catalog, lambda: self.encoder) as w:
                yield w
        finally:
            self.refresh()

    def add(self, inputs: Sequence[str | os.PathLike], recursive: bool = True, remove_missing: bool = False,
            batch_size: int = 32, commit_every: int = 512, show_progress: bool = False, engine: str = "local",
            ray_address: str | None = None, stop: threading.Event | None = None,
            on_commit: Callable[[int], None] | None = None) -> IndexReport:
        """Index the image files under ``inputs`` (files or folders).

        New files are encoded, unchanged ones skipped (same size and mtime,
        or same content hash), changed ones replaced; with ``remove_missing``
        files that vanished from the given folders are removed. Bad files are
        reported in the returned :class:`IndexReport`, never fatal.
        ``engine="ray"`` runs decoding and encoding as Ray Data jobs (local
        runtime, or the cluster at ``ray_address``); see :mod:`finegrain.ray_engine`.
        Setting ``stop`` (from another thread or a signal handler) ends the run
        early: what is encoded is committed, the rest is left for the next run
        (``report.stopped``). ``on_commit`` is called after every commit with
        the number of images it added (e.g. to sample memory or report progress).
        """
        if engine not in ("local", "ray"):
            raise ValueError(f"unknown engine {engine!r}; available: local, ray")
        if engine == "local":  # before the writer: a missing package is one error, not every image failing
            _check_available(self.local_config, self.object_config)
        with self.writer() as w:
            if engine == "local":
                indexer: Indexer = Indexer(w, batch_size, commit_every, stop=stop, on_commit=on_commit)
            else:
                from .ray_engine import RayIndexer

                indexer = RayIndexer(w, batch_size, commit_every, address=ray_address, stop=stop, on_commit=on_commit)
            report = indexer.run(inputs, recursive, remove_missing, show_progress)
            if not report.stopped:  # a stopped run ends now; the next run does these
                exif.backfill(w, show_progress)  # images indexed before the photo-metadata table existed
                if len(self.catalog.chunks("global")) > 32:  # commits pile up: merge the small chunks only
                    w.merge_small()
        return report

    def remove(self, ids: Sequence[int]) -> int:
        """Remove images by id (repeated ids count once); returns how many were removed."""
        with self.writer() as w:
            return w.remove(ids)

    def compact(self) -> None:
        """Rewrite vector chunks without removed images, one chunk per field (segments stored level-major)."""
        with self.writer() as w:
            w.compact()

    def compress(self, method: str | None = None, dim: int | None = None, show_progress: bool = False, *,
                 field: str | None = None, quantize: str | None = None, drop_originals: bool = False,
                 **params: Any) -> dict:
        """Fit a projection (``pca``, ``aesvc``, ``ss2d``; ``none`` removes it) on this index and store it.

        Without ``field`` (or ``field="global"``): the global projection, see
        :func:`finegrain.compress.indexing.compress_index`. With a multi-vector ``field``
        (``segments``, ``objects``...): that field's compact storage, ``method`` (default ``none``)
        and ``quantize`` (``float16``, ``int8``, default ``none``), see
        :func:`finegrain.compress.storage.compress_field`. ``params`` go to the projection's
        constructor. Returns the stored setting.
        """
        from .compress import indexing as compress_indexing
        from .compress import storage as compact_storage

        # ``field="global"`` with ``quantize`` given is the global field's quantised storage (compress/coded.py),
        # with ``method`` the global projection quantised too
        legacy = field is None or (field == "global" and quantize is None and not drop_originals)
        if legacy and (quantize not in (None, "none") or drop_originals):
            raise ValueError("--quantize and --drop-originals need --field (global, local, segments, objects, "
                             "objects_mean or objects_refined); without it --method and --dim project the global "
                             "field")
        if legacy and method is None:
            raise ValueError("--method is required to compress the global field")
        with self.writer() as w:
            state = Snapshot.load(self.path, self.catalog, lambda: self.encoder)  # the committed state, under the lock
            if legacy and method != "none" and compact_storage.field_info(state.settings, "global"):
                raise ValueError("this index's global field is stored quantised (compress --field global); undo it "
                                 "first (`finegrain compress --field global --quantize none`) to project it")
            if legacy:
                return compress_indexing.compress_index(w, state, str(method), dim, params, show_progress)
            return compact_storage.compress_field(w, state, str(field), method or "none", dim, quantize or "none",
                                                  drop_originals, params, show_progress=show_progress)

    def refit_local(self, show_progress: bool = False, batch: int = 256) -> int:
        """Refit the local-feature whitening on the whole collection and re-extract every image.

        Returns the number of images re-extracted. The new chunks replace the
        old ``local``/``instance`` chunks in one catalog transaction.
        """
        from .local.store import INSTANCE_FIELD, LOCAL_FIELD, LocalStore
        from .progress import progress_bar

        cfg = self.local_config
        if cfg is None:
            raise ValueError("this index stores no local features (create it with --local cnn)")
        from .compress import storage as compact_storage

        for name in (LOCAL_FIELD, INSTANCE_FIELD):  # a quantiser fitted on the old whitening's rows
            if compact_storage.field_info(self._snapshot.settings, name):
                raise ValueError(f"the {name} field is stored quantised (compress --field {name}); undo it first "
                                 f"(`finegrain compress --field {name} --quantize none`), refit, then quantise "
                                 "again")
        with self.writer() as w:
            store = LocalStore(self.path, cfg)
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
                        new_chunks.append(w.write_rows(fieldname, rows))
            w.replace_fields([LOCAL_FIELD, INSTANCE_FIELD], new_chunks)
        return len(live)

    def save_search_config(self, config: dict) -> None:
        """Store search settings in the index (one committed transaction under the writer lock)."""
        with self.writer() as w:
            w.set_meta("search", config)

    def search_config_dict(self) -> dict:
        """Saved search settings (``{"multivector": {...}, "decomposer": "rules"}``), empty by default."""
        return self._snapshot.search_settings

    def prepare(self, modes: Sequence[str] | None = None, show_progress: bool = False,
                graph_queries: str | None = None, graph_features: int | None = None) -> dict[str, list[str]]:
        """Build now the search structures the first search of each of ``modes`` would build (every available
        mode when None): FAISS indexes, the local descriptors' index, the ``l2g`` neighbour lists (hours at
        10^5 images; a stopped build resumes). Returns, per mode, what is ready.

        ``graph_queries`` (``auto``, ``all``, ``representatives``) and ``graph_features`` choose what each
        image's neighbour list queries with (:class:`~finegrain.local.search.LocalSearcher`), saved in the
        index for every later ``l2g`` search."""
        if graph_queries is not None or graph_features is not None:
            from .local.search import GRAPH_SETTING, check_graph_queries

            queries, features = check_graph_queries(graph_queries or "auto", graph_features)
            config = dict(self.search_config_dict())
            if config.get(GRAPH_SETTING) != {"queries": queries, "features": features}:
                config[GRAPH_SETTING] = {"queries": queries, "features": features}
                self.save_search_config(config)
                self.refresh()
        return retrieval.prepare(self._snapshot, modes, show_progress)

    # ---------------------------------------------------------------- search
    def available_modes(self) -> list[str]:
        """The search modes this index supports, given what it stores (segments, local features, objects)."""
        return retrieval.available(self._snapshot)

    def search(self, text: str | None = None, image: ImageSource | None = None, k: int = 10, mode: str = "auto",
               bbox: Sequence[float] | None = None, *, negative: str | Sequence[str] | None = None,
               negative_image: ImageSource | Sequence[ImageSource] | None = None, terms: Sequence[Term] = (),
               query: Query | str | None = None, filters: Any = None, threshold: float | None = None,
               offset: int = 0, sort: str = "score", like: int | None = None, **options: Any) -> SearchResponse:
        """Search by ``text`` or by example ``image`` (path, bytes or PIL image; optional ``bbox`` box).

        ``like``: instead of ``text``/``image``/``query``, the id of an indexed
        image whose file is the example ("more like this"; it finds itself first).

        Combined queries (docs/queries.md): ``text`` and ``image`` together,
        ``negative`` texts and ``negative_image`` examples to move away from,
        weighted ``terms``, or ``query``, an expression such as
        ``'"a beach" + "sunset" - "people"'`` (or a :class:`Query`).

        ``mode`` is ``"auto"`` (the default: the mode picked for the query
        and the index; the response's ``mode`` says which ran) or any
        registered mode the index supports
        (:meth:`available_modes`; ``finegrain.retrieval.modes()`` lists all).
        ``options`` are the mode's parameters (for example ``dim`` for
        ``global`` on an SS2D index, ``T``/``tau`` for ``hierarchical``,
        ``shortlist``/``w`` for ``l2g``); an unknown one raises ``ValueError``
        naming the known ones. Returns a :class:`SearchResponse`: the hits,
        best first (iterate it like a list), plus stats, sub-queries and timings.
        ``filters`` (a ``retrieval.filters.Filters`` or a dict of its fields: ``path_prefix``, ``glob``,
        ``taken_after``, ``taken_before``, ``make``, ``model``, ``orientation``, ``min_width``...,
        ``ids``) restricts the images ranked; ``threshold``, ``offset`` and ``sort`` (``score``,
        ``date``, ``-date``) shape the hits (docs/filters.md).
        """
        if like is not None:
            if text is not None or image is not None or query is not None or terms:
                raise ValueError("like= names the example image by id: give it instead of text=, image= or query=")
            image = self.like_path(like)
        q = build_query(text, image, bbox, negative, negative_image, terms, query)
        return self._with_fresh_snapshot(lambda snap: retrieval.search(
            snap, mode, q, k, options, filters=filters, threshold=threshold, offset=offset, sort=sort))

    def explain(self, ids: Sequence[int], text: str | None = None, image: ImageSource | None = None,
                mode: str = "global", bbox: Sequence[float] | None = None, k: int = 10,
                response: SearchResponse | None = None, *, query: Query | str | None = None,
                **options: Any) -> list[Explanation]:
        """Why each image of ``ids`` scored as it did for this query (see :mod:`finegrain.explain`)."""
        q = _query(text, image, bbox) if query is None else build_query(text, image, bbox, query=query)
        return self._with_fresh_snapshot(lambda snap: retrieval.explain(snap, mode, q, ids, k, options, response))

    def _with_fresh_snapshot(self, run):  # noqa: ANN001, ANN202
        """Run ``run(snapshot)``; if a compaction deleted the snapshot's chunks meanwhile, retry on the new state."""
        for _ in range(4):
            snapshot = self._snapshot
            try:
                return run(snapshot)
            except StaleSnapshotError:
                if not self.refresh():
                    raise IndexFormatError(f"index at {self.path} lists a vector chunk that is missing") from None
        raise IndexFormatError(f"index at {self.path} keeps changing under this search; try again")

    def embed_query(self, text: str | None = None, image: ImageSource | None = None,
                    bbox: Sequence[float] | None = None, *, query: Query | str | None = None) -> np.ndarray:
        """The (dim,) joint-space embedding of a text or image query (or of a combined ``query``)."""
        from .retrieval.dense import embed_query

        q = _query(text, image, bbox) if query is None else build_query(text, image, bbox, query=query)
        return embed_query(self._snapshot, q)

    def search_vectors(self, queries: np.ndarray, k: int, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS-style batch search of the global field: (scores, image ids), -1 where empty.

        ``queries`` are (n, d) joint-space embeddings (what the encoder gives);
        on a compressed index they go through the stored projection first.
        ``dim`` picks a nested size of an SS2D index.
        """
        from .retrieval.dense import search_vectors

        retrieval.check_k(k)
        return self._with_fresh_snapshot(lambda snap: search_vectors(snap, queries, k, dim))

    def search_embedding(self, query: np.ndarray, k: int = 10, dim: int | None = None) -> list[SearchResult]:
        """Global search with a precomputed joint-space embedding (projected here if the index is compressed)."""
        from .retrieval.dense import hits_from

        scores, ids = self.search_vectors(query[None, :], k, dim=dim)
        return hits_from(self._snapshot, ids[0], scores[0])

    # Derived structures of the current state (for benchmarks, tune and tests).
    @property
    def segment_table(self) -> SegmentTable:
        from .retrieval.multivector import segment_table

        return segment_table(self._snapshot)

    @property
    def object_table(self) -> ObjectTable:
        from .retrieval.objects import object_table

        return object_table(self._snapshot)

    @property
    def local_searcher(self) -> LocalSearcher:
        """The current state's local-feature searcher; ValueError without local features."""
        from .retrieval.local import local_searcher

        return local_searcher(self._snapshot)

    # The two rounds of ``l2g`` over a shard set (finegrain.local.sharded): each shard's shortlist, then the
    # neighbour lists that relate images of different shards.
    def l2g_candidates(self, query: Query, k: int, filters: Any = None, **options: Any) -> L2GCandidates:
        """The first ``k`` images of ``l2g``'s first stage for an image ``query``, before its re-ranking."""
        from .retrieval.local import l2g_candidates

        return self._with_fresh_snapshot(lambda snap: l2g_candidates(snap, query, k, options, filters))

    def image_ids(self) -> np.ndarray:
        """Every image id, ascending."""
        return np.array(self._snapshot.ids, np.int64)

    def local_descriptors(self, ids: Sequence[int]) -> list[np.ndarray]:
        """The stored local descriptors of each image id."""
        from .retrieval.local import local_descriptors

        return local_descriptors(self._snapshot, ids)

    def local_neighbours(self, descriptors: Sequence[np.ndarray], m: int | None = None,
                         exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each descriptor set's best images here by approximate Chamfer: ``(ids (n, m), sims (n, m))``."""
        from .retrieval.local import local_neighbours

        return local_neighbours(self._snapshot, descriptors, m, exclude)

    def object_boxes(self, image_id: int) -> np.ndarray:
        """(n, 4) normalised boxes of an image's stored objects, row 0 the whole image (empty without objects)."""
        self.get(image_id)
        if not self._snapshot.has_field("objects"):
            return np.zeros((0, 4), np.float32)
        return self.object_table.boxes_of(int(self._snapshot.positions([int(image_id)])[0]))

    # ------------------------------------------------------------------ info
    def get(self, image_id: int) -> ImageRecord:
        """The catalog record of an indexed image; ``KeyError`` if unknown."""
        try:
            return self._snapshot.records[int(image_id)]
        except (KeyError, ValueError, TypeError):
            raise KeyError(f"unknown image id {image_id!r}") from None

    def like_path(self, like: Any) -> str:
        """The stored path of indexed image ``like`` (an id), the example of a "more like this" search."""
        if isinstance(like, bool) or not isinstance(like, (int, np.integer)):
            raise ValueError(f"like must be an image id (an integer), not {like!r}")
        record = self._snapshot.records.get(int(like))
        if record is None:
            raise ValueError(f"like: no indexed image with id {int(like)}")
        return record.path

    def failures(self) -> list[ImageRecord]:
        """Files that could not be indexed, with their reasons."""
        return self.catalog.images("failed")

    def _local_info(self) -> dict | None:
        """Local-feature settings and storage (None without local features)."""
        cfg = self.local_config
        if cfg is None:
            return None
        from .compress import storage as compact_storage
        from .local.store import INSTANCE_FIELD, LOCAL_FIELD, STATE_FILE

        snap = self._snapshot
        stored = compact_storage.stored_name(snap, LOCAL_FIELD)  # int8 rows when `compress --field local`
        rows = snap.field(stored) if snap.has_field(stored) else None
        n_desc = 0 if rows is None else len(rows)
        per_row = 0 if rows is None else rows.vectors.itemsize * rows.vectors.shape[1] + 4 * 3 + 2 + 8
        stored_inst = compact_storage.stored_name(snap, INSTANCE_FIELD)  # int8 rows when `compress --field instance`
        inst = snap.field(stored_inst) if snap.has_field(stored_inst) else None
        inst_bytes = 0 if inst is None else inst.vectors.itemsize * inst.vectors.shape[1] + 8
        return {"extractor": cfg.extractor, "params": cfg.params,
                "fitted": (self.path / STATE_FILE).exists(), "descriptors": n_desc,
                "descriptors_per_image": round(n_desc / max(1, len(self)), 1),
                "bytes_per_image": round((n_desc * per_row) / max(1, len(self)) + inst_bytes, 1)}

    def info(self) -> dict:
        """Counts, encoder and size on disk (the ``finegrain info`` output)."""
        counts = self.catalog.counts()
        snap = self._snapshot
        ann = snap.settings.get("ann", "auto")
        from .compress import storage as compact_storage

        dim = int(snap.projection_info["dim"]) if snap.projection_info else snap.dim
        return {
            "path": str(self.path),
            "images": len(snap),
            "failed": counts.get("failed", 0),
            "removed_pending_compaction": counts.get("removed", 0),
            "encoder": snap.settings.get("encoder"),
            "dim": snap.dim,
            "projection": snap.projection_info,
            "bytes_per_image": {"float16": 2, "int8": 1}.get(str((compact_storage.field_info(
                snap.settings, "global") or compact_storage.field_info(snap.settings, "compressed")
                or {}).get("quantize")), 4) * dim,  # the global rows searched (projected ones quantised too)
            "storage": snap.settings.get(compact_storage.META_KEY) or None,  # compact fields (`compress --field`)
            "vector_bytes_per_image": compact_storage.bytes_per_image(self.path, self.catalog.chunks(), len(snap)),
            "ann": ("hnsw" if len(snap) >= AUTO_ANN_THRESHOLD else "flat") if ann == "auto" else ann,
            "local": self._local_info(),
            "chunks": len(self.catalog.chunks()),
            "format_version": int(self.catalog.get_meta("format_version")),
            "objects": snap.settings.get("objects"),
            "modes": self.available_modes(),
            "generation": snap.generation,
            "read_only": self.read_only,
            "damaged_chunks": len(snap.damage()),
            "bytes_on_disk": _dir_size(self.path),
            "failures": [{"path": r.path, "reason": r.error} for r in self.failures()],
            "capture_dates": photo_meta.counts(self.catalog.db),  # exif / mtime / missing (backfilled by `index`)
        }


def _check_available(local: LocalConfig | None, objects: ObjectConfig | None) -> None:
    """Raise if the local-feature extractor or the object proposer cannot run here: an
    :class:`~finegrain.local.features.ExtractorUnavailable` (an ``ImportError``) or a
    :class:`~finegrain.objects.proposals.ProposerUnavailable`, each naming what to install."""
    if local is not None:
        local.check_available()
    if objects is not None:
        objects.check_available()


def _has_settings(path: Path) -> bool:
    """Whether the catalog at ``path`` holds an index's settings (a creation can be interrupted before them)."""
    try:
        with Catalog(path) as catalog:
            return catalog.get_meta("encoder") is not None
    except IndexFormatError as exc:  # an index all the same (damaged, newer), unless a creator is only starting
        return not any(s in str(exc) for s in ("has no format version", "no such table"))


def _query(text: str | None, image: ImageSource | None, bbox: Sequence[float] | None) -> Query:
    return Query(text=text, image=image, bbox=None if bbox is None else tuple(bbox))  # type: ignore[arg-type]


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
