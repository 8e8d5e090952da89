"""Top-k search over one field's vectors with FAISS (inner product).

``kind="auto"`` keeps exact search (``IndexFlatIP``) below
:data:`AUTO_ANN_THRESHOLD` vectors, where it is both exact and fast enough,
and switches to HNSW above it. IVF is available for very large collections.
Trained ANN structures are cached next to the catalog, keyed by the catalog
generation, so opening a large index does not rebuild them.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .catalog import IndexFormatError

AUTO_ANN_THRESHOLD = 200_000
KINDS = ("auto", "flat", "hnsw", "ivf")


def save_cache_file(path: Path, write: Callable[[Path], object],
                    errors: tuple[type[BaseException], ...] = (OSError,), size: int | None = None) -> bool:
    """Write a derived cache file (``ann/...``) with ``write(tmp)`` under a name no concurrent writer uses, then
    rename it into place; False (and no file left behind) when ``errors`` say it cannot be: a read-only index,
    a full disk. The caller then keeps what it built in memory.

    ``size`` (bytes, when known before writing): a cache takes at most half of the disk's free space, so a
    derived file never fills the disk that the index's own commits need (False, nothing written, otherwise).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is not None and shutil.disk_usage(path.parent).free < 2 * size:
            return False
        write(tmp)
        tmp.replace(path)
        return True
    except errors:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system may say so even for a file that is not there
            pass
        return False


