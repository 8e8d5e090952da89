"""Peers of ``finegrain bench scale --peers``: other engines on the same stored vectors, scored on finegrain's scoring.

Multi-vector peers get every image's global vector and all its segment vectors, read from the
synthetic index's own chunk files (memory-mapped), in the MaxSim form of :mod:`finegrain.bench.maxsim`:
their native late-interaction score (sum over query vectors of the best match) then *is* finegrain's
exact score (``exhaustive`` over every image), so ``agreement_at_10`` (top-10 overlap with finegrain's
exact ranking) measures the engine, not a different scoring function:

- ``numpy-maxsim``: exact MaxSim in numpy, chunk by chunk (the independent check: must agree 1.0);
- ``faiss-flat-rescore``: FAISS flat (exact inner product) top-N segment vectors per sub-query term and
  top-N global vectors for the global term, then exact MaxSim re-score of the union of their images
  (ColBERT v1's pipeline);
- ``qdrant-edge``: Qdrant Edge (``qdrant-edge-py``), Qdrant's own engine in-process, multivector MaxSim, exact;
- ``qdrant-local``: ``qdrant-client`` local mode (pure Python, in-process, on disk), multivector ``MAX_SIM``, dot;
- ``qdrant-server``: the same against a Qdrant server at ``FINEGRAIN_QDRANT_URL`` (none ships here);
- ``lancedb``: an embedded LanceDB table with a multivector column, exact (no ANN index), dot;
- ``fast-plaid``: the PLAID engine (centroid pruning, 4-bit residuals), in its own virtualenv (torch 2.11).

Global peers get the global vectors and the full query (its first vector) and are compared with exact
inner-product search: ``faiss-hnsw``, ``faiss-ivf``, ``usearch`` (HNSW) and ``hnswlib``.

A peer that cannot run here (package missing, too large for its design) gives a row with ``skipped``
(the reason) and no numbers. Latencies are search alone (queries embedded beforehand, one at a time);
finegrain's own rows in ``bench scale`` include query decomposition and encoding: ``encode_ms_p50``
on each peer row says how much of those that is.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import maxsim

MULTIVECTOR_PEERS = ("numpy-maxsim", "faiss-flat-rescore", "qdrant-edge", "qdrant-local", "qdrant-server", "lancedb",
                     "fast-plaid")
GLOBAL_PEERS = ("faiss-hnsw", "faiss-ivf", "usearch", "hnswlib")
ALL_PEERS = MULTIVECTOR_PEERS + GLOBAL_PEERS
#: fast-plaid's release whose wheels are built for torch 2.11 (the version it pins).
FAST_PLAID = "fast-plaid==1.7.0.2110"
#: Candidate vectors per query vector of ``faiss-flat-rescore``.
FLAT_TOP_N = 1_000
#: qdrant-client's local mode keeps every vector in Python memory and warns above this many points.
QDRANT_LOCAL_MAX = 20_000
REFERENCE_MV = "exhaustive:candidates=0"
REFERENCE_GLOBAL = "global-exact"


class PeerSkipped(Exception):
    """The peer cannot run here; the message is the row's ``skipped`` reason."""


