"""Image search with local features over an index: ``global+local``, ``local`` and ``l2g`` (and ``global``
over the instance descriptor).

Every mode answers an image query (optionally cropped to a box) with image
ids, best first:

``global`` (``global_field="instance"``)
    Inner product with the stored instance descriptor (multi-scale GeM).
``global+local``
    The conventional global-to-local pipeline: global search (instance
    descriptor when the index has one, else the joint-space ``global``
    field), then the best ``shortlist`` (default :data:`GLOBAL_LOCAL_SHORTLIST`, 100, whatever the L2G
    variant's own shortlist) are re-ranked by **exact** Chamfer similarity.
``local``
    Approximate Chamfer search (:class:`~finegrain.local.chamfer.ApproxChamfer`,
    CANN-style: each query descriptor's nearest database descriptors in one
    FAISS index over each image's representative descriptors, aggregated per
    image), then the approximate top ``exact_rerank`` (200 by default) is
    re-scored with the exact Chamfer similarity (a verification step on R
    images, not the database).
``l2g``
    ``local``, then the top ``k`` are re-ranked by
    :func:`~finegrain.rerank.mds.l2g_rerank`: sparse pairwise Chamfer
    similarities (the query's search scores; between shortlist images their
    stored neighbour lists, or with ``pairs="online"`` pairs measured at query
    time), missing pairs = 1, SMACOF embedding, fusion with the global
    descriptor (weight ``w``), SuperGlobal re-ranking.

Images after the re-ranked shortlist keep the first stage's order (and
score scale), so asking for every image gives a complete ranking.

The FAISS index over all local descriptors and the neighbour lists
(each database image's ``graph_m`` best images by approximate Chamfer) are
query-independent: built on first use (or by ``finegrain prepare``) and cached in ``ann/`` per catalog
generation, like the global ANN structure; after an append they are extended, not built again
(:meth:`LocalSearcher.appended_to`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..progress import progress_bar
from ..rerank.mds import L2GConfig, l2g_rerank, online_pairs
from ..store.pages import release_free_heap
from .chamfer import GRAPH_QUERIES, ApproxChamfer, LocalDatabase, chamfer_scores, extend_graph, knn_graph, knn_lists
from .store import INSTANCE_FIELD, LOCAL_FIELD, LocalStore

if TYPE_CHECKING:  # pragma: no cover
    from ..store.snapshot import Snapshot

LOCAL_MODES = ("global+local", "local", "l2g")
GRAPH_BLOCK = 32  # database images whose neighbour lists are searched together
GRAPH_CHECKPOINT_S = 120.0  # a graph build saves its lists this often, so a stopped build resumes
#: ``graph_queries="auto"``: every descriptor queries up to this many stored descriptors (10,000 images of 970:
#: a 43-minute build on 2 cores), above it the strongest representatives (a list at 100,000 images of 970:
#: 466 ms with every descriptor, 60 ms with 64 representatives; docs/l2g.md). Set by cost, not by accuracy.
GRAPH_FULL_ROWS = 10_000_000
GRAPH_AUTO_FEATURES = 64
GRAPH_SETTING = "l2g_graph"  # the index's saved graph choice, in its search settings
#: Carried structures: after images are appended, the FAISS index and the neighbour lists of the previous state
#: are extended (cost: the new images) until the indexed rows exceed this times those of the last full build.
CARRY_GROWTH = 1.5
_L2G_KEYS = {f.name for f in dataclasses.fields(L2GConfig)} - {"k"}  # the shortlist size is passed as "shortlist"
SEARCH_KEYS = {"shortlist", "knn", "nprobe", "global_field", "query_features", "exact_rerank"}

__all__ = ["GRAPH_SETTING", "LOCAL_MODES", "LocalSearcher", "check_graph_queries", "split_options"]


def check_graph_queries(queries: Any, features: Any) -> tuple[str, int | None]:
    """Validated ``(graph_queries, graph_features)``."""
    if queries not in ("auto", *GRAPH_QUERIES):
        raise ValueError(f"graph queries must be one of auto, {', '.join(GRAPH_QUERIES)}, not {queries!r}")
    if features is not None and (isinstance(features, bool) or not isinstance(features, (int, np.integer))
                                 or features < 1):
        raise ValueError(f"graph features must be a positive integer (None: every descriptor), not {features!r}")
    return str(queries), None if features is None else int(features)


def split_options(options: dict[str, Any]) -> tuple[L2GConfig, dict[str, Any]]:
    """``options`` -> (:class:`L2GConfig` of the re-ranking keys, the local-search keys); unknown keys raise.

    ``shortlist`` is the number of images re-ranked (``L2GConfig.k``; the
    search's own ``k`` is the number of results returned).
    """
    unknown = set(options) - _L2G_KEYS - SEARCH_KEYS
    if unknown:
        raise ValueError(f"unknown local search option(s) {sorted(unknown)}; known: "
                         f"{sorted(_L2G_KEYS | SEARCH_KEYS)}")
    kw = {k: v for k, v in options.items() if k in _L2G_KEYS and v is not None}
    if options.get("shortlist") is not None:
        kw["k"] = int(options["shortlist"])
    cfg = L2GConfig(**kw)
    rest = {k: v for k, v in options.items() if k in SEARCH_KEYS and v is not None}
    if rest.get("global_field", "instance") not in ("instance", "joint"):
        raise ValueError("global_field must be 'instance' or 'joint'")
    return cfg, rest


#: Filtered ``local``/``l2g`` searches allowing at most this many images score them exactly (no approximation).
EXACT_ALLOWED = 1000

#: ``global+local``'s re-ranked depth when ``shortlist`` is not given (exact Chamfer costs one image each; the
#: L2G variants' shortlists, up to 700, are for the MDS re-ranking, not for this).
GLOBAL_LOCAL_SHORTLIST = 100

#: Default exact re-score depth per mode (``LocalSearcher(exact_rerank=None)``); see its docstring.
EXACT_RERANK = {"local": 200, "l2g": 0}


class LocalSearcher:
    """Local-feature search over one index snapshot
    (one per snapshot: :func:`finegrain.retrieval.local.local_searcher`).

    Safe to share between threads: per-call options are arguments, timings
    are returned, and the cached structures are built once under a lock.

    Parameters
    ----------
    snapshot : finegrain.store.snapshot.Snapshot
        An index state with local features (``snapshot.local_config`` set).
    store : LocalStore, optional
        The index's local-feature extraction (default: one for ``snapshot``).
    knn, nprobe : int
        Defaults of the approximate search (neighbours per query descriptor, IVF lists probed). 512
        neighbours: with 32 the approximate top 100 held only 59% of the exact one on rparis6k-mini
        (CNN cell descriptors have many near-duplicates within an image), with 512 about 81%.
    dedup : float or None
        Near-duplicate threshold of the FAISS index (each image's representatives only, see
        :func:`~finegrain.local.chamfer.representative_rows`); None indexes every descriptor. 0.7:
        with 1,000 distractors it lifted the recall@100 of the approximate scores from 0.72 to 0.86
        (knn 512) and indexes a fifth of the descriptors (docs/l2g.md).
    exact_rerank : int or None
        Default of the ``exact_rerank`` option: the approximate top R re-scored with the exact
        Chamfer similarity (0: none). None: per mode, :data:`EXACT_RERANK` (``local`` 200, ``l2g``
        0). ``local`` is the Chamfer search, so it verifies: R = 200 lifts the recall@100 against
        exact Chamfer from 0.86 to 0.98 (1,000 distractors) for 17 ms. ``l2g`` does not: on the
        held-out landmark-class protocol (``experiments/l2g_heldout.py``) re-scoring lowered its mAP.
    graph_m : int
        Neighbours stored per database image for the ``l2g`` pairs.
    graph_queries : {"auto", "all", "representatives"} or None
        What each database image queries with when its neighbour list is built
        (:func:`~finegrain.local.chamfer.knn_graph`; a list costs in proportion): every stored
        descriptor, or only the rows the searcher indexes (its representatives with ``dedup``).
        ``"auto"``: ``"all"`` up to :data:`GRAPH_FULL_ROWS` stored descriptors, above it the strongest
        :data:`GRAPH_AUTO_FEATURES` representatives (docs/l2g.md, "What the neighbour lists query with").
        None: the index's saved choice (``finegrain prepare --graph-queries``), else ``"auto"``.
    graph_features : int or None
        The strongest n of those only (None: all of them, or the saved choice).
    """

    def __init__(self, snapshot: Snapshot, store: LocalStore | None = None, knn: int = 512, nprobe: int = 16,
                 graph_m: int = 50, dedup: float | None = 0.7, exact_rerank: int | None = None,
                 graph_queries: str | None = None, graph_features: int | None = None):
        config = snapshot.local_config
        if config is None:
            raise ValueError("this index stores no local features; create it with local features "
                             "(finegrain index ... --local cnn, or Index.create(..., local=\"cnn\"))")
        self.snapshot = snapshot
        self.store: LocalStore = store if store is not None else LocalStore(snapshot.path, config)
        self.knn, self.nprobe, self.graph_m = int(knn), int(nprobe), int(graph_m)
        self.dedup = None if dedup is None else float(dedup)
        self.exact_rerank = None if exact_rerank is None else int(exact_rerank)
        saved = snapshot.search_settings.get(GRAPH_SETTING, {})
        if graph_queries is None:
            graph_queries, graph_features = saved.get("queries", "auto"), graph_features or saved.get("features")
        self.graph_queries, self.graph_features = check_graph_queries(graph_queries, graph_features)
        self.ids = snapshot.ids  # database position -> image id
        self._lock = threading.Lock()  # builds the cached structures once; serialises the approximate search's knobs
        from ..compress import storage

        # the rows as stored (float16, or int8 after `compress --field local --quantize int8`), never decoded
        # as a whole: the database scores them block by block, so the searcher holds the stored size
        parts, codec = storage.scoring_parts(snapshot, LOCAL_FIELD) if storage.has_rows(snapshot, LOCAL_FIELD) \
            else ([], storage.IDENTITY)
        dim = parts[0].vectors.shape[1] if parts else self.store.extractor.dim
        self.db = _database(parts, self.ids, codec, dim)
        names = snapshot.chunk_names(storage.stored_name(snapshot, LOCAL_FIELD)) if parts else []
        self._parts = [[name, len(p)] for name, p in zip(names, parts)]  # what a later state must start with
        self.instance = self._instance_rows(snapshot)
        self.joint = self._aligned(snapshot.global_rows)
        self._approx: ApproxChamfer | None = None
        self._graph: tuple[np.ndarray, np.ndarray] | None = None

    def exact_rerank_for(self, mode: str, value: int | None = None) -> int:
        """Images re-scored exactly after the approximate search of ``mode``: ``value``, else the default."""
        if value is not None:
            return int(value)
        return self.exact_rerank if self.exact_rerank is not None else EXACT_RERANK.get(mode, 0)

    def _instance_rows(self, snapshot: Snapshot) -> np.ndarray | None:
        """The instance descriptors by position: float32 rows, or, once ``compress --field instance --quantize
        int8``, the int8 codes read through their codec (:class:`~finegrain.compress.coded.CodedRows`: ``@ q``
        scores the codes, ``[positions]`` decodes those rows only), 1 byte a dimension in memory."""
        from ..compress import storage
        from ..compress.coded import CodedRows

        if not storage.field_info(snapshot.settings, INSTANCE_FIELD):
            return self._aligned(snapshot.fields.get(INSTANCE_FIELD))
        rows, codec = storage.scoring(snapshot, INSTANCE_FIELD)
        if len(rows) == 0:
            return None
        codes = np.zeros((len(self.ids), rows.vectors.shape[1]), rows.vectors.dtype)
        codes[np.searchsorted(self.ids, rows.owners)] = rows.vectors  # rows were unit length before quantising
        return cast(np.ndarray, CodedRows(codes, codec))

    def _aligned(self, rows) -> np.ndarray | None:
        """One float32 row per database position (None if the field is absent)."""
        if rows is None or len(rows) == 0:
            return None
        pos = np.searchsorted(self.ids, rows.owners)
        out = np.zeros((len(self.ids), rows.vectors.shape[1]), np.float32)
        out[pos] = np.asarray(rows.vectors, np.float32)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    # ----------------------------------------------------- cached structures
    def _cache(self, name: str) -> Path:
        return self.snapshot.path / "ann" / f"{name}-{self.snapshot.rows_generation}"

    def _dedup_tag(self) -> str:
        """Cache-name part of the near-duplicate threshold (the indexed rows depend on it)."""
        return "" if self.dedup is None else f"-dd{int(round(self.dedup * 1000))}"

    def approx(self, knn: int | None = None, nprobe: int | None = None) -> ApproxChamfer:
        """The approximate searcher (FAISS index over the indexed descriptors, cached on disk per generation).

        Its knobs are set to ``knn``/``nprobe`` (or the defaults) for a single-threaded caller such as a
        benchmark; searches through :meth:`rank` set their own under the searcher's lock.
        """
        with self._lock:
            if self._approx is None:
                self._approx = self._build_approx()
            self._approx.knn = int(knn or self.knn)
            self._approx.nprobe = int(nprobe or self.nprobe)
            self._approx.set_search_params()
        return self._approx

    def _build_approx(self) -> ApproxChamfer:
        """The cached structure of this state; else an earlier state's extended (:meth:`_carried_approx`); else a
        new one. Beside the ``.faiss`` file: ``.rows.npy`` (the indexed rows), ``.delta.faiss`` (rows appended
        since the main index was built) and ``.state.json`` (what it indexes, for the next state to extend)."""
        path = self._cache("local" + self._dedup_tag()).with_suffix(".faiss")
        approx = self._cached_approx(path)
        if approx is None:
            approx = self._carried_approx(path)
        if approx is None:
            approx = self._new_approx()
            self._write_approx(approx, path, None, len(approx.rows))
        release_free_heap()  # the build's freed blocks and training sample (hundreds of MB at 10^5 images)
        return approx

    def _new_approx(self, **prebuilt: Any) -> ApproxChamfer:
        """The approximate searcher with this searcher's knobs (``prebuilt``: ``faiss_index``, ``delta_index``,
        ``rows`` read from a cache; ``ValueError`` when they do not fit together)."""
        return ApproxChamfer(self.db, knn=self.knn, nprobe=self.nprobe, threads=2, dedup=self.dedup, **prebuilt)

    @staticmethod
    def _read_indexes(path: Path) -> tuple[Any, Any] | None:
        """The FAISS main index at ``path`` and its delta beside it (None if absent); None when either is
        missing where needed or damaged."""
        import faiss

        delta_path = path.with_suffix(".delta.faiss")
        try:
            return faiss.read_index(str(path)), faiss.read_index(str(delta_path)) if delta_path.exists() else None
        except RuntimeError:  # a missing or damaged cache file
            return None

    def _cached_approx(self, path: Path) -> ApproxChamfer | None:
        indexes = self._read_indexes(path) if path.exists() else None
        if indexes is None:
            return None
        main, delta = indexes
        rows_path = path.with_suffix(".rows.npy")
        rows = self._read_rows(rows_path) if rows_path.exists() else None
        if rows is None and delta is not None:
            return None  # which rows the delta holds is unknown without the rows file
        try:
            approx = self._new_approx(faiss_index=main, rows=rows, delta_index=delta)
        except ValueError:  # a stale cache file of another size: rebuild (which file is stale is unknown)
            return None
        if rows is None and len(approx.rows):
            _write_cache(rows_path, lambda tmp: np.save(tmp, approx.rows), suffix=".npy")
        if not path.with_suffix(".state.json").exists():  # written by a version without states: full as it is
            self._write_state(path, main.ntotal, len(approx.rows))
        return approx

    def _carried_approx(self, path: Path) -> ApproxChamfer | None:
        """The newest earlier state's structure extended with the images appended since (an IVF index only,
        and only while the index has grown by less than :data:`CARRY_GROWTH` since its last full build)."""
        found = self._previous("local" + self._dedup_tag(), ".state.json")
        if found is None:
            return None
        old, state = found
        indexes = self._read_indexes(old.with_suffix(".faiss"))
        if indexes is None:
            return None
        try:
            rows = self._read_rows(old.with_suffix(".rows.npy"), int(state["rows"]))
            if rows is None:
                return None
            approx = self._new_approx(faiss_index=indexes[0], rows=rows, delta_index=indexes[1])
        except (ValueError, KeyError, TypeError):  # a state or rows file of another shape
            return None
        if not approx.carries:
            return None  # a flat index (under 10,000 rows): building it again is cheap
        approx.extend(int(state["images"]))
        if len(approx.rows) > CARRY_GROWTH * int(state["full_build_rows"]):
            return None  # grown too much for the main index's lists: build anew
        self._write_approx(approx, path, old.with_suffix(".faiss"), int(state["full_build_rows"]))
        return approx

    def _write_approx(self, approx: ApproxChamfer, path: Path, main_from: Path | None, full_rows: int) -> None:
        import faiss

        if not len(approx.rows):
            return
        _write_cache(path.with_suffix(".rows.npy"), lambda tmp: np.save(tmp, approx.rows), suffix=".npy")
        if main_from is not None:  # the main index is unchanged: one more name for the same file, no copy
            _write_cache(path, lambda tmp: _link_or_copy(main_from, tmp))
        else:
            _write_cache(path, lambda tmp: faiss.write_index(approx.index, str(tmp)))
        delta = approx.delta
        if delta is not None:
            _write_cache(path.with_suffix(".delta.faiss"), lambda tmp: faiss.write_index(delta, str(tmp)))
        self._write_state(path, approx.index.ntotal, full_rows)

    def state(self) -> dict[str, Any]:
        """What the database holds, for a later state to tell whether it only appended images to this one."""
        return {"version": 1, "images": int(self.db.n_images), "rows": int(self.db.n_rows),
                "ids_sha1": _ids_digest(self.ids), "parts": self._parts}

    def appended_to(self, state: dict[str, Any]) -> bool:
        """Whether this database is ``state``'s with images appended (none removed, no rows changed): its
        chunks come first, as they were, and its images are the first ones here."""
        try:
            n0, parts = int(state["images"]), state["parts"]
            return (state.get("version") == 1 and 0 < n0 <= self.db.n_images and parts == self._parts[:len(parts)]
                    and int(self.db.offsets[n0]) == int(state["rows"])
                    and _ids_digest(self.ids[:n0]) == state["ids_sha1"])
        except (KeyError, TypeError, ValueError):
            return False

    def _write_state(self, path: Path, main_rows: int, full_rows: int) -> None:
        record = {**self.state(), "main_rows": int(main_rows), "full_build_rows": int(full_rows)}
        _write_cache(path.with_suffix(".state.json"), lambda tmp: tmp.write_text(json.dumps(record)), suffix=".json")

    def _previous(self, stem: str, suffix: str) -> tuple[Path, dict[str, Any]] | None:
        """The newest earlier generation's ``{stem}-{generation}{suffix}`` file that this database appended to, and
        its state (a JSON file, or a ``state`` entry of an ``.npz``)."""
        ann = self.snapshot.path / "ann"
        current = self.snapshot.rows_generation
        found = []
        for f in ann.glob(f"{stem}-*{suffix}") if ann.exists() else []:
            gen = f.name[len(stem) + 1:-len(suffix)]
            if gen.isdigit() and int(gen) < current:
                found.append((int(gen), f))
        for number, f in sorted(found, reverse=True):
            try:
                if suffix == ".npz":
                    with np.load(f, allow_pickle=False) as z:
                        state = json.loads(str(z["state"]))
                else:
                    state = json.loads(f.read_text())
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                continue
            if isinstance(state, dict) and self.appended_to(state):
                return f.with_name(f"{stem}-{number}"), state
            return None  # the newest one does not fit: nothing older will
        return None

    def _read_rows(self, path: Path, below: int | None = None) -> np.ndarray | None:
        """Cached indexed rows, or None when the file is damaged or does not fit this database (``below``: the
        rows must lie under this row, the database's size when they were indexed)."""
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # EOFError: an empty file
            return None
        limit = self.db.n_rows if below is None else min(int(below), self.db.n_rows)
        ok = (rows.ndim == 1 and rows.dtype == np.int64 and len(rows) > 0 and int(rows[0]) >= 0
              and int(rows[-1]) < limit and bool(np.all(rows[1:] > rows[:-1])))
        return rows if ok else None

    def graph(self, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Each database image's ``graph_m`` best other images by approximate Chamfer, ``(ids, sims)`` by position."""
        if self._graph is not None:
            return self._graph
        approx = self.approx()
        with self._lock:
            if self._graph is None:
                approx.knn, approx.nprobe = self.knn, self.nprobe
                approx.set_search_params()
                self._graph = self._build_graph(approx, show_progress)
        return self._graph

    def graph_policy(self) -> tuple[str, int | None]:
        """``(queries, features)``: what each database image queries with for its neighbour list, ``"auto"``
        resolved on this index's size."""
        if self.graph_queries != "auto":
            return self.graph_queries, self.graph_features
        if self.db.n_rows <= GRAPH_FULL_ROWS:
            return "all", self.graph_features
        return "representatives", self.graph_features or GRAPH_AUTO_FEATURES

    def _build_graph(self, approx: ApproxChamfer, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
        # the lists depend on what each image queries with: the full lists keep the name they always had
        queries, features = self.graph_policy()
        tag = ("" if queries == "all" else "-rep") + (f"-f{features}" if features else "")
        stem = f"localgraph-k{self.knn}{self._dedup_tag()}{tag}"
        path = self._cache(stem).with_suffix(".npz")
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if z["ids"].shape == (self.db.n_images, self.graph_m):
                        ids, sims = z["ids"], z["sims"]
                        if "state" not in z.files:  # written by a version without states: full as it is
                            self._write_graph(path, ids, sims, self.db.n_images)
                        return ids, sims
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a damaged cache file: rebuild it
                pass
        n = self.db.n_images
        partial = path.with_name(path.stem + ".partial.npz")  # a build stopped part-way (hours at 10^5 images)
        ids, sims, start = self._read_partial(partial, n)
        carried = self._carried_graph(approx, stem, queries, features) if start == 0 else None
        if carried is not None:
            ids, sims, full_images = carried
            self._write_graph(path, ids, sims, full_images)
            return ids, sims
        last = time.monotonic()
        with progress_bar(n, "local neighbour lists", show_progress) as bar:
            bar.advance(start)
            for s in range(start, n, GRAPH_BLOCK):
                part = np.arange(s, min(n, s + GRAPH_BLOCK))
                ids[part], sims[part] = knn_graph(approx, self.graph_m, part, features, queries)
                bar.advance(len(part))
                self.db.release()  # the lists go in row order: the block's descriptors are done with
                if time.monotonic() - last >= GRAPH_CHECKPOINT_S and part[-1] + 1 < n:
                    done = np.int64(part[-1] + 1)
                    _write_cache(partial, lambda tmp, done=done: np.savez(tmp, ids=ids, sims=sims, done=done),
                                 suffix=".npz")
                    last = time.monotonic()
        self._write_graph(path, ids, sims, n)
        partial.unlink(missing_ok=True)
        return ids, sims

    def _write_graph(self, path: Path, ids: np.ndarray, sims: np.ndarray, full_images: int) -> None:
        state = np.array(json.dumps({**self.state(), "full_build_images": int(full_images)}))
        _write_cache(path, lambda tmp: np.savez(tmp, ids=ids, sims=sims, state=state), suffix=".npz")

    def _carried_graph(self, approx: ApproxChamfer, stem: str, queries: str, features: int | None
                       ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The newest earlier state's lists extended with the images appended since
        (:func:`~finegrain.local.chamfer.extend_graph`), and the image count of its last full build; None
        when there is none, or the index has grown by :data:`CARRY_GROWTH` since."""
        found = self._previous(stem, ".npz")
        if found is None:
            return None
        old, state = found
        n0, full_images = int(state["images"]), int(state.get("full_build_images", 0))
        if self.db.n_images > CARRY_GROWTH * full_images:
            return None
        try:
            with np.load(old.with_suffix(".npz"), allow_pickle=False) as z:
                ids, sims = z["ids"], z["sims"].astype(np.float32)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        if ids.shape != (n0, self.graph_m) or ids.dtype != np.int64:
            return None
        ids, sims = extend_graph(approx, ids, sims, features, queries, GRAPH_BLOCK)
        return ids, sims, full_images

    def _read_partial(self, path: Path, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(ids, sims, lists done)`` of a stopped build of this graph, or empty lists and 0."""
        shape = (n, self.graph_m)
        try:
            with np.load(path, allow_pickle=False) as z:
                ids, sims, done = z["ids"], z["sims"], int(z["done"])
            if ids.shape == shape and sims.shape == shape and ids.dtype == np.int64 and 0 < done < n:
                return ids, sims.astype(np.float32), done
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none, or damaged: start over
            pass
        return np.full(shape, -1, np.int64), np.zeros(shape, np.float32), 0

    def descriptors(self, positions: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The stored local descriptors of each database position (what :meth:`graph` queries with)."""
        return [self.db.image(int(p)) for p in positions]

    def neighbours(self, queries: Sequence[np.ndarray], m: int | None = None,
                   exclude: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each descriptor set's ``m`` (default ``graph_m``) best database positions by approximate Chamfer, as
        :meth:`graph` finds an image's neighbours; ``exclude[r]``: a position left out of row r (-1: none)."""
        approx = self.approx()
        with self._lock:
            approx.knn, approx.nprobe = self.knn, self.nprobe
            approx.set_search_params()
            return knn_lists(approx, queries, int(m or self.graph_m), exclude)

    def global_matrix(self, field: str) -> np.ndarray:
        if field == "instance" and self.instance is not None:
            return self.instance
        return cast(np.ndarray, self.joint)  # None only when the index holds no global rows

    # ------------------------------------------------------------------ search
    def query_features(self, image, bbox: Sequence[float] | None, global_field: str = "instance"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """``(q, gq)``: the query's local descriptors and its global vector in ``global_field``'s space."""
        from ..retrieval.base import Query
        from ..retrieval.dense import embed_query

        feats, inst = self.store.extract_query(image, bbox)
        q = np.ascontiguousarray(feats.descriptors, np.float32)
        G = self.global_matrix(global_field)
        if G is self.instance and inst is not None:
            gq = np.asarray(inst, np.float32)
        else:
            box = None if bbox is None else cast(tuple[float, float, float, float], tuple(bbox))
            gq = embed_query(self.snapshot, Query(image=image, bbox=box))
        return q, gq

    def search(self, mode: str, image, bbox: Sequence[float] | None, k: int, allowed: np.ndarray | None = None,
               **options) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Scores and image ids, best first (at most ``k``), and the stage timings (ms).

        ``allowed``: boolean mask over database positions; only those images are ranked (filters).
        """
        if mode not in LOCAL_MODES + ("global",):
            raise ValueError(f"unknown local search mode {mode!r}")
        _, opts = split_options(options)  # validates the options before the extraction
        t0 = time.perf_counter()
        q, gq = self.query_features(image, bbox, opts.get("global_field", "instance"))
        extract_ms = (time.perf_counter() - t0) * 1e3
        scores, order, timings = self.rank_timed(mode, q, gq, allowed=allowed, **options)
        timings = {"extract_ms": extract_ms, **timings, "total_ms": (time.perf_counter() - t0) * 1e3}
        return np.asarray(scores[:k], np.float32), self.ids[order[:k]], timings

    def rank(self, mode: str, q: np.ndarray, gq: np.ndarray, exclude: int | None = None,
             allowed: np.ndarray | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rank_timed` without the timings."""
        scores, order, _ = self.rank_timed(mode, q, gq, exclude, allowed, **options)
        return scores, order

    def rank_timed(self, mode: str, q: np.ndarray, gq: np.ndarray, exclude: int | None = None,
                   allowed: np.ndarray | None = None, shortlist_only: bool = False,
                   **options) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Rank every database position for query descriptors ``q`` and global query vector ``gq``.

        The search of :meth:`search` after feature extraction; ``gq`` lives in
        the space of ``options["global_field"]``. ``exclude``: a database
        position dropped from the ranking (a database image used as a held-out
        query). ``allowed``: a boolean mask of the positions that may be ranked
        (filters); the others never enter the first stage's candidates, and
        when at most :data:`EXACT_ALLOWED` are allowed, ``local`` and ``l2g``
        score them all with the exact Chamfer similarity instead of the
        approximate search (whose neighbours could miss most of a small set).
        Returns ``(scores, positions, timings in ms)``, best first.
        ``shortlist_only`` (``l2g``): stop before the re-ranking and return only the images the first
        stage reached (the shortlist a shard set merges and re-ranks once, see :mod:`finegrain.local.sharded`).
        """
        if mode not in LOCAL_MODES + ("global",):
            raise ValueError(f"unknown local search mode {mode!r}")
        cfg, opts = split_options(options)
        q = np.ascontiguousarray(q, np.float32)
        if opts.get("query_features"):
            q = q[: int(opts["query_features"])]
        G = self.global_matrix(opts.get("global_field", "instance"))
        gq = np.asarray(gq, np.float32)
        gq = gq / max(float(np.linalg.norm(gq)), 1e-12)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        n = self.db.n_images
        if n == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), timings
        keep = np.ones(n, bool) if allowed is None else np.array(allowed, bool)  # positions that may be ranked
        if exclude is not None:
            keep[exclude] = False

        if mode in ("global", "global+local"):
            gs = G @ gq
            order = np.argsort(-gs, kind="stable")
            order = order[keep[order]]
            scores = gs[order]
            t2 = time.perf_counter()
            timings["search_ms"] = (t2 - t0) * 1e3
            if mode == "global+local":
                depth = int(options["shortlist"]) if options.get("shortlist") is not None else GLOBAL_LOCAL_SHORTLIST
                head = order[:depth]
                exact = chamfer_scores(q, self.db, head)
                o = np.argsort(-exact, kind="stable")
                order = np.concatenate([head[o], order[depth:]])
                scores = np.concatenate([exact[o], scores[depth:]])
                timings["rerank_ms"] = (time.perf_counter() - t2) * 1e3
        else:
            R = self.exact_rerank_for(mode, opts.get("exact_rerank"))
            if allowed is not None and np.count_nonzero(keep) <= EXACT_ALLOWED:
                # A small filtered set: exact Chamfer over all of it (cheaper and better than the approximation).
                all_scores = np.zeros(n, np.float32)
                cand = np.flatnonzero(keep)
                all_scores[cand] = chamfer_scores(q, self.db, cand)
                cand = cand[np.argsort(-all_scores[cand], kind="stable")]
                reached, R = keep.copy(), 0
            else:
                approx = self.approx()  # built once; the per-call knobs are set under the lock below
                with self._lock:
                    approx.knn = int(opts.get("knn") or self.knn)
                    approx.nprobe = int(opts.get("nprobe") or self.nprobe)
                    approx.set_search_params()
                    all_scores, reached = approx.score_all(q)
                reached &= keep
                cand = np.flatnonzero(reached)
                cand = cand[np.argsort(-all_scores[cand], kind="stable")]
            if R > 0 and len(cand):  # verification: the approximate top R re-scored with the exact Chamfer
                head = cand[:R]
                exact = chamfer_scores(q, self.db, head)
                all_scores[head] = exact
                cand = np.concatenate([head[np.argsort(-exact, kind="stable")], cand[R:]])
            rest = np.flatnonzero(~reached & keep)
            order = np.concatenate([cand, rest])
            scores = all_scores[order]
            t2 = time.perf_counter()
            timings["search_ms"] = (t2 - t0) * 1e3
            if shortlist_only:
                self.db.release()
                return all_scores[cand], cand, timings
            if mode == "l2g" and len(cand):
                head = cand[: cfg.k]
                graph = self.graph() if cfg.pairs == "graph" else None
                t2 = time.perf_counter()
                pairs = None if graph is not None else online_pairs(
                    [self.db.image(int(p), cfg.pair_features) for p in head], G[head], cfg.pair_neighbors,
                    cfg.pair_features)
                res = l2g_rerank(all_scores[head], head, gq, G[head], cfg, graph=graph, pairs=pairs)
                order = np.concatenate([res.ids, order[len(head):]])
                scores = np.concatenate([res.scores, scores[len(head):]])
                timings["rerank_ms"] = (time.perf_counter() - t2) * 1e3
                timings.update({f"rerank_{key}": v for key, v in res.timings.items()})
        timings["rank_ms"] = (time.perf_counter() - t0) * 1e3
        self.db.release()
        return np.asarray(scores, np.float32), order, timings

    def exact_top(self, q: np.ndarray, k: int = 100) -> np.ndarray:
        """Exact Chamfer scores of ``q`` against every database image (for recall checks)."""
        return chamfer_scores(q, self.db)


def _database(parts: list, ids: np.ndarray, codec, dim: int) -> LocalDatabase:
    """The local database over a field's live chunks (:meth:`~finegrain.store.snapshot.Snapshot.field_parts`).

    Chunks are kept as they are (memory-mapped when fully live) when each is grouped by image and the images
    rise from chunk to chunk, as commits write them; otherwise (rows of one image in two chunks) the rows are
    gathered and sorted by image in memory.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return LocalDatabase(np.zeros((0, dim), np.float32), np.zeros(len(ids) + 1, np.int64))
    bounds = np.concatenate([ids, [np.iinfo(np.int64).max]])  # each image's first row; the end
    grouped = all(bool(np.all(p.owners[1:] >= p.owners[:-1])) for p in parts) and all(
        a.owners[-1] < b.owners[0] for a, b in zip(parts, parts[1:]))
    if grouped:
        vectors = [p.vectors for p in parts]
        # rows before each image: the sum over chunks of the chunk's rows of smaller image ids
        offsets = sum(np.searchsorted(p.owners, bounds, side="left") for p in parts)
    else:
        owners = np.concatenate([p.owners for p in parts])
        order = np.argsort(owners, kind="stable")  # group rows by image, keep strongest-first inside
        vectors = [np.concatenate([p.vectors for p in parts])[order]]
        offsets = np.searchsorted(owners[order], bounds, side="left")
    offsets = np.asarray(offsets, np.int64)
    offsets[-1] = sum(len(v) for v in vectors)
    return LocalDatabase(vectors, offsets, codec.scale, codec.offset)


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(ids, "<i8").tobytes()).hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _write_cache(path: Path, write, suffix: str = "") -> None:
    """Write a cache file atomically under a name no other writer uses (concurrent first searches race here)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.replace(path)
    except (OSError, RuntimeError):  # a read-only or full disk (FAISS raises RuntimeError): kept in memory only
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