def check_kind(kind: str) -> str:
    """``kind`` itself if it is one of :data:`KINDS`, else ``ValueError`` naming them."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def resolve_kind(kind: str, n: int) -> str:
    """The structure ``kind`` gives ``n`` vectors (``auto``: flat below :data:`AUTO_ANN_THRESHOLD`, HNSW above)."""
    check_kind(kind)
    if kind == "auto":
        return "hnsw" if n >= AUTO_ANN_THRESHOLD else "flat"
    return kind


def check_finite(vectors: np.ndarray) -> None:
    """``IndexFormatError`` naming the first rows that hold NaN or inf (a damaged index)."""
    if not np.isfinite(vectors).all():
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        raise IndexFormatError(f"{len(bad)} stored vector(s) hold NaN or inf (rows {bad[:5].tolist()}): the "
                               "index is damaged; run `finegrain check --index INDEX` for the images affected")


def exact_top_rows(vectors: Any, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-``k`` row positions of ``vectors`` (n, d) for each of ``queries`` (nq, d) by inner
    product, in blocks (a memory-mapped file is never copied whole); ties keep the lower row."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    block = 65_536
    for start in range(0, len(vectors), block):
        s = queries @ np.asarray(vectors[start:start + block], dtype=np.float32).T
        i = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, i], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, keep, 1)
        best_i = np.take_along_axis(best_i, keep, 1)
    return best_i


class _Owned:
    """FAISS-owned memory for numpy, holding its owner: an array made from this keeps the index alive."""

    def __init__(self, memory: np.ndarray, owner: object):
        self.__array_interface__ = memory.__array_interface__
        self.owner = owner


class VectorIndex:
    """FAISS index over rows ``0..n-1``; ``search`` returns (scores, row positions) like FAISS."""

    def __init__(self, vectors: np.ndarray, kind: str = "auto", cache_file: Path | None = None):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n, self.dim = vectors.shape
        self.kind = kind = resolve_kind(kind, self.n)
        if cache_file is not None and cache_file.exists() and kind != "flat":
            try:
                self.faiss = faiss.read_index(str(cache_file))
                if self.faiss.ntotal == self.n and self.faiss.d == self.dim:
                    return
            except RuntimeError:  # a truncated or damaged cache file: rebuilt below
                pass
        check_finite(vectors)  # FAISS silently drops NaN rows and ranks inf first: never a ranking
        self.faiss = self._build(vectors, kind)
        if cache_file is not None and kind != "flat":
            self._save(cache_file)

    def _save(self, cache_file: Path) -> None:
        """Cache the structure on disk (FAISS reports write errors as RuntimeError), else keep it in memory."""
        save_cache_file(cache_file, lambda tmp: faiss.write_index(self.faiss, str(tmp)), (OSError, RuntimeError))

    @staticmethod
    def _build(vectors: np.ndarray, kind: str) -> faiss.Index:
        n, dim = vectors.shape
        index: faiss.Index
        if kind == "flat" or n == 0:
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = 80
            hnsw.hnsw.efSearch = 128
            index = hnsw
        else:  # ivf
            nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(dim)
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.train(vectors)
            ivf.nprobe = max(1, nlist // 16)
            index = ivf
        index.add(vectors)
        return index

    def stored_rows(self) -> np.ndarray | None:
        """The float32 rows FAISS keeps in memory (a flat index's, or an HNSW graph's flat storage) as a
        read-only (n, d) view, no copy, which keeps this index alive; None when it keeps no plain copy (IVF).

        Not cached here: the view refers to this index, and a reference back would make a cycle that only
        the garbage collector frees, keeping an old snapshot's graph (gigabytes) until it runs.
        """
        if self.n == 0:
            return None
        storage = getattr(self.faiss, "storage", None)
        flat = faiss.downcast_index(storage) if storage is not None else self.faiss
        if not isinstance(flat, faiss.IndexFlat) or flat.ntotal != self.n or flat.d != self.dim:
            return None
        memory = faiss.rev_swig_ptr(flat.get_xb(), self.n * self.dim)  # a view that does not own the memory
        rows = np.asarray(_Owned(memory, self)).reshape(self.n, self.dim)  # its base keeps this index alive
        rows.flags.writeable = False
        return rows

    def search(self, queries: np.ndarray, k: int, breadth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) queries -> (scores (nq, k) float32, rows (nq, k) int64); -1 marks no result.

        ``breadth``: how much of the structure one search explores, for this call only: HNSW's efSearch
        (at least k), IVF's nprobe (lists probed); exact search ignores it. None: the built-in setting.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} does not match index dimension {self.dim}")
        k = int(k)
        if k <= 0:
            raise ValueError("k must be positive")
        hnsw = getattr(self.faiss, "hnsw", None)
        fs: Any = faiss  # the bundled type stubs lack the search-parameter classes' keywords
        if breadth is not None and (
            isinstance(breadth, bool) or not isinstance(breadth, (int, np.integer)) or breadth < 1
        ):
            raise ValueError(f"breadth must be a positive integer, not {breadth!r}")
        if self.kind == "hnsw" and hnsw is not None:
            # FAISS's HNSW keeps efSearch candidates whatever k is: asked for more it returns fewer rows (the
            # rest -1) and misses most of the true top k (recall 0.39 at k=2,000 with efSearch 128), which the
            # multi-vector candidate stage (500-2,000 per query vector) asks for above 200,000 images.
            ef = max(k, hnsw.efSearch if breadth is None else int(breadth))
            if ef != hnsw.efSearch:
                return self.faiss.search(queries, k, params=fs.SearchParametersHNSW(efSearch=ef))
        elif self.kind == "ivf" and breadth is not None:
            ivf: Any = self.faiss  # an IndexIVF (the stubs type it as the base Index)
            nprobe = min(int(breadth), int(ivf.nlist))
            return self.faiss.search(queries, k, params=fs.SearchParametersIVF(nprobe=nprobe))
        return self.faiss.search(queries, k)

    def search_rows(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` over the given rows only (FAISS ID selector: exact for flat, filtered HNSW/IVF otherwise).

        A filtered ANN search can return fewer than ``k`` rows when the allowed
        rows are rare; callers needing exactness then score the rows themselves.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        fs: Any = faiss  # the bundled type stubs lack the search-parameter classes' keywords
        selector = fs.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
        if self.kind == "hnsw":
            params = fs.SearchParametersHNSW(sel=selector, efSearch=max(128, int(k)))
        elif self.kind == "ivf":
            params = fs.SearchParametersIVF(sel=selector, nprobe=getattr(self.faiss, "nprobe", 1))
        else:
            params = fs.SearchParameters(sel=selector)
        return self.faiss.search(queries, int(k), params=params)  # selector must live until here
