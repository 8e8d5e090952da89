"""Chamfer similarity between sets of local descriptors: exact, and an approximate CANN-style search.

The Chamfer similarity of a query set Q to a database image X is the mean,
over query descriptors, of the best match in X (descriptors L2-normalised, so
a match is a cosine)::

    chamfer(Q, X) = 1/|Q| * sum_{q in Q} max_{x in X} <q, x>

It is asymmetric (every query descriptor must find a match; X may hold
anything else). With a ``threshold`` t every match passes through
``phi(s) = max(s - t, 0) / (1 - t)`` (monotone, so it commutes with the max):
matches weaker than t count nothing. That is the constrained, CANN-style
similarity: only descriptors within a radius of a query descriptor matter,
so the background of non-matching images no longer decides their order, and
a neighbour search that finds every database descriptor above t computes it
exactly. :func:`chamfer_scores` computes it exactly for every database
image (one matrix product per block of images), which is the verification
reference and the ``global+local`` re-ranker.

:class:`ApproxChamfer` avoids comparing the query with every database image,
in the spirit of CANN (Aiger et al.): one FAISS index over *all* database
descriptors; each query descriptor retrieves its ``knn`` nearest database
descriptors; per image, a query descriptor's best match is the best of its
neighbours owned by that image, and where it has none its similarity is
bounded by the ``knn``-th neighbour's similarity (``fill="kth"``, an upper
bound of the true best match; with a threshold it is 0 whenever fewer than
``knn`` descriptors pass it, and the search is then exact up to the ANN's
misses). The image score is the mean over query
descriptors, computed sparsely: ``mean(fill) + sum(found best - fill) / |Q|``,
so cost grows with ``|Q| * knn``, not with the database.
:func:`recall_at_k` measures how many of the exact top-k it finds.

**Near-duplicate reduction** (``dedup=t``): descriptors of one image that are
cells of one CNN feature map are strongly correlated, so a query
descriptor's ``knn`` neighbours crowd into a few images and the lists reach
few images. With ``dedup`` the FAISS index holds only each image's
representatives (:func:`representative_rows`: greedy, strongest first, a
descriptor is dropped when its cosine to a kept one of the same image is at
least t); every list then spreads over more images. Scores are computed on
the representatives (no longer an upper bound), so :meth:`ApproxChamfer.search`
with ``exact_rerank=R`` re-scores the approximate top R with the exact
Chamfer similarity over *all* descriptors: a candidate stage plus
verification whose cost grows with ``|Q| * knn`` and ``R``, not with the
database. Over-fetching and keeping each image's best hit per query
descriptor is what the aggregation already does (only the best hit per
(query descriptor, image) counts), so it is the same as a larger ``knn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["GRAPH_QUERIES", "ApproxChamfer", "LocalDatabase", "chamfer_similarity", "chamfer_scores", "extend_graph",
           "graph_query_sets", "knn_graph", "knn_lists", "recall_at_k", "representative_rows"]


#: Below this many indexed rows the FAISS index is exact (flat), whatever ``index`` asks.
FLAT_BELOW = 10_000
#: What a database image queries with when its neighbour list is built (:func:`knn_graph`).
GRAPH_QUERIES = ("all", "representatives")


def _as_desc(x) -> np.ndarray:
    x = getattr(x, "descriptors", x)
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- database
class LocalDatabase:
    """All database descriptors, image by image: image ``i`` owns rows ``offsets[i]:offsets[i+1]``.

    The rows stay as the index stores them (float32, float16, or int8 with a per-dimension ``scale`` and
    ``offset``: a row ``c`` stands for ``offset + scale * c``; a memory-mapped field is not copied), so the
    searcher's memory is the stored size: exact Chamfer scores them block by block
    (:func:`finegrain.compress.storage.dot_rows`, the int8 scale folded into the query) and :meth:`image`
    decodes one image's rows.

    ``descriptors`` is one array, or a list of arrays whose rows follow one another (an index's chunks, each
    memory-mapped: 12 GB of them at 100,000 images of 970 int8 descriptors, never concatenated). An image's
    rows lie in one part. Passes over every row (:func:`representative_rows`) give each part's pages back
    once read (:meth:`release`), and so does each search
    (:meth:`finegrain.local.search.LocalSearcher.rank_timed`), so the process does not keep the field
    resident: at 100,000 images, 20 ``local`` and ``l2g`` queries had otherwise piled up 3.5 and 5.4 GB of
    the field's pages in the process's RSS (docs/benchmarks.md).

    Attributes
    ----------
    parts : list of (n_k, d) arrays, float32, float16 or int8, C-contiguous.
    offsets : (n_images + 1,) int64.
    scale, offset : (d,) float32, int8 rows only.
    """

    def __init__(self, descriptors: np.ndarray | Sequence[np.ndarray], offsets: np.ndarray,
                 scale: np.ndarray | None = None, offset: np.ndarray | None = None):
        parts = [descriptors] if isinstance(descriptors, np.ndarray) else list(descriptors)
        if not parts:
            raise ValueError("a local database needs at least one (possibly empty) array of descriptors")
        dtype = np.asarray(parts[0][:0]).dtype
        if any(np.asarray(p[:0]).dtype != dtype for p in parts):
            raise ValueError("every part of a local database must have one dtype")
        if dtype == np.int8:
            if scale is None or offset is None:
                raise ValueError("int8 descriptors need their scale and offset")
            scale, offset = np.asarray(scale, np.float32), np.asarray(offset, np.float32)
        elif scale is not None or offset is not None:
            raise ValueError("a scale and offset apply to int8 descriptors only")
        self.scale, self.offset = scale, offset
        keep = dtype if dtype in (np.float16, np.int8) else np.float32
        self.parts = [np.ascontiguousarray(p, dtype=keep) for p in parts]  # no copy when already so
        self.part_starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if (self.offsets[0] != 0 or self.offsets[-1] != self.part_starts[-1]
                or np.any(np.diff(self.offsets) < 0)):
            raise ValueError("offsets must rise from 0 to the number of descriptors")
        # the part holding each image's rows (an image never spans two parts: one commit writes all of them)
        part = np.searchsorted(self.part_starts, self.offsets[:-1], side="right") - 1
        self.image_part = np.minimum(part, len(self.parts) - 1).astype(np.int32)  # trailing empty images: last
        if len(self.parts) > 1:
            ends = self.part_starts[self.image_part.astype(np.int64) + 1]
            if np.any(self.offsets[1:] > ends):
                raise ValueError("an image's descriptors span two parts of the local database")
        self._owners: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: Sequence) -> LocalDatabase:
        """From one (n_i, d) array (or :class:`LocalFeatures`) per image, in image order."""
        arrays = [_as_desc(f) for f in features]
        dim = next((a.shape[1] for a in arrays if a.ndim == 2 and a.shape[1]), 128)
        arrays = [a.reshape(-1, dim) for a in arrays]
        counts = np.array([len(a) for a in arrays], np.int64)
        desc = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
        return cls(desc, np.concatenate([[0], np.cumsum(counts)]))

    @property
    def descriptors(self) -> np.ndarray:
        """Every row as one array: the array itself when there is one part, else a concatenated copy (for small
        databases and tests; the searcher reads part by part)."""
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def n_rows(self) -> int:
        return int(self.part_starts[-1])

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)

    @property
    def owners(self) -> np.ndarray:
        """(N,) int64, the image of each row (built on first use: 8 bytes a row; :meth:`owner_of` costs none)."""
        if self._owners is None:
            self._owners = np.repeat(np.arange(self.n_images, dtype=np.int64), np.diff(self.offsets))
        return self._owners

    def owner_of(self, rows: np.ndarray) -> np.ndarray:
        """The image of each of ``rows`` (global row numbers), int64."""
        return np.searchsorted(self.offsets, np.asarray(rows, np.int64), side="right") - 1

    @property
    def n_images(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def compact(self) -> bool:
        """Whether the rows are held float16 or int8 (scored through :meth:`similarities`)."""
        return self.dtype != np.float32

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows as float32 descriptors."""
        out = np.asarray(rows, np.float32)
        if self.scale is not None:
            out = out * self.scale + self.offset
        return out

    def span(self, first: int, last: int) -> np.ndarray | None:
        """The stored rows of images ``first`` to ``last`` (inclusive) as one view, or None when they lie in
        two parts."""
        part = int(self.image_part[first])
        if part != int(self.image_part[last]):
            return None
        base = int(self.part_starts[part])
        return self.parts[part][int(self.offsets[first]) - base:int(self.offsets[last + 1]) - base]

    def image(self, i: int, limit: int | None = None) -> np.ndarray:
        """Image ``i``'s descriptors, float32 (a view of the rows when they are float32, else decoded); with
        ``limit``, only its first (strongest) ``limit``, and only those decoded."""
        rows = self.stored_image(i)
        if limit is not None:
            rows = rows[:int(limit)]
        return rows if not self.compact else self.decode(rows)

    def stored_image(self, i: int) -> np.ndarray:
        """Image ``i``'s rows as stored (a view)."""
        rows = self.span(int(i), int(i))
        assert rows is not None  # one image lies in one part
        return rows

    def take(self, rows: np.ndarray, release: bool = False) -> np.ndarray:
        """The stored rows at sorted global row numbers ``rows`` (a copy); ``release``: give back each part's
        pages once its rows are copied (a sample spread over every part would otherwise map all of them)."""
        rows = np.asarray(rows, np.int64)
        cut = np.searchsorted(rows, self.part_starts)
        out = []
        for k in range(len(self.parts)):
            if cut[k + 1] > cut[k]:
                out.append(self.parts[k][rows[cut[k]:cut[k + 1]] - self.part_starts[k]])
                if release:
                    self.release(k)
        return np.concatenate(out) if out else self.parts[0][:0].copy()

    def release(self, part: int | None = None) -> None:
        """Give back the resident pages of a memory-mapped part (every part when None); they stay in the page
        cache, and the next read maps them again."""
        from ..store.pages import release_array

        for k in range(len(self.parts)) if part is None else [part]:
            release_array(self.parts[k])

    def similarities(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), |Q|)`` inner products of stored rows with float32 query descriptors, rows never
        decoded as a whole (int8: ``c . (scale q) + offset . q``)."""
        from ..compress.storage import dot_rows

        q, bias = query, None
        if self.scale is not None:
            bias = query @ self.offset
            q = query * self.scale
        return dot_rows(rows, q, bias)


# --------------------------------------------------------------------------- exact
def match_kernel(sims: np.ndarray, threshold: float | None) -> np.ndarray:
    """``phi(s) = max(s - t, 0) / (1 - t)`` for a threshold t; the identity when t is None."""
    if threshold is None:
        return sims
    return np.maximum(sims - threshold, 0.0) / (1.0 - threshold)


def chamfer_similarity(query, target, threshold: float | None = None) -> float:
    """Exact Chamfer similarity of one query set to one target set (0.0 if either is empty)."""
    q, t = _as_desc(query), _as_desc(target)
    if len(q) == 0 or len(t) == 0:
        return 0.0
    return float(match_kernel((q @ t.T).max(axis=1), threshold).mean())


def chamfer_scores(query, db: LocalDatabase, images: Sequence[int] | np.ndarray | None = None, block_rows: int = 65536,
                   threshold: float | None = None) -> np.ndarray:
    """Exact Chamfer similarity of ``query`` to each database image (or to ``images`` only, in that order).

    Works in blocks of whole images of about ``block_rows`` descriptors, so
    memory stays at ``|Q| * block_rows`` floats. Empty images score 0.
    ``threshold``: see :func:`match_kernel`.
    """
    q = _as_desc(query)
    ids = np.arange(db.n_images) if images is None else np.asarray(images, dtype=np.int64)
    out = np.zeros(len(ids), np.float32)
    if len(q) == 0 or len(ids) == 0:
        return out
    counts = db.counts[ids]
    nonempty = np.flatnonzero(counts > 0)
    contiguous = images is None  # a scan of every image: its pages are given back block by block
    start = 0
    while start < len(nonempty):
        # a block of consecutive (non-empty) requested images with about block_rows rows in all
        cum = np.cumsum(counts[nonempty[start:]])
        stop = start + max(1, int(np.searchsorted(cum, block_rows, side="right")))
        block = nonempty[start:stop]
        sel = ids[block]
        rows = db.span(int(sel[0]), int(sel[-1])) if contiguous and sel[-1] - sel[0] == len(sel) - 1 else None
        if rows is None:
            rows = np.concatenate([db.stored_image(int(i)) for i in sel])
        seg = np.concatenate([[0], np.cumsum(db.counts[sel])[:-1]])
        if db.compact:  # float16/int8 rows, converted to float32 a few thousand at a time
            best = np.maximum.reduceat(db.similarities(q, rows), seg, axis=0).T
        else:
            best = np.maximum.reduceat(q @ rows.T, seg, axis=1)  # (|Q|, images)
        out[block] = match_kernel(best, threshold).mean(axis=0)
        if contiguous:
            db.release()  # in row order, every page read so far is done with (0.1 ms for 41 parts)
        start = stop
    return out


# --------------------------------------------------------------------------- approximate
#: Most IVF lists of the approximate search's FAISS index, and most rows its k-means trains on. Without the caps
#: 100,000 images of 970 descriptors (19.4M indexed) would get 16,384 lists trained on 1M rows, hours of k-means
#: on 2 cores; 8,192 lists on 262,144 rows (32 a list, within FAISS's advice of 30-256) take minutes.
IVF_MAX_LISTS = 8192
IVF_TRAIN_ROWS = 262_144


def ivf_lists(n: int, nlist: int | None = None) -> int:
    """IVF lists for ``n`` indexed rows: ``nlist``, else about 4 sqrt(n) (a power of two, at most
    :data:`IVF_MAX_LISTS`); never fewer than 39 rows a list."""
    if nlist is None:
        nlist = min(int(2 ** np.round(np.log2(4 * np.sqrt(max(n, 1))))), IVF_MAX_LISTS)
    return max(1, min(int(nlist), n // 39))


def _empty_ivf_like(inner):
    """An empty IVF index on ``inner``'s trained lists and quantiser (shared, not copied): where appended rows go."""
    import faiss

    if isinstance(inner, faiss.IndexIVFScalarQuantizer):
        out = faiss.IndexIVFScalarQuantizer(inner.quantizer, inner.d, inner.nlist, inner.sq.qtype, inner.metric_type,
                                            inner.by_residual)
        faiss.copy_array_to_vector(faiss.vector_to_array(inner.sq.trained), out.sq.trained)
    elif isinstance(inner, faiss.IndexIVFFlat):
        out = faiss.IndexIVFFlat(inner.quantizer, inner.d, inner.nlist, inner.metric_type)
    else:
        raise ValueError(f"no delta index for {type(inner).__name__}")
    out.is_trained = True
    return out