def parse_peers(text: str) -> list[str]:
    """``"all"`` or a comma list of peer names -> the names (ValueError naming the known ones)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return list(ALL_PEERS)
    unknown = [p for p in names if p not in ALL_PEERS]
    if unknown or not names:
        raise ValueError(f"unknown peer(s) {', '.join(unknown) or repr(text)}; choose from all, {', '.join(ALL_PEERS)}")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------- vectors
class SegmentRows:
    """An index's segment rows chunk by chunk (memory-mapped), grouped per image position without copying them."""

    def __init__(self, snapshot: Any):
        self.n = len(snapshot)
        self.dim = int(snapshot.dim)
        if snapshot.segment_config is None or not snapshot.has_field("segments"):
            raise PeerSkipped("the index has no segments (multi-vector peers need them: index with --segments)")
        self.globals = np.asarray(snapshot.global_rows.vectors, dtype=np.float32)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # vectors, order, offsets, first
        self.row_positions: list[np.ndarray] = []  # per part: each stored row's image position
        cfg = snapshot.segment_config
        n_levels = len(cfg.levels) if cfg is not None else 0
        for part in snapshot.field_parts("segments"):
            if len(part) == 0:
                continue
            if part.vectors.dtype != np.float32 or part.vectors.shape[1] != self.dim:
                raise PeerSkipped(f"the segments are stored compact ({part.vectors.dtype}, {part.vectors.shape[1]} "
                                  f"dims); peers need the float32 joint-space rows")
            pos = snapshot.positions(np.asarray(part.owners))
            order = np.argsort(pos, kind="stable")
            if "level" in part.attrs:  # the rows finegrain scores: levels of the index's segment settings
                order = order[np.asarray(part.attrs["level"])[order] < n_levels]
                if len(order) == 0:
                    continue
            first, last = int(pos[order[0]]), int(pos[order[-1]])
            offsets = np.searchsorted(pos[order], np.arange(first, last + 2))
            self.parts.append((part.vectors, order, offsets, first))
            self.row_positions.append(pos)
        self.n_rows = sum(len(p[1]) for p in self.parts)

    def maxsim_all(self, queries: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Exact weighted MaxSim of every image (augmented queries, :func:`maxsim.augment_queries`)."""
        d = self.dim
        best = self.globals @ queries[:, :d].T + queries[:, d]  # each image's [g, 1] row
        for vectors, order, offsets, first in self.parts:
            sims = (vectors @ queries[:, :d].T - queries[:, d])[order]  # [s, -1] rows, grouped by image
            counts = np.diff(offsets)
            has = counts > 0
            at = first + np.flatnonzero(has)
            best[at] = np.maximum(best[at], np.maximum.reduceat(sims, offsets[:-1][has], axis=0))
        return best @ weights

    def rows_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augmented MaxSim rows (:func:`maxsim.augment_docs`) of the images at ascending ``positions``."""
        segs, counts = [], np.zeros(len(positions), np.int64)
        for vectors, order, offsets, first in self.parts:
            mine = np.flatnonzero((positions >= first) & (positions < first + len(offsets) - 1))
            if len(mine) == 0:
                continue
            local = positions[mine] - first
            a, b = offsets[local], offsets[local + 1]
            take = np.concatenate([order[x:y] for x, y in zip(a, b)]) if len(a) else np.zeros(0, np.int64)
            segs.append((mine, b - a, np.asarray(vectors[take], np.float32)))
            counts[mine] += b - a
        # images' rows in position order (parts cover disjoint position ranges, so one part per image)
        seg_offsets = np.zeros(len(positions) + 1, np.int64)
        seg_offsets[1:] = np.cumsum(counts)
        out = np.empty((int(seg_offsets[-1]), self.dim), np.float32)
        for mine, cnt, rows in segs:
            starts = seg_offsets[mine]
            dest = np.repeat(starts - np.cumsum(cnt) + cnt, cnt) + np.arange(int(cnt.sum()))
            out[dest] = rows
        return maxsim.augment_docs(self.globals[positions], out, seg_offsets)

    def blocks(self, block: int = 2_000) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first position, augmented rows, offsets) for consecutive blocks of images."""
        for a in range(0, self.n, block):
            docs, offsets = self.rows_of(np.arange(a, min(self.n, a + block)))
            yield a, docs, offsets

    def segment_topn(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Positions of the images owning each query's top-``n`` segment vectors (FAISS flat, one pass per chunk)."""
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32)
        best_s = np.zeros((len(q), 0), np.float32)
        best_p = np.zeros((len(q), 0), np.int64)
        for (vectors, order, _, _), pos in zip(self.parts, self.row_positions):
            s, i = faiss.knn(q, np.ascontiguousarray(vectors), min(n, len(order)), metric=faiss.METRIC_INNER_PRODUCT)
            best_s, best_p = np.concatenate([best_s, s], axis=1), np.concatenate([best_p, pos[i]], axis=1)
            keep = np.argsort(-best_s, axis=1, kind="stable")[:, :n]
            best_s, best_p = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_p, keep, 1)
        return best_p.ravel()


# ------------------------------------------------------------ prepared data
@dataclass
class Prepared:
    """What every peer of one size shares: the queries (finegrain's own vectors) and the exact references."""

    ids: np.ndarray  # position -> image id
    q_vectors: np.ndarray  # (total, d): each query's full text then its sub-queries
    q_offsets: np.ndarray  # (n_queries + 1,)
    weight_global: float
    reference_mv: np.ndarray  # (n_queries, k) image ids, -1 padded
    reference_global: np.ndarray
    encode_ms: np.ndarray
    targets: np.ndarray  # per query, the relevant image's id (labelled queries; empty: none)

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in vars(self).items()}
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> Prepared:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        data["weight_global"] = float(data["weight_global"])
        data.setdefault("targets", np.zeros(0, np.int64))  # unlabelled
        return cls(**data)

    def query(self, i: int) -> np.ndarray:
        return self.q_vectors[self.q_offsets[i]:self.q_offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.q_offsets) - 1


def prepare(path: str, texts: Sequence[str], k: int, targets: Sequence[int] = ()) -> Prepared:
    """Encode the queries as finegrain does (decomposition, encoder) and rank them exactly, on the index at ``path``."""
    from ..index import Index
    from ..search.multivector import MultiVectorConfig

    with Index.open(path) as index:
        snap = index.snapshot
        weight = MultiVectorConfig.from_dict(snap.search_settings.get("multivector", {})).weight_global
        vectors, offsets, ref_mv, encode_ms = [], [0], [], []
        segmented = snap.segment_config is not None and snap.has_field("segments")
        for text in texts:
            if segmented:
                hits = index.search(text=text, k=k, mode="exhaustive", candidates=0)
                subqueries = list(hits.subqueries)
                ref_mv.append([h.id for h in hits][:k] + [-1] * (k - len(hits)))
            else:  # global peers only (the multi-vector ones are skipped: no segments)
                subqueries = [text]
                ref_mv.append([-1] * k)
            t0 = time.perf_counter()
            q = np.asarray(snap.encoder.encode_texts(subqueries), np.float32)
            encode_ms.append((time.perf_counter() - t0) * 1000)
            vectors.append(q)
            offsets.append(offsets[-1] + len(q))
        q_all = np.concatenate(vectors)
        full = q_all[np.asarray(offsets[:-1])]
        g = np.asarray(snap.global_rows.vectors, np.float32)
        ref_g = []
        for q in full:
            _, top = maxsim.top_k(g @ q, np.asarray(snap.ids), k)
            ref_g.append(list(top) + [-1] * (k - len(top)))
        return Prepared(np.asarray(snap.ids), q_all, np.asarray(offsets, np.int64), weight,
                        np.asarray(ref_mv, np.int64), np.asarray(ref_g, np.int64), np.asarray(encode_ms),
                        np.asarray(targets, np.int64))


# -------------------------------------------------------------------- peers
class Peer:
    """One engine: ``build`` once, ``search`` one query (its position in :class:`Prepared`), top-k positions."""

    name = ""
    mode = "maxsim"
    exact = True
    native = ""  # what the engine computes natively and how it was given finegrain's score
    storage = "own"  # "own": its own files under workdir; "index": reads finegrain's chunk files

    def __init__(self, prepared: Prepared, workdir: Path, k: int):
        self.prep, self.workdir, self.k = prepared, workdir, k
        self.info: dict[str, Any] = {}

    def build(self, index_path: str) -> None:
        raise NotImplementedError

    def search(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def rss_mb(self) -> float | None:
        return None  # None: this process's peak

    def own_bytes(self) -> int:
        """The bytes of the engine's own files (the work folder)."""
        return _dir_bytes(self.workdir)

    def close(self) -> None:
        pass

    def query(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The i-th query in MaxSim form: (augmented vectors, weights)."""
        return maxsim.augment_queries(self.prep.query(i), self.prep.weight_global)


def _require(*modules: str) -> None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as exc:
            raise PeerSkipped(f"python package {m!r} is not installed ({exc}); "
                              "pip install 'finegrain[peers]' installs the peers") from None


class _SegmentPeer(Peer):
    def build(self, index_path: str) -> None:
        from ..index import Index

        self.index = Index.open(index_path)
        self.rows = SegmentRows(self.index.snapshot)

    def close(self) -> None:
        self.index.close()


class NumpyMaxSim(_SegmentPeer):
    name = "numpy-maxsim"
    native = "exact MaxSim over the MaxSim-form vectors, numpy, chunk by chunk (finegrain's score exactly)"
    storage = "index"

    def search(self, i: int) -> np.ndarray:
        q, w = self.query(i)
        return maxsim.top_k(self.rows.maxsim_all(q, w), np.arange(self.rows.n), self.k)[1]


class FaissFlatRescore(_SegmentPeer):
    name = "faiss-flat-rescore"
    exact = False
    storage = "index"

    def __init__(self, prepared: Prepared, workdir: Path, k: int, top_n: int = FLAT_TOP_N):
        super().__init__(prepared, workdir, k)
        self.top_n = top_n
        self.native = (f"FAISS flat inner product: top {top_n} segment vectors per sub-query term and top {top_n} "
                       "global vectors for the global term, then exact MaxSim re-score of their images")

    def build(self, index_path: str) -> None:
        _require("faiss")
        super().build(index_path)

    def search(self, i: int) -> np.ndarray:
        import faiss

        raw = self.prep.query(i)
        _, g = faiss.knn(raw[:1], self.rows.globals, min(self.top_n, self.rows.n), metric=faiss.METRIC_INNER_PRODUCT)
        cands = [g[0], self.rows.segment_topn(raw, self.top_n)]
        positions = np.unique(np.concatenate(cands))
        positions = positions[positions >= 0]
        q, w = self.query(i)
        docs, offsets = self.rows.rows_of(positions)
        return maxsim.top_k(maxsim.maxsim(q, w, docs, offsets), positions, self.k)[1]


class QdrantPeer(Peer):
    name = "qdrant-local"
    native = ("qdrant-client local mode (pure Python/numpy, in-process, persisted under a path), "
              "multivector MAX_SIM comparator, dot product")

    def connect(self) -> Any:
        from qdrant_client import QdrantClient

        n = len(self.prep.ids)
        if n > QDRANT_LOCAL_MAX:
            raise PeerSkipped(f"qdrant-client's local mode keeps every vector in Python memory and is meant for up to "
                              f"{QDRANT_LOCAL_MAX:,} points (it warns above that); {n:,} images here")
        return QdrantClient(path=str(self.workdir / "qdrant"))

    def build(self, index_path: str) -> None:
        _require("qdrant_client")
        from qdrant_client import models

        from ..index import Index

        self.client = self.connect()
        self.info["qdrant_client"] = _version("qdrant-client")
        with Index.open(index_path) as index:
            rows = SegmentRows(index.snapshot)
            self.client.create_collection("images", vectors_config={"v": models.VectorParams(
                size=rows.dim + 1, distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))})
            for first, docs, offsets in rows.blocks(256):
                self.client.upsert("images", [models.PointStruct(id=first + j, vector={"v": docs[a:b].tolist()})
                                              for j, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))])

    def search(self, i: int) -> np.ndarray:
        q, w = self.query(i)
        res = self.client.query_points("images", query=maxsim.scaled(q, w).tolist(), using="v", limit=self.k)
        return np.array([p.id for p in res.points], np.int64)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


class QdrantServerPeer(QdrantPeer):
    name = "qdrant-server"
    native = "a Qdrant server (FINEGRAIN_QDRANT_URL), multivector MAX_SIM comparator, dot product, HNSW off (exact)"

    def connect(self) -> Any:
        from qdrant_client import QdrantClient

        url = os.environ.get("FINEGRAIN_QDRANT_URL")
        if not url:
            raise PeerSkipped("no Qdrant server here: PyPI, Debian and npm ship Qdrant clients only, not the server; "
                              "set FINEGRAIN_QDRANT_URL to a running server to include it")
        client = QdrantClient(url=url)
        if client.collection_exists("images"):
            client.delete_collection("images")
        return client

    def search(self, i: int) -> np.ndarray:
        from qdrant_client import models

        q, w = self.query(i)
        res = self.client.query_points("images", query=maxsim.scaled(q, w).tolist(), using="v", limit=self.k,
                                       search_params=models.SearchParams(exact=True))
        return np.array([p.id for p in res.points], np.int64)


class QdrantEdgePeer(Peer):
    name = "qdrant-edge"
    native = ("Qdrant Edge (qdrant-edge-py: Qdrant's Rust storage and search engine in-process, one shard on disk), "
              "multivector MaxSim comparator, dot product, exact search (SearchParams(exact=True))")

    def build(self, index_path: str) -> None:
        _require("qdrant_edge")
        import qdrant_edge as qe

        from ..index import Index

        with Index.open(index_path) as index:
            rows = SegmentRows(index.snapshot)
            config = qe.EdgeConfig(vectors={"v": qe.EdgeVectorParams(
                size=rows.dim + 1, distance=qe.Distance.Dot,
                multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim))})
            self.shard = qe.EdgeShard.create(str(self.workdir / "qdrant-edge"), config)
            for first, docs, offsets in rows.blocks(256):
                self.shard.update(qe.UpdateOperation.upsert_points(
                    [qe.Point(first + j, {"v": docs[a:b].tolist()}) for j, (a, b) in enumerate(zip(offsets[:-1],
                                                                                                   offsets[1:]))]))
            self.shard.flush()
        self.info["qdrant_edge"] = _version("qdrant-edge-py")

    def search(self, i: int) -> np.ndarray:
        import qdrant_edge as qe

        q, w = self.query(i)
        res = self.shard.query(qe.QueryRequest(limit=self.k, query=qe.Query.Nearest(maxsim.scaled(q, w).tolist(),
                                                                                     using="v"),
                                               params=qe.SearchParams(exact=True)))
        return np.array([int(p.id) for p in res], np.int64)

    def close(self) -> None:
        shard = getattr(self, "shard", None)
        if shard is not None:
            shard.close()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


class LanceDBPeer(Peer):
    name = "lancedb"
    native = ("embedded LanceDB table, one multivector column (List<FixedSizeList<float32>>), exact multivector "
              "search (no ANN index), dot distance")

    def build(self, index_path: str) -> None:
        _require("lancedb", "pyarrow")
        import lancedb
        import pyarrow as pa

        from ..index import Index

        db = lancedb.connect(str(self.workdir / "lancedb"))
        self.table = None
        with Index.open(index_path) as index:
            rows = SegmentRows(index.snapshot)
            for first, docs, offsets in rows.blocks():
                flat = pa.FixedSizeListArray.from_arrays(pa.array(docs.ravel(), pa.float32()), rows.dim + 1)
                column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)
                batch = pa.table({"pos": pa.array(np.arange(first, first + len(offsets) - 1), pa.int64()),
                                  "vectors": column})
                if self.table is None:
                    self.table = db.create_table("images", batch)
                else:
                    self.table.add(batch)
        self.info["lancedb"] = _version("lancedb")
        self.distance = "dot"
        try:
            self._search(*self.query(0))
        except Exception as exc:  # older LanceDB: cosine only for multivectors; weights by repetition then
            self.distance = "cosine"
            self.info["dot_refused"] = str(exc).splitlines()[0][:200]
            self.native = self.native.replace("dot distance", "cosine distance (dot refused), weights by repetition")

    def _search(self, q: np.ndarray, w: np.ndarray) -> np.ndarray:
        assert self.table is not None
        if self.distance == "dot":
            query = maxsim.scaled(q, w)
        else:
            query, exact = maxsim.repeated(q, w)
            self.exact = self.exact and exact
        search: Any = self.table.search(query, vector_column_name="vectors")  # a vector query builder
        hits = (search.distance_type(self.distance)
                .limit(self.k).select(["pos"]).to_arrow())
        return np.asarray(hits["pos"].to_numpy(), np.int64)

    def search(self, i: int) -> np.ndarray:
        return self._search(*self.query(i))


class FastPlaidPeer(Peer):
    name = "fast-plaid"
    exact = False
    native = ("fast-plaid 1.7.0.2110 (PLAID: k-means centroids, 4-bit residuals, IVF probe 8, 4,096 full scores), "
              "CPU, own virtualenv with torch 2.11, dot product on the MaxSim-form vectors")
    create_env = True
    cache_dir: Path | None = None
    nbits, n_ivf_probe, n_full_scores = 4, 8, 4096  # fast-plaid's defaults
    block_images = 5_000  # images exported (and given to create/update) at a time: one block in memory

    def build(self, index_path: str) -> None:
        from ..index import Index

        python = fastplaid_python(self.cache_dir, self.create_env)
        with Index.open(index_path) as index:
            rows = SegmentRows(index.snapshot)
            # PLAID packs (dim * nbits) bits per vector into bytes: zero columns pad the dim to a multiple of 8
            pad = -(rows.dim + 1) % 8
            index_dir, fingerprint = self.index_dir(index_path, index.snapshot.rows_generation, rows)
            if not self.reusable(index_dir, fingerprint):
                # PLAID assumes unit vectors (its centroids are normalised): every MaxSim-form row has norm
                # sqrt(2), so dividing them all by it changes no ranking
                for first, docs, offsets in rows.blocks(self.block_images):
                    unit = docs / np.float32(math.sqrt(2.0))
                    np.save(self.workdir / f"docs-{first:09d}.npy", np.pad(unit, ((0, 0), (0, pad))))
                    np.save(self.workdir / f"docs-{first:09d}-offsets.npy", offsets)
        qs = [np.pad(maxsim.scaled(*self.query(i)), ((0, 0), (0, pad))) for i in range(len(self.prep))]
        np.savez(self.workdir / "queries.npz", vectors=np.concatenate(qs),
                 offsets=np.concatenate([[0], np.cumsum([len(q) for q in qs])]))
        runner = Path(__file__).with_name("fastplaid_runner.py")
        knobs = ["--nbits", str(self.nbits), "--n-ivf-probe", str(self.n_ivf_probe),
                 "--n-full-scores", str(self.n_full_scores), "--index-dir", str(index_dir)]
        if fingerprint is not None:
            knobs += ["--fingerprint", fingerprint]
        if (self.nbits, self.n_ivf_probe, self.n_full_scores) != (4, 8, 4096):
            self.native = (f"fast-plaid (PLAID: {self.nbits}-bit residuals, IVF probe {self.n_ivf_probe}, "
                           f"{self.n_full_scores} full scores), CPU, own virtualenv with torch 2.11, dot product")
        # the build's progress goes to a log beside its index (an hour at 100,000 images): tail it to follow;
        # appended to, so a run that reuses the index keeps the build's record
        with open(index_dir.with_name(index_dir.name + ".log"), "a") as progress:
            proc = subprocess.run([str(python), str(runner), str(self.workdir), str(self.k), *knobs],
                                  stdout=progress, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONNOUSERSITE": "1"})
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"fast-plaid runner failed (exit {proc.returncode}): {tail[0]}")
        self.result = json.loads((self.workdir / "result.json").read_text())
        for block in self.workdir.glob("docs-*.npy"):  # the export is not fast-plaid's storage
            block.unlink()
        self.info.update(torch=self.result["torch"], fast_plaid=self.result["fast_plaid"],
                         build_reused=bool(self.result.get("build_reused")))

    def own_bytes(self) -> int:
        return int(self.result["index_bytes"])  # its index may live in the cache, outside the work folder

    def index_dir(self, index_path: str, generation: int, rows: SegmentRows) -> tuple[Path, str | None]:
        """Where fast-plaid's index lives, and the fingerprint that lets a later run reuse it.

        With a cache folder: ``CACHE/peers/fast-plaid-index/KEY``, KEY naming the finegrain index (its path,
        the generation of its rows, its size) and the build's knobs, so a changed index is never reused.
        Without one: inside the peer's work folder, removed after the run (nothing to reuse).
        """
        if self.cache_dir is None:
            return self.workdir / "index", None
        fingerprint = json.dumps({"index": str(Path(index_path).resolve()), "generation": generation,
                                  "images": rows.n, "rows": rows.n_rows, "dim": rows.dim, "nbits": self.nbits,
                                  "blocks": self.block_images, "fast_plaid": FAST_PLAID}, sort_keys=True)
        key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        folder = Path(self.cache_dir) / "peers" / "fast-plaid-index"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / key, fingerprint

    @staticmethod
    def reusable(index_dir: Path, fingerprint: str | None) -> bool:
        """Whether a finished fast-plaid build with this fingerprint is in ``index_dir`` (the runner's marker)."""
        marker = index_dir / "finegrain-built.json"
        if fingerprint is None or not marker.exists():
            return False
        try:
            return bool(json.loads(marker.read_text()).get("fingerprint") == fingerprint)
        except (OSError, ValueError):
            return False

    def search(self, i: int) -> np.ndarray:
        return np.asarray(self.result["ranked"][i], np.int64)

    def rss_mb(self) -> float | None:
        return float(self.result["rss_mb"])


def fastplaid_python(cache_dir: Path | None, create: bool) -> Path:
    """fast-plaid's interpreter: ``FINEGRAIN_FASTPLAID_PYTHON``, else a virtualenv under the cache (made if asked)."""
    given = os.environ.get("FINEGRAIN_FASTPLAID_PYTHON")
    if given:
        return Path(given)
    venv = Path(cache_dir or Path.home() / ".cache" / "finegrain" / "bench") / "peers" / "fast-plaid-venv"
    python = venv / "bin" / "python"
    ok = venv / ".installed"
    if ok.exists():
        return python
    if not create:
        raise PeerSkipped(f"fast-plaid's virtualenv is not set up ({venv}); bench scale --peers fast-plaid makes it "
                          f"({FAST_PLAID} with torch 2.11 from PyPI, about 3 GB)")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", FAST_PLAID]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PeerSkipped(f"could not install {FAST_PLAID} in its own virtualenv ({' '.join(step[-2:])}): "
                              f"{last[0]}")
    ok.write_text(FAST_PLAID + "\n")
    return python


class _GlobalPeer(Peer):
    mode = "global"
    exact = False
    storage = "memory"

    def build(self, index_path: str) -> None:
        from ..index import Index

        with Index.open(index_path) as index:
            self.vectors = np.ascontiguousarray(index.snapshot.global_rows.vectors, dtype=np.float32)
        self.make(self.vectors)

    def make(self, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def full(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.prep.query(i)[:1], dtype=np.float32)


class FaissHNSW(_GlobalPeer):
    name = "faiss-hnsw"
    native = "FAISS IndexHNSWFlat, M 32, efConstruction 40, efSearch 64, inner product"

    def make(self, vectors: np.ndarray) -> None:
        _require("faiss")
        import faiss

        self.ann = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        self.ann.hnsw.efSearch = 64
        self.ann.add(vectors)

    def search(self, i: int) -> np.ndarray:
        return self.ann.search(self.full(i), self.k)[1][0]


class FaissIVF(_GlobalPeer):
    name = "faiss-ivf"

    def make(self, vectors: np.ndarray) -> None:
        _require("faiss")
        import faiss

        n, d = vectors.shape
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        self.ann = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        self.ann.train(vectors)
        self.ann.add(vectors)
        self.ann.nprobe = min(nlist, max(8, nlist // 8))
        self.native = f"FAISS IndexIVFFlat, {nlist} lists, nprobe {self.ann.nprobe}, inner product"

    def search(self, i: int) -> np.ndarray:
        return self.ann.search(self.full(i), self.k)[1][0]


class USearchPeer(_GlobalPeer):
    name = "usearch"
    native = "usearch HNSW (default connectivity and expansion), inner product, f32"

    def make(self, vectors: np.ndarray) -> None:
        _require("usearch")
        from usearch.index import Index as UIndex

        self.ann = UIndex(ndim=vectors.shape[1], metric="ip", dtype="f32")
        self.ann.add(np.arange(len(vectors)), vectors)

    def search(self, i: int) -> np.ndarray:
        return np.asarray(self.ann.search(self.full(i)[0], self.k).keys, np.int64)


class HnswlibPeer(_GlobalPeer):
    name = "hnswlib"
    native = "hnswlib HNSW, M 16, ef_construction 200, ef 64, inner product"

    def make(self, vectors: np.ndarray) -> None:
        _require("hnswlib")
        import hnswlib

        self.ann = hnswlib.Index(space="ip", dim=vectors.shape[1])
        self.ann.init_index(max_elements=len(vectors), ef_construction=200, M=16)
        self.ann.add_items(vectors, np.arange(len(vectors)))
        self.ann.set_ef(64)

    def search(self, i: int) -> np.ndarray:
        return np.asarray(self.ann.knn_query(self.full(i), k=min(self.k, len(self.vectors)))[0][0], np.int64)


PEER_TYPES: dict[str, type[Peer]] = {p.name: p for p in (NumpyMaxSim, FaissFlatRescore, QdrantEdgePeer, QdrantPeer,
                                                         QdrantServerPeer,
                                                         LanceDBPeer, FastPlaidPeer, FaissHNSW, FaissIVF,
                                                         USearchPeer, HnswlibPeer)}


# ---------------------------------------------------------------- measuring
def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def agreement(found: Sequence[Sequence[int]], reference: np.ndarray, k: int) -> float:
    """Mean top-``k`` overlap with the reference lists (-1 pads ignored)."""
    out = []
    for a, b in zip(found, reference):
        ref = [int(x) for x in b[:k] if x >= 0]
        out.append(len(set(int(x) for x in list(a)[:k]) & set(ref)) / max(1, min(k, len(ref))))
    return float(np.mean(out)) if out else float("nan")


def quality(found: Sequence[Sequence[int]], targets: np.ndarray) -> dict[str, float]:
    """NDCG@10 and R@1/5/10 of ranked image ids against one relevant image per query (empty without labels)."""
    if len(targets) == 0:
        return {}
    from ..eval.metrics import ndcg_at_k, recall_at_k

    ranks = np.array([list(a).index(t) if t in list(a) else np.inf for a, t in zip(found, targets)], np.float64)
    return {"ndcg_at_10": ndcg_at_k(ranks, 10), "r1": 100 * recall_at_k(ranks, 1), "r5": 100 * recall_at_k(ranks, 5),
            "r10": 100 * recall_at_k(ranks, 10)}


def measure_peer(index_path: str, name: str, prepared_path: str, workdir: str, k: int,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build one peer on the index at ``index_path``, run every prepared query; its row (``skipped`` if it cannot)."""
    prep = Prepared.load(Path(prepared_path))
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    cls = PEER_TYPES[name]
    peer = cls(prep, work, k)
    for key, value in (options or {}).items():
        setattr(peer, key, value)
    row: dict[str, Any] = {"system": name, "mode": cls.mode,
                           "reference": REFERENCE_MV if cls.mode == "maxsim" else REFERENCE_GLOBAL}
    try:
        t0 = time.perf_counter()
        peer.build(index_path)
        build_s = time.perf_counter() - t0
        peer.search(0)  # warm-up
        latencies, ranked = [], []
        for i in range(len(prep)):
            t = time.perf_counter()
            positions = peer.search(i)
            latencies.append((time.perf_counter() - t) * 1000)
            ranked.append([int(prep.ids[p]) for p in positions if p >= 0])
        if isinstance(peer, FastPlaidPeer):
            latencies, build_s = list(peer.result["latencies_ms"]), float(peer.result["build_s"])
        ref = prep.reference_mv if cls.mode == "maxsim" else prep.reference_global
        rss = peer.rss_mb()
        row.update(p50_ms=float(np.percentile(latencies, 50)), p95_ms=float(np.percentile(latencies, 95)),
                   agreement_at_10=agreement(ranked, ref, k), rss_mb=_rss_peak_mb() if rss is None else rss,
                   build_s=build_s, exact=peer.exact, native=peer.native, storage=peer.storage,
                   own_disk_bytes=peer.own_bytes(), **quality(ranked, prep.targets), **peer.info)
    except PeerSkipped as exc:
        row["skipped"] = str(exc)
    except Exception as exc:  # a peer that fails is a row too (its error), never a crashed bench
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        row["skipped"] = f"failed: {row['error']}"
    finally:
        peer.close()
    return row


def _finegrain_runner(snap: Any, base: str, options: dict[str, Any], k: int) -> tuple[Callable, bool | None]:
    """A function query vectors -> top-``k`` image ids, as ``Index.search`` ranks after encoding; and its exactness."""
    from ..compress.coded import global_vectors
    from ..retrieval.dense import search_vectors
    from ..retrieval.multivector import (
        MultiVectorParams,
        MultiVectorRetriever,
        candidate_positions,
        segment_table,
        stage_for,
    )
    from ..search import multivector as mv

    if base == "global":
        return (lambda q: search_vectors(snap, q[:1], k)[1][0]), None
    params = MultiVectorRetriever().params(snap, base, options)  # the index's saved settings, as a search reads them
    assert isinstance(params, MultiVectorParams)
    config, table = params.config(), segment_table(snap)
    n_cand, stage = stage_for(params, len(snap))

    def run(q: np.ndarray) -> np.ndarray:
        cands = (candidate_positions(snap, q, n_cand, None, stage, params.weight_global)
                 if 0 < n_cand < len(snap) else None)
        # read per query, as the retriever does: the HNSW graph's own rows once the stage has loaded it
        return snap.ids[mv.search(base, table, global_vectors(snap), q, k, config, cands)[1]]
    return run, base == "exhaustive" and not 0 < n_cand < len(snap)


def measure_finegrain_search(index_path: str, modes: Sequence[str], prepared_path: str, k: int) -> list[dict]:
    """finegrain's own modes timed as the peers are: on the prepared query vectors, search alone (no encoding).

    The same path as ``Index.search`` after encoding: the candidate stage (its default, or ``candidates=``),
    then :func:`finegrain.search.multivector.search` with the index's settings and the mode's options.
    """
    from ..index import Index
    from .scale import parse_mode

    prep = Prepared.load(Path(prepared_path))
    rows = []
    with Index.open(index_path) as index:
        for label in modes:
            base, options = parse_mode(label)
            run, exact = _finegrain_runner(index.snapshot, base, options, k)
            run(prep.query(0))  # warm-up: segment table, ANN
            latencies, ranked = [], []
            for i in range(len(prep)):
                t = time.perf_counter()
                ids = run(prep.query(i))
                latencies.append((time.perf_counter() - t) * 1000)
                ranked.append([int(x) for x in ids if x >= 0])
            reference = prep.reference_global if base == "global" else prep.reference_mv
            rows.append({"system": "finegrain-search", "mode": label,
                         "reference": REFERENCE_GLOBAL if base == "global" else REFERENCE_MV,
                         "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
                         "agreement_at_10": agreement(ranked, reference, k), "exact": exact,
                         **quality(ranked, prep.targets),
                         "native": "finegrain, search alone on the same query vectors as the peers",
                         "storage": "index"})
    peak = _rss_peak_mb()
    for row in rows:
        row["rss_mb"] = peak
    return rows


def run_quality(source_index: str | os.PathLike, data: str | Path, split: str, names: Sequence[str],
                modes: Sequence[str], n_queries: int, seed: int = 0, k: int = 10, cache_dir: Path | None = None,
                create_envs: bool = True, isolate: bool = True, log: Callable[[str], None] = print
                ) -> list[dict[str, Any]]:
    """Every system on the real source index with the split's captions as labelled queries (one image each).

    Rows as :func:`run_peers`'s plus ``ndcg_at_10``, ``r1``, ``r5``, ``r10`` and ``quality`` (what was measured).
    """
    from ..datasets import load_flickr8k
    from ..index import Index
    from .scale import dir_bytes

    ds = load_flickr8k(data, split)
    with Index.open(source_index) as index:
        id_of_path = {rec.path: int(i) for i, rec in index.records.items()}
    paths = ds.image_paths()
    labelled = [(c, id_of_path.get(str(paths[i].resolve()), -1)) for c, i in zip(ds.captions, ds.caption_image)]
    labelled = [(c, t) for c, t in labelled if t >= 0]
    if not labelled:
        raise ValueError(f"none of the {split} captions' images is in the source index at {source_index}")
    pick = np.random.default_rng(seed).choice(len(labelled), size=min(n_queries, len(labelled)), replace=False)
    texts, targets = [labelled[int(i)][0] for i in pick], [labelled[int(i)][1] for i in pick]
    log(f"quality: {len(texts)} {split} captions on the source index itself")
    rows = run_peers(Path(source_index), names, texts, k, isolate=isolate, cache_dir=cache_dir, create_envs=create_envs,
                     disk_bytes=dir_bytes(Path(source_index)), log=log, modes=modes, targets=targets,
                     work_dir=Path(cache_dir or Path(source_index).parent))
    for row in rows:
        row["quality"] = f"flickr8k {split} captions, {len(texts)} queries, real index"
    return rows


def _child(fn: Callable[..., Any], args: tuple, out: Any) -> None:
    try:
        out.put(("ok", fn(*args)))
    except BaseException as exc:  # the parent reports it as one line
        out.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def in_child(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Run ``fn(*args)`` in a fresh (spawned) process: its own RSS, and a crash does not take the bench down.

    ``timeout`` (seconds): the process is terminated past it and ``TimeoutError`` raised.
    """
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, out))
    proc.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            answer = out.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the process exited with code {proc.exitcode} without answering") from None
            if deadline is not None and time.monotonic() > deadline:
                proc.terminate()
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                raise TimeoutError(f"stopped after {timeout:g} s") from None
    proc.join()
    if answer[0] != "ok":
        raise RuntimeError(answer[1])
    return answer[1]


def run_peers(index_path: Path, names: Sequence[str], texts: Sequence[str], k: int = 10, isolate: bool = True,
              cache_dir: Path | None = None, create_envs: bool = True, disk_bytes: int = 0,
              log: Callable[[str], None] = print, modes: Sequence[str] = (), build_s: float = 0.0,
              targets: Sequence[int] = (), work_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every peer of ``names`` on the synthetic index at ``index_path``: one row each (skipped rows included).

    ``disk_bytes``: the finegrain index's size (peers that read its chunk files report it per image).
    ``modes``: finegrain's modes, also timed as the peers are (system ``finegrain-search``: search alone on
    the same query vectors), ``build_s`` being the index's build time.
    ``targets``: per text, the relevant image's id (labelled queries): rows gain NDCG@10 and R@1/5/10.
    ``work_dir``: where peers keep their files while they run (default: beside the index); removed after.
    """
    n_images = None
    work = Path(work_dir or Path(index_path).parent) / f"{Path(index_path).name}-peers"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    try:
        prepared = work / "prepared.npz"
        args_p = (str(index_path), list(texts), k, list(targets))
        prep = in_child(prepare, *args_p) if isolate else prepare(*args_p)
        prep.save(prepared)
        n_images = len(prep.ids)
        encode = float(np.percentile(prep.encode_ms, 50))
        if modes:
            log(f"{n_images:,} images: finegrain, search alone")
            args0 = (str(index_path), list(modes), str(prepared), k)
            for row in in_child(measure_finegrain_search, *args0) if isolate else measure_finegrain_search(*args0):
                rows.append({"images": n_images, **row, "disk_bytes_per_image": disk_bytes / n_images,
                             "build_s": build_s, "encode_ms_p50": encode, "queries": len(texts)})
                log(row_summary(rows[-1]))
        for name in names:
            log(f"{n_images:,} images: peer {name}")
            options: dict[str, Any] = {}
            if name == "fast-plaid":
                options = {"cache_dir": cache_dir, "create_env": create_envs}
            args = (str(index_path), name, str(prepared), str(work / name), k, options)
            try:
                row = in_child(measure_peer, *args) if isolate else measure_peer(*args)
            except RuntimeError as exc:  # a peer that crashed is a row too, with its reason
                row = {"system": name, "mode": PEER_TYPES[name].mode, "error": str(exc)}
            finally:
                shutil.rmtree(work / name, ignore_errors=True)
            if "p50_ms" in row:
                own = row.pop("own_disk_bytes")
                row["disk_bytes_per_image"] = (disk_bytes if row["storage"] == "index" else own) / n_images
                row["encode_ms_p50"] = encode
            else:
                row.update(p50_ms=None, p95_ms=None, agreement_at_10=None, rss_mb=None, disk_bytes_per_image=None,
                           build_s=None)
                row.setdefault("skipped", row.get("error"))
            rows.append({"images": n_images, **row, "queries": len(texts)})
            log(row_summary(rows[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def row_summary(row: dict) -> str:
    """One line of a measured row, logged as soon as it is known (a long peers run shows its results as it goes)."""
    head = f"  {row['system']} {row['mode']}: "
    if row.get("p50_ms") is None:
        return head + f"skipped ({row.get('skipped')})"
    agreement = row.get("agreement_at_10")
    build = row.get("build_s")
    return head + (f"p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, agreement@10 "
                   f"{'n/a' if agreement is None else format(agreement, '.3f')}, "
                   f"build {'n/a' if build is None else format(build, '.0f')} s"
                   + (" (an earlier run's, reused)" if row.get("build_reused") else ""))