class _Selection:
    """Rows ``rows`` of a :class:`LocalDatabase` read like an array (``shape``, ``len``, ``[slice]``, ``[sorted
    positions]``), gathered a block at a time, for :func:`finegrain.compress.coded.build_sq_index`; each
    mapped part's pages are given back once the block's rows are copied from it."""

    def __init__(self, db: LocalDatabase, rows: np.ndarray):
        self.db, self.rows = db, rows
        self.shape = (len(rows), db.dim)
        self.dtype = db.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        # blocks come in row order, and the IVF training sample from everywhere: neither reads a page twice
        return self.db.take(self.rows[key], release=True)


def representative_rows(db: LocalDatabase, threshold: float, start: int = 0) -> np.ndarray:
    """Rows kept when each image's near-duplicate descriptors are dropped (sorted, int64).

    Per image, greedily in row order (strongest first in a stored index): a
    descriptor is kept unless its cosine to an already kept descriptor of the
    same image is at least ``threshold``. Every image keeps at least one row
    (if it has any). Cost: one ``n_i x n_i`` product per image. ``start``: images
    from this position on only (those appended since a structure was built).
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError("threshold must be a cosine in [-1, 1]")
    keep: list[np.ndarray] = []
    for i in range(int(start), db.n_images):
        if i % 1024 == 0:  # a pass in row order: give back the pages read so far
            db.release()
        x = db.image(i)
        if len(x) == 0:
            continue
        close = (x @ x.T) >= threshold
        alive = np.ones(len(x), bool)
        kept = []
        for j in range(len(x)):
            if alive[j]:
                kept.append(j)
                alive &= ~close[j]
        keep.append(db.offsets[i] + np.asarray(kept, np.int64))
    db.release()
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)


class ApproxChamfer:
    """Approximate Chamfer search over all database descriptors (CANN-style; see the module docstring).

    Parameters
    ----------
    db : LocalDatabase
    index : {"ivf", "hnsw", "flat"}
        FAISS structure over all descriptors: IVF-Flat (default), HNSW, or
        exact inner product (exact neighbours; still aggregated approximately).
    knn : int
        Neighbours retrieved per query descriptor; 0 with a ``threshold``:
        every database descriptor above the threshold (FAISS range search),
        which makes the result exact up to the ANN's misses.
    nlist, nprobe : int
        IVF lists (default about 4 * sqrt(N), power of two) and lists probed.
    hnsw_m, ef_search : int
        HNSW graph degree and search breadth.
    fill : {"kth", "zero"}
        Similarity assumed for a query descriptor with no neighbour in an
        image: its ``knn``-th neighbour similarity (upper bound), or 0.
    threshold : float or None
        Match threshold of the similarity (see :func:`match_kernel`); the
        same value must be given to :func:`chamfer_scores` to compare.
    threads : int
        FAISS OpenMP threads.
    seed : int
        For the IVF training sample.
    dedup : float or None
        Index only each image's representatives (:func:`representative_rows`
        with this cosine threshold); None indexes every descriptor.
    faiss_index : faiss.Index, optional
        A prebuilt index over the indexed rows (``db.descriptors``, or its
        representatives with ``dedup``), in the same order.
    rows : array, optional
        The indexed rows when already known (sorted global row numbers, what
        :func:`representative_rows` returned for ``dedup``): a pass over every
        descriptor saved.
    delta_index : faiss.IndexIVF, optional
        With ``faiss_index``: an index over the rows appended since it was built
        (``rows[faiss_index.ntotal:]``, see :meth:`extend`), searched beside it.
    """

    def __init__(self, db: LocalDatabase, index: str = "ivf", knn: int = 32, nlist: int | None = None,
                 nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64, fill: str = "kth",
                 threshold: float | None = None, threads: int = 2, seed: int = 0, dedup: float | None = None,
                 faiss_index=None, rows: np.ndarray | None = None, delta_index=None):
        import faiss

        if fill not in ("kth", "zero"):
            raise ValueError("fill must be 'kth' or 'zero'")
        if knn == 0 and threshold is None:
            raise ValueError("knn=0 (range search) needs a threshold")
        if index not in ("ivf", "hnsw", "flat"):
            raise ValueError("index must be 'ivf', 'hnsw' or 'flat'")
        self.db = db
        self.kind = index
        self.knn = int(knn)
        self.fill = fill
        self.threshold = threshold
        self.nprobe = int(nprobe)
        self.ef_search = int(ef_search)
        self.dedup = dedup
        # FAISS id -> database row (all rows, or each image's representatives), and -> its image (4 bytes a
        # row: what aggregation reads; a row -> image table over every descriptor would be 8 bytes a descriptor)
        if rows is not None:
            self.rows = np.asarray(rows, np.int64)
        else:
            self.rows = (np.arange(db.n_rows, dtype=np.int64) if dedup is None
                         else representative_rows(db, float(dedup)))
        self.row_image = db.owner_of(self.rows).astype(np.int32)
        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.index = faiss_index if faiss_index is not None else self._build(index, nlist, hnsw_m, seed)
        self.delta = delta_index if faiss_index is not None else None
        held = self.index.ntotal + (0 if self.delta is None else self.delta.ntotal)
        if held != len(self.rows):
            raise ValueError(f"the FAISS index holds {held} vectors, {len(self.rows)} are indexed")
        self.set_search_params()

    @property
    def carries(self) -> bool:
        """Whether :meth:`extend` can add rows (an IVF index: new rows go to a delta index on its lists)."""
        import faiss

        return isinstance(faiss.downcast_index(self.index), faiss.IndexIVF)

    def extend(self, first_image: int) -> int:
        """Index the rows of images ``first_image`` on (appended to the database since the index was built):
        their representatives (with ``dedup``) go to the delta index, an IVF on the main index's trained lists,
        so the main index is neither rebuilt nor copied. Returns the rows added."""
        import faiss

        if not self.carries:
            raise ValueError("only an IVF index is extended; build the others again")
        first = int(first_image)
        if len(self.rows) and int(self.row_image[-1]) >= first:
            raise ValueError(f"images from {first} on are already indexed")
        new = (np.arange(self.db.offsets[first], self.db.n_rows, dtype=np.int64) if self.dedup is None
               else representative_rows(self.db, float(self.dedup), start=first))
        if not len(new):
            return 0
        if self.delta is None:
            self.delta = _empty_ivf_like(faiss.downcast_index(self.index))
        for start in range(0, len(new), 65_536):
            block = new[start:start + 65_536]
            self.delta.add(np.ascontiguousarray(self.db.decode(self.db.take(block, release=True)), np.float32))
        self.rows = np.concatenate([self.rows, new])
        self.row_image = np.concatenate([self.row_image, self.db.owner_of(new).astype(np.int32)])
        self.set_search_params()
        return len(new)

    def _build(self, kind: str, nlist: int | None, hnsw_m: int, seed: int):
        import faiss

        d = self.db.dim
        if self.db.dtype in (np.int8, np.float16):  # what an index stores: FAISS holds those values, not float32
            return self._build_sq(_Selection(self.db, self.rows), kind, nlist, hnsw_m, seed)
        x = self.db.descriptors if len(self.rows) == self.db.n_rows else self.db.take(self.rows)  # float32
        index: faiss.Index
        if kind == "flat" or len(x) < FLAT_BELOW:
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = 80
            index = hnsw
        else:
            nlist = ivf_lists(len(x), nlist)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            train = min(64 * nlist, IVF_TRAIN_ROWS)
            sample = x if len(x) <= train else x[np.sort(rng.choice(len(x), train, replace=False))]
            index.train(np.ascontiguousarray(sample))
        index.add(x)
        return index

    def _build_sq(self, codes: Any, kind: str, nlist: int | None, hnsw_m: int, seed: int):
        """int8 or float16 rows: a FAISS scalar-quantizer index holding exactly the stored values (1 or 2 bytes a
        dimension, not a float32 copy: 5.2 instead of 10.4 GB for 20.4M float16 rows); FAISS scores them as the
        exact Chamfer does (int8: ``offset + scale * c``). ``codes`` is read in blocks (a :class:`_Selection` of
        the database's rows), never gathered whole."""
        from ..compress.coded import build_sq_index
        from ..compress.storage import Codec

        codec = Codec(None, self.db.scale, self.db.offset, "int8" if self.db.dtype == np.int8 else "float16")
        if kind == "flat" or len(codes) < FLAT_BELOW:
            return build_sq_index(codes, codec, "flat", what="local")
        if kind == "hnsw":
            return build_sq_index(codes, codec, "hnsw", hnsw_m=hnsw_m, what="local")
        nlist = ivf_lists(len(codes), nlist)
        return build_sq_index(codes, codec, "ivf", nlist=nlist, train_rows=min(64 * nlist, IVF_TRAIN_ROWS),
                              what="local")

    @property
    def built_kind(self) -> str:
        """What the FAISS index is: ``flat`` (exact), ``hnsw`` or ``ivf``. ``kind`` is what was asked: fewer
        than ``FLAT_BELOW`` rows are searched flat whatever it says."""
        import faiss

        inner: Any = faiss.downcast_index(self.index)
        return "ivf" if hasattr(inner, "nprobe") else "hnsw" if hasattr(inner, "hnsw") else "flat"

    def set_search_params(self) -> None:
        import faiss

        for index in (self.index, self.delta):
            if index is None:
                continue
            inner: Any = faiss.downcast_index(index)
            if hasattr(inner, "nprobe"):
                inner.nprobe = self.nprobe
            if hasattr(inner, "hnsw"):
                inner.hnsw.efSearch = max(self.ef_search, self.knn)

    def indexed_image(self, i: int) -> np.ndarray:
        """Image ``i``'s indexed descriptors (its representatives with ``dedup``, else all), float32, strongest
        first."""
        # keys in row_image's own dtype: int64 keys would make numpy cast the whole int32 array (one row
        # per indexed descriptor, 20M at 10^5 images) to int64 on every call
        lo, hi = np.searchsorted(self.row_image, np.array([i, i + 1], self.row_image.dtype))
        rows = self.db.stored_image(int(i))[self.rows[lo:hi] - self.db.offsets[int(i)]]
        return self.db.decode(rows) if self.db.compact else rows

    def neighbours(self, query) -> tuple[np.ndarray, np.ndarray]:
        """``(D, ids)`` for every query descriptor: (|Q|, knn) similarities and database rows (-1: none)."""
        D, ids = self._search(query)
        return D, np.where(ids >= 0, self.rows[np.maximum(ids, 0)], -1)

    def _search(self, query) -> tuple[np.ndarray, np.ndarray]:
        """``(D, FAISS ids)``, (|Q|, knn), -1: none."""
        q = _as_desc(query)
        k = min(self.knn, max(1, len(self.rows)))
        D, ids = self.index.search(q, k)
        if self.delta is None or self.delta.ntotal == 0:
            return D, ids
        # the appended rows' neighbours merged in: each list keeps its k best of both, best first
        D2, ids2 = self.delta.search(q, min(k, self.delta.ntotal))
        D = np.concatenate([D, D2], axis=1)
        ids = np.concatenate([ids, np.where(ids2 >= 0, ids2 + self.index.ntotal, -1)], axis=1)
        best = np.argsort(-D, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(D, best, axis=1), np.take_along_axis(ids, best, axis=1)

    def matches(self, query) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every (query descriptor, database descriptor) match found: ``(qi, rows, kernel sims, fill (|Q|,))``.

        ``fill[i]`` bounds what query descriptor i could match in an image it
        did not reach (see ``fill``).
        """
        q = _as_desc(query)
        if self.knn == 0:
            assert self.threshold is not None  # checked in __init__: knn=0 needs a threshold
            qis, found, sims = [], [], []
            for index, base in ((self.index, 0), (self.delta, self.index.ntotal)):
                if index is None:
                    continue
                lims, D, ids = index.range_search(q, float(self.threshold))
                qis.append(np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64))))
                found.append(self.rows[ids.astype(np.int64) + base])
                sims.append(match_kernel(D, self.threshold))
            return np.concatenate(qis), np.concatenate(found), np.concatenate(sims), np.zeros(len(q), np.float32)
        D, ids = self.neighbours(q)
        D, valid, fill = self._kernel_lists(D, ids)
        qi = np.nonzero(valid)[0]
        return qi, ids[valid], D[valid], fill

    def _kernel_lists(self, D: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Neighbour lists ``(D, ids)`` -> (kernel similarities, which entries count, each descriptor's fill)."""
        D = match_kernel(D, self.threshold)
        valid = ids >= 0
        if self.threshold is not None:
            valid &= D > 0  # matches below the threshold count nothing
        if self.fill == "kth":
            full = (ids >= 0).all(axis=1)  # a complete list: its last entry bounds everything not in it
            fill = np.where(full, D[:, -1], 0.0).astype(np.float32)
        else:
            fill = np.zeros(len(D), np.float32)
        return D, valid, fill

    def score_all(self, query) -> tuple[np.ndarray, np.ndarray]:
        """Approximate Chamfer score of every database image, and whether the image was reached at all.

        Returns ``(scores (n_images,), reached (n_images,) bool)``; images no
        query descriptor reached all share the base score ``mean(fill)``.
        """
        return self.score_many([query])[0]

    def score_many(self, queries: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`score_all` of each descriptor set, with one FAISS search for all of them."""
        n = self.db.n_images
        out = []
        for base, (images, scores) in self.score_reached(queries):
            dense = np.full(n, base, np.float32)
            dense[images] = scores
            reached = np.zeros(n, bool)
            reached[images] = True
            out.append((dense, reached))
        return out

    def score_reached(self, queries: Sequence) -> list[tuple[np.float32, tuple[np.ndarray, np.ndarray]]]:
        """Per descriptor set: ``(base score of the images it did not reach, (reached positions ascending,
        their float32 scores))``, with one FAISS search for all of them (what the ``l2g`` neighbour graph
        runs per block of database images: a call per image left FAISS's threads idle).

        Only the reached images are scored: a dense array per set would cost O(n_images) per neighbour list
        whatever the list reached (:meth:`score_many` builds that form for single searches).
        """
        qs = [_as_desc(q) for q in queries]
        empty = (np.float32(0.0), (np.zeros(0, np.int64), np.zeros(0, np.float32)))
        out = [empty] * len(qs)
        live = [i for i, q in enumerate(qs) if len(q)]
        if not live or len(self.rows) == 0:
            return out
        if self.knn == 0:  # range search: ragged results, scored one set at a time
            for i in live:
                out[i] = self._aggregate_matches(*self.matches(qs[i]), len(qs[i]))
            return out
        D, ids = self._search(np.concatenate([qs[i] for i in live]))
        ends = np.cumsum([len(qs[i]) for i in live])
        for i, stop in zip(live, ends):
            start = stop - len(qs[i])
            out[i] = self._aggregate_lists(D[start:stop], ids[start:stop])
        return out

    def _aggregate_lists(self, D: np.ndarray, ids: np.ndarray) -> tuple[np.float32, tuple[np.ndarray, np.ndarray]]:
        """Scores of the images each query descriptor's neighbour list reached (``knn > 0``; ``ids``: FAISS
        ids): ``(base, (positions ascending, scores))``, as :meth:`score_reached`.

        FAISS returns every list best first, so a descriptor's best match in an image is the first entry of
        that image in its list: a stable sort of each row by image finds it without a global sort.
        """
        n = self.db.n_images
        D, valid, fill = self._kernel_lists(D, ids)
        owner = np.where(valid, self.row_image[np.maximum(ids, 0)], n)  # n: no image
        by_image = np.argsort(owner, axis=1, kind="stable")
        image = np.take_along_axis(owner, by_image, axis=1)
        first = np.ones(image.shape, bool)
        first[:, 1:] = image[:, 1:] != image[:, :-1]
        first &= image < n
        r, c = np.nonzero(first)
        images, slot = np.unique(image[r, c], return_inverse=True)
        gain = D[r, by_image[r, c]] - fill[r]
        base = float(fill.mean())
        # summed per image in the order of the matches, as a dense bincount over every image would
        scores = base + np.bincount(slot, weights=gain, minlength=len(images)) / len(D)
        return np.float32(base), (images.astype(np.int64), scores.astype(np.float32))  # positions int64, as ever

    def _aggregate_matches(self, qi: np.ndarray, rows: np.ndarray, sims: np.ndarray, fill: np.ndarray,
                           n_query: int) -> tuple[np.float32, tuple[np.ndarray, np.ndarray]]:
        """Scores of the images a flat list of matches reached (range search): the best match per (descriptor,
        image); ``(base, (positions ascending, scores))``, as :meth:`score_reached`."""
        n = self.db.n_images
        owner = self.db.owner_of(rows)
        key = qi.astype(np.int64) * n + owner
        order = np.lexsort((-sims, key))  # by key, best first within a key
        key, sims, qi, owner = key[order], sims[order], qi[order], owner[order]
        first = np.ones(len(key), bool)  # no match at all leaves it empty
        first[1:] = key[1:] != key[:-1]
        gain = sims[first] - fill[qi[first]]
        images, slot = np.unique(owner[first], return_inverse=True)  # every image matched has a first match
        base = float(fill.mean())
        scores = base + np.bincount(slot, weights=gain, minlength=len(images)) / n_query
        return np.float32(base), (images.astype(np.int64), scores.astype(np.float32))

    def search(self, query, k: int = 100, exact_rerank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` images by approximate Chamfer: ``(scores (k,), ids (k,))``, id -1 where fewer were reached.

        With ``exact_rerank=R`` the best R are re-scored with the exact
        Chamfer similarity before the top k are taken.
        """
        scores, reached = self.score_all(query)
        cand = np.flatnonzero(reached)
        cand = cand[np.argsort(-scores[cand], kind="stable")]
        if exact_rerank and len(cand):
            head = cand[:exact_rerank]
            exact = chamfer_scores(query, self.db, head, threshold=self.threshold)
            head = head[np.argsort(-exact, kind="stable")]
            scores = scores.copy()
            scores[head] = np.sort(exact)[::-1]
            cand = np.concatenate([head, cand[exact_rerank:]])
        cand = cand[:k]
        out_ids = np.full(k, -1, np.int64)
        out_scores = np.full(k, -np.inf, np.float32)
        out_ids[:len(cand)] = cand
        out_scores[:len(cand)] = scores[cand]
        return out_scores, out_ids


def knn_graph(searcher: ApproxChamfer, m: int = 50, images: Sequence[int] | np.ndarray | None = None,
              max_query_features: int | None = None, queries: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Each database image's ``m`` best other images by approximate Chamfer (the image itself as query).

    Query-independent, so it is computed once per index state (on the first ``l2g`` search, cached in
    ``ann/``); L2G reads the shortlist's pairwise similarities from it. ``queries``: an image queries with
    ``"all"`` its descriptors, or with its ``"representatives"`` (the rows the searcher indexes; with
    ``dedup`` about a fifth, so a fifth of the cost: the search cost grows with the query's descriptors);
    ``max_query_features`` keeps the strongest n of those.
    Returns ``(ids (n, m) int64 with -1 padding, sims (n, m) float32)``.
    """
    rows = np.arange(searcher.db.n_images) if images is None else np.asarray(images, np.int64)
    return knn_lists(searcher, graph_query_sets(searcher, rows, queries, max_query_features), m, exclude=rows)


def graph_query_sets(searcher: ApproxChamfer, images: Sequence[int] | np.ndarray, queries: str = "all",
                     max_query_features: int | None = None) -> list[np.ndarray]:
    """What each of ``images`` queries with for its neighbour list (:func:`knn_graph`): ``"all"`` its
    descriptors or its ``"representatives"``, the strongest ``max_query_features`` of them when given."""
    if queries not in GRAPH_QUERIES:
        raise ValueError(f"queries must be one of {GRAPH_QUERIES}, not {queries!r}")
    sets = [searcher.db.image(int(i)) if queries == "all" else searcher.indexed_image(int(i)) for i in images]
    return [q[:max_query_features] for q in sets] if max_query_features else sets


def extend_graph(searcher: ApproxChamfer, ids: np.ndarray, sims: np.ndarray, max_query_features: int | None = None,
                 queries: str = "all", block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_graph` of a database that grew: ``(ids, sims)`` hold the lists of its first ``len(ids)`` images
    (built before the others were appended); returns every image's lists.

    Each appended image gets its own list (one search, as :func:`knn_graph`), and enters an earlier image's
    list where its score beats that list's last entry. That score is the appended image's Chamfer similarity
    to the earlier image, not the earlier image's to it (Chamfer is asymmetric; a full build would search from
    the earlier image): an approximation, so the searcher builds the graph again once the index has grown by
    half (:data:`finegrain.local.search.CARRY_GROWTH`). Cost: one search per appended image.
    """
    db = searcher.db
    old, m = ids.shape
    out_ids = np.full((db.n_images, m), -1, np.int64)
    out_sims = np.zeros((db.n_images, m), np.float32)
    out_ids[:old], out_sims[:old] = ids, sims
    worst = np.where(ids[:, -1] >= 0, sims[:, -1], -np.inf)  # what enters an earlier list must beat: kept current
    for s in range(old, db.n_images, block):
        part = np.arange(s, min(db.n_images, s + block))
        for j, (_, (images, scores)) in zip(part, searcher.score_reached(
                graph_query_sets(searcher, part, queries, max_query_features))):
            cand, cand_scores = _best_images(images, scores, m, exclude=int(j))
            out_ids[j, :len(cand)], out_sims[j, :len(cand)] = cand, cand_scores
            earlier = images < old
            images, scores = images[earlier], scores[earlier]
            enters = scores > worst[images]
            for i, score in zip(images[enters].tolist(), scores[enters].tolist()):
                held = int(np.count_nonzero(out_ids[i] >= 0))
                at = int(np.searchsorted(-out_sims[i, :held], -np.float32(score), side="right"))  # after ties
                out_ids[i, at + 1:] = out_ids[i, at:-1].copy()
                out_sims[i, at + 1:] = out_sims[i, at:-1].copy()
                out_ids[i, at], out_sims[i, at] = j, score
                if out_ids[i, -1] >= 0:
                    worst[i] = out_sims[i, -1]
        db.release()
    return out_ids, out_sims


def knn_lists(searcher: ApproxChamfer, queries: Sequence[np.ndarray], m: int,
              exclude: Sequence[int] | np.ndarray | None = None, block_rows: int = 8192
              ) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` best database images by approximate Chamfer for each descriptor set of ``queries``.

    ``exclude[r]`` (a database position, or -1) is left out of query r's list: the image itself when the
    queries are database images. Returns ``(positions (n, m) int64 with -1 padding, sims (n, m) float32)``.
    Sets go to FAISS in blocks of at most ``block_rows`` descriptors (one search per block).
    """
    ids = np.full((len(queries), m), -1, np.int64)
    sims = np.zeros((len(queries), m), np.float32)
    for block in _blocks([len(q) for q in queries], block_rows):
        for r, (_, (images, scores)) in zip(block, searcher.score_reached([queries[r] for r in block])):
            cand, cand_scores = _best_images(images, scores, m, -1 if exclude is None else int(exclude[r]))
            ids[r, :len(cand)] = cand
            sims[r, :len(cand)] = cand_scores
    return ids, sims


def _best_images(images: np.ndarray, scores: np.ndarray, m: int, exclude: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` best of the reached ``images`` (ascending) other than ``exclude``, best first (ties in image
    order): ``(positions, scores)``."""
    if exclude >= 0:
        keep = images != exclude
        images, scores = images[keep], scores[keep]
    best = np.argsort(-scores, kind="stable")[:m]
    return images[best], scores[best]


def _blocks(sizes: Sequence[int], block_rows: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most ``block_rows`` (one at least)."""
    blocks: list[list[int]] = []
    total = block_rows
    for i, size in enumerate(sizes):
        if total + size > block_rows or not blocks:
            blocks.append([])
            total = 0
        blocks[-1].append(i)
        total += size
    return blocks


def recall_at_k(approx_ids: Sequence[int] | np.ndarray, exact_scores: np.ndarray, k: int = 100) -> float:
    """Fraction of the exact top-``k`` images (by ``exact_scores``) found in ``approx_ids[:k]``.

    Images whose exact score is 0 or less (nothing matched above the
    threshold) tie and are not counted: the denominator is the number of the
    exact top-k that scored above 0 (1.0 if none did).
    """
    exact_scores = np.asarray(exact_scores)
    k = min(k, len(exact_scores))
    exact_top = np.argsort(-exact_scores, kind="stable")[:k]
    exact_top = exact_top[exact_scores[exact_top] > 0]
    if len(exact_top) == 0:
        return 1.0
    approx = np.asarray(approx_ids)[:k]
    return float(len(np.intersect1d(exact_top, approx[approx >= 0])) / len(exact_top))
