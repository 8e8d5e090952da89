"""Local-to-global re-ranking (L2G): an MDS embedding of the shortlist's local similarities, fused with
the global descriptor, re-ranked SuperGlobal-style.

After a local (Chamfer) search returns the top ``k`` images for a query:

1. **Sparse pairwise similarities** among the query and its shortlist, a
   constant number per point: the query's ``query_neighbors`` best search
   scores; between shortlist images the pairs in each image's stored local
   neighbour list (its top-``m`` images by Chamfer similarity, computed once
   per index state on first use, :func:`finegrain.local.chamfer.knn_graph`). With ``pairs="online"``
   the pairs are instead chosen by the global descriptor and measured at query time on truncated
   descriptor sets (:func:`online_pairs`), so no graph is built.
2. **Dissimilarities** ``d = 1 - s`` (after an optional floor: similarities
   at or below ``sim_floor`` become 1); a pair known from both sides takes
   the mean; **unknown pairs are 1** (the paper's completion).
3. **SMACOF** (scikit-learn's metric ``smacof``) embeds the ``k + 1``
   points in ``mds_dim`` dimensions, initialised by classical MDS.
4. **Fusion**: each point's embedding is centred on the shortlist's mean and
   L2-normalised; the global descriptor is L2-normalised. ``finegrain``
   variant: ``[sqrt(w) * global, sqrt(1 - w) * mds]``, so inner
   products of fused vectors are ``w * global cosine + (1 - w) * mds
   cosine`` (a weighted average of the *cosines*, ``w`` = 0.9, docs/l2g.md).
   ``paper`` variant (default): the weighted average
   of the *vectors*, ``w * global + (1 - w) * mds`` with ``w`` = 0.19; the
   MDS frame is arbitrary (unrelated to the global descriptor's axes), so
   the two are kept in disjoint coordinates, ``[w * global, (1 - w) * mds]``,
   and inner products are ``w^2 * global cosine + (1 - w)^2 * mds cosine``
   (what a same-dimension average gives, less the cross terms between two
   unrelated frames). At w = 0.19 the global cosine weighs 0.036 against
   the MDS cosine's 0.656.
5. **SuperGlobal re-ranking** of the shortlist with the fused vectors
   (:func:`superglobal_rerank`: top-``K`` descriptor refinement with weight
   ``beta``, then query expansion by the max of the refined top-``K``; the
   score is the mean of the two similarities).

All knobs are fields of :class:`L2GConfig`. ``L2GConfig(variant="paper")``
(the default) is the paper's setting: vector-average fusion with w = 0.19,
every known query score kept before MDS (no ``query_neighbors`` cut),
shortlist k = 700; ``variant="finegrain"`` is cosine fusion with w = 0.9, the
query's 10 best scores, k = 100: about 5x cheaper per query, and 4 to 6 class
mAP points lower with 7,000 distractors, which is why the paper's setting is
the default (two-fold landmark protocol, docs/benchmarks.md). Fields left at
``None`` take the variant's value.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "VARIANTS",
    "L2GConfig",
    "L2GResult",
    "classical_mds",
    "dissimilarity_matrix",
    "fuse",
    "fuse_average",
    "graph_pairs",
    "known_query_scores",
    "l2g_rerank",
    "mds_embed",
    "online_pairs",
    "smacof_numpy",
    "superglobal_rerank",
]


#: The re-ranking variants and the values their ``None``-default fields take (see :class:`L2GConfig`).
VARIANTS: dict[str, dict[str, Any]] = {
    "finegrain": {"k": 100, "w": 0.9, "query_neighbors": 10, "fusion": "cosine"},
    "paper": {"k": 700, "w": 0.19, "query_neighbors": None, "fusion": "average"},
}

#: Where L2G's shortlist pairs come from (``L2GConfig.pairs``).
PAIRS = ("graph", "online")
#: ``query_neighbors`` default: the variant's (10 for ``finegrain``, all for ``paper``).
VARIANT_DEFAULT = "variant"


@dataclass
class L2GConfig:
    """Parameters of the L2G re-ranking.

    Attributes
    ----------
    variant : {"paper", "finegrain"}
        ``paper`` (default): the paper's fusion (weighted average of the vectors,
        :func:`fuse_average`), w 0.19, every known query score kept, k 700.
        ``finegrain``: weighted average of the cosines
        (:func:`fuse`), w 0.9, the query's 10 best scores, k 100. Only
        ``k``, ``w``, ``query_neighbors`` and ``fusion`` depend on it; an
        explicit value overrides the variant's.
    fusion : {"cosine", "average"} or None
        How MDS embedding and global descriptor are fused (None: the variant's).
    k : int or None
        Shortlist size (None: the variant's; paper 700 on a GPU, finegrain 100 on CPU).
    mds_dim : int
        Dimension of the MDS embedding.
    smacof_iter : int
        SMACOF iterations at most (scikit-learn default 300).
    smacof_eps : float
        SMACOF convergence tolerance (scikit-learn's, relative stress change).
    w : float or None
        Weight of the global descriptor in the fusion (paper: 0.19); 0 = MDS
        only, 1 = global only. None: the variant's. finegrain's 0.9 (cosine
        fusion): the best of 0.19 .. 1.0 on the
        held-out landmark-class protocol (``experiments/l2g_heldout.py``, 238
        database images as queries, 1,000 distractors), where 0.19 was the
        worst; this CNN-cell MDS embedding carries less than FIRE's.
    missing : float
        Dissimilarity of unknown pairs (paper: 1).
    sim_floor : float
        Local similarities at or below this map to dissimilarity 1.
    sim_scale : float or None
        Local similarities at or above this map to dissimilarity 0:
        ``d = 1 - clip((s - floor) / (scale - floor), 0, 1)``; 1 with floor 0
        keeps the paper's ``d = 1 - s``. Chamfer scores of distinct images
        rarely come near 1, so ``1 - s`` leaves every known pair close to the
        missing value 1 and the embedding carries little. None: calibrate per
        query, the median over the shortlist of each image's best stored
        neighbour similarity (what "as similar as two views of one place
        get" looks like in this collection); the query's best score when no
        neighbour lists are given.
    neighbors : int or None
        Stored neighbours per shortlist image to use (None: all stored).
    query_neighbors : int, None or "variant"
        Known pairs of the query: its ``query_neighbors`` most similar
        shortlist images (None: all k; ``"variant"``, the default: 10 for
        ``finegrain``, all for ``paper``). A constant number of known pairs per
        point, the query included, keeps the query off the centre of the
        embedding (with all k known it sits at the same distance from
        everything) so the shortlist's cluster structure can reach it.
    sg_k : int
        SuperGlobal K (neighbours in the refinement and the query expansion).
    sg_beta : float
        SuperGlobal beta (weight of the neighbours in the refinement).
    init : {"classical", "random"}
        SMACOF start: classical (Torgerson) MDS, or random with ``seed``.
    solver : {"numpy", "sklearn"}
        ``"sklearn"``: :func:`sklearn.manifold.smacof`; ``"numpy"``: the same
        metric SMACOF iteration (Guttman transform, the same stress and
        stopping rule) without scikit-learn's per-iteration input validation,
        about 10x faster for a few hundred points (tested to agree).
    blas_threads : int or None
        BLAS threads while re-ranking (the matrices are a few hundred wide:
        more threads only add synchronisation, badly so on a busy machine);
        None leaves the setting alone.
    pairs : {"graph", "online"}
        Where the shortlist's pairwise similarities come from. ``graph`` (default, the paper's): the stored
        neighbour lists, built once per index state (:func:`~finegrain.local.chamfer.knn_graph`: one
        approximate Chamfer search per database image: 43 minutes at 10,000 images of 970 descriptors on
        2 cores, docs/benchmarks.md).
        ``online``: measured at query time (:func:`online_pairs`), so nothing is built first: each shortlist
        image with its ``pair_neighbors`` nearest shortlist images by the global descriptor, by exact Chamfer
        on the ``pair_features`` strongest descriptors of each. **Much less accurate**: class mAP 83 / 82
        against the graph's 96 / 96 on the two landmark folds with 1,000 distractors, below the GeM global
        alone (docs/l2g.md, "Pairs without the graph"); for a first look at a collection whose graph is not
        built yet, not for results.
    pair_neighbors, pair_features : int
        ``pairs="online"``: pairs per shortlist image, and descriptors per image in their Chamfer (4 and 64:
        the one setting measured, not tuned).
    seed : int
    """

    k: int | None = None
    mds_dim: int = 16
    smacof_iter: int = 100
    smacof_eps: float = 1e-4
    w: float | None = None
    missing: float = 1.0
    sim_floor: float = 0.0
    sim_scale: float | None = 1.0
    neighbors: int | None = None
    query_neighbors: int | str | None = VARIANT_DEFAULT
    sg_k: int = 9
    sg_beta: float = 0.15
    init: str = "classical"
    solver: str = "numpy"
    blas_threads: int | None = 1
    seed: int = 0
    variant: str = "paper"
    fusion: str | None = None
    pairs: str = "graph"
    pair_neighbors: int = 4
    pair_features: int = 64

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {self.variant!r}")
        defaults = VARIANTS[self.variant]
        # Resolve the variant's values once, so the config reads (and prints) what is used.
        if self.k is None:
            self.k = int(defaults["k"])
        if self.w is None:
            self.w = float(defaults["w"])
        if self.query_neighbors == VARIANT_DEFAULT:
            self.query_neighbors = defaults["query_neighbors"]
        if self.fusion is None:
            self.fusion = str(defaults["fusion"])
        if self.fusion not in ("cosine", "average"):
            raise ValueError(f"fusion must be 'cosine' or 'average', got {self.fusion!r}")
        if isinstance(self.query_neighbors, str) or (self.query_neighbors is not None and self.query_neighbors < 1):
            raise ValueError(f"query_neighbors must be a positive integer or None, got {self.query_neighbors!r}")
        sizes = (("k (the shortlist)", self.k), ("mds_dim", self.mds_dim), ("smacof_iter", self.smacof_iter))
        for name, value in sizes:
            if value < 1:  # named one by one: the CLI's --shortlist, --mds-dim, --smacof-iter
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not 0.0 <= self.w <= 1.0:
            raise ValueError("w must be in [0, 1]")
        if not 0.0 <= self.sim_floor < 1.0:
            raise ValueError("sim_floor must be in [0, 1)")
        if self.sim_scale is not None and self.sim_scale <= self.sim_floor:
            raise ValueError("sim_scale must be above sim_floor")
        if self.init not in ("classical", "random"):
            raise ValueError("init must be 'classical' or 'random'")
        if self.solver not in ("numpy", "sklearn"):
            raise ValueError("solver must be 'numpy' or 'sklearn'")
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {', '.join(map(repr, PAIRS))}, got {self.pairs!r}")
        if self.pair_neighbors < 1 or self.pair_features < 1:
            raise ValueError("pair_neighbors and pair_features must be positive")


@dataclass
class L2GResult:
    """Re-ranked shortlist: ``ids`` (k,) best first, their fused ``scores``, and stage timings in ms."""

    ids: np.ndarray
    scores: np.ndarray
    timings: dict = field(default_factory=dict)
    n_pairs: int = 0
    stress: float = float("nan")


# --------------------------------------------------------------------------- pairs
def graph_pairs(shortlist: np.ndarray, graph_ids: np.ndarray, graph_sims: np.ndarray,
                neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Known similarities among the shortlist from the stored neighbour lists.

    ``graph_ids[i]``/``graph_sims[i]`` are database image ``i``'s neighbours
    (-1 padded). Returns ``(a, b, s)``: positions in ``shortlist`` of each
    pair found (a's list names b) and its similarity.
    """
    shortlist = np.asarray(shortlist, np.int64)
    nbr = np.asarray(graph_ids)[shortlist]
    sims = np.asarray(graph_sims, np.float32)[shortlist]
    if neighbors is not None:
        nbr, sims = nbr[:, :neighbors], sims[:, :neighbors]
    # map database ids to shortlist positions (-1 outside), by binary search in the sorted shortlist
    srt = np.argsort(shortlist, kind="stable")
    where = np.clip(np.searchsorted(shortlist[srt], nbr), 0, len(shortlist) - 1)
    pos = np.where(shortlist[srt][where] == nbr, srt[where], -1)
    a, c = np.nonzero(pos >= 0)
    b = pos[a, c]
    keep = a != b
    return a[keep], b[keep], sims[a, c][keep]


def online_pairs(descriptors: Sequence[np.ndarray], global_shortlist: np.ndarray, m: int = 4,
                 max_features: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs measured at query time (``L2GConfig(pairs="online")``): each shortlist image with its ``m``
    nearest shortlist images by the global descriptor, scored by exact Chamfer on each image's
    ``max_features`` strongest descriptors (``descriptors[i]``: shortlist image i's, strongest first).
    Returns ``(a, b, s)`` as :func:`graph_pairs`."""
    from ..local.chamfer import LocalDatabase, chamfer_scores

    g = np.asarray(global_shortlist, np.float32)
    k = len(g)
    m = min(int(m), k - 1)
    if m < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    sim = g @ g.T
    np.fill_diagonal(sim, -np.inf)
    nbr = np.argsort(-sim, axis=1, kind="stable")[:, :m]
    short = LocalDatabase.from_features([d[:max_features] for d in descriptors])  # empty sets score 0
    s = np.concatenate([chamfer_scores(short.image(i), short, row) for i, row in enumerate(nbr)])
    return np.repeat(np.arange(k, dtype=np.int64), m), nbr.ravel().astype(np.int64), s.astype(np.float32)


def dissimilarity_matrix(query_sims: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray,
                         missing: float = 1.0, sim_floor: float = 0.0, sim_scale: float = 1.0) -> np.ndarray:
    """(k+1, k+1) symmetric dissimilarities; point 0 is the query, point i+1 shortlist image i.

    Known pairs: the query row (``query_sims``, k values, NaN = unknown) and
    shortlist pairs ``(a, b, s)``; a pair known in both directions takes the
    mean dissimilarity; unknown pairs are ``missing``; the diagonal is 0.
    """
    q = np.asarray(query_sims, np.float64)
    k = len(q)
    known = np.flatnonzero(~np.isnan(q))

    def to_d(x):
        x = np.clip((np.asarray(x, np.float64) - sim_floor) / (sim_scale - sim_floor), 0.0, 1.0)
        return np.minimum(1.0 - x, missing)

    total = np.zeros((k + 1, k + 1))
    count = np.zeros((k + 1, k + 1))
    rows = np.concatenate([np.zeros(len(known), np.int64), np.asarray(a, np.int64) + 1])
    cols = np.concatenate([known + 1, np.asarray(b, np.int64) + 1])
    vals = np.concatenate([to_d(q[known]), to_d(s)])
    np.add.at(total, (rows, cols), vals)
    np.add.at(count, (rows, cols), 1.0)
    total, count = total + total.T, count + count.T
    D = np.where(count > 0, total / np.maximum(count, 1.0), missing)
    np.fill_diagonal(D, 0.0)
    return D


# --------------------------------------------------------------------------- embedding
def classical_mds(D: np.ndarray, dim: int) -> np.ndarray:
    """Torgerson's classical MDS of a dissimilarity matrix: the top eigenvectors of the double-centred -D^2/2."""
    n = len(D)
    J = np.eye(n) - 1.0 / n
    B = -0.5 * J @ (D ** 2) @ J
    vals, vecs = np.linalg.eigh(B)
    order = np.argsort(vals)[::-1][:dim]
    X = vecs[:, order] * np.sqrt(np.maximum(vals[order], 0.0))
    if X.shape[1] < dim:
        X = np.pad(X, ((0, 0), (0, dim - X.shape[1])))
    return X


def mds_embed(D: np.ndarray, config: L2GConfig) -> tuple[np.ndarray, float]:
    """SMACOF (metric) embedding of ``D`` in ``config.mds_dim`` dimensions; returns ``(X, stress)``."""
    dim = min(config.mds_dim, len(D) - 1) if len(D) > 1 else 1
    if config.init == "classical":
        init = classical_mds(D, dim)
        rng = np.random.default_rng(config.seed)  # break exact ties (collapsed points) without moving much
        init = init + 1e-6 * rng.standard_normal(init.shape)
    else:
        init = np.random.default_rng(config.seed).standard_normal((len(D), dim)) * 0.5
    if config.solver == "sklearn":
        from sklearn.manifold import smacof  # imported on use: the first import costs about a second

        X, stress = smacof(D, metric=True, n_components=dim, init=init, n_init=1, max_iter=config.smacof_iter,
                           eps=config.smacof_eps, normalized_stress=False)
    else:
        X, stress, _ = smacof_numpy(D, init, config.smacof_iter, config.smacof_eps)
    return X, float(stress)


def _distances(X: np.ndarray) -> np.ndarray:
    sq = (X * X).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (X @ X.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


def smacof_numpy(D: np.ndarray, init: np.ndarray, max_iter: int = 300, eps: float = 1e-6
                 ) -> tuple[np.ndarray, float, int]:
    """Metric SMACOF exactly as scikit-learn's ``_smacof_single`` (uniform weights), in plain numpy.

    Returns ``(X, raw stress, iterations)``.
    """
    D = np.asarray(D, np.float64)
    X = np.array(init, np.float64)
    n = len(D)
    dist = _distances(X)
    old = None
    it = 0
    stress = float("nan")
    for it in range(max_iter):  # noqa: B007 # the count is returned after the loop
        dist[dist == 0] = 1e-5
        ratio = D / dist
        B = -ratio
        B[np.diag_indices(n)] += ratio.sum(axis=1)
        X = B @ X / n
        dist = _distances(X)
        stress = float(((dist - D) ** 2).sum() / 2)
        if old is not None and (old - stress) / ((dist ** 2).sum() / 2) < eps:
            break
        old = stress
    return X, stress, it + 1


def fuse(mds: np.ndarray, global_: np.ndarray, w: float) -> np.ndarray:
    """``[sqrt(w) * l2n(global), sqrt(1 - w) * l2n(mds - mean)]``:
    unit rows whose inner products mix the two cosines."""
    m = np.asarray(mds, np.float64)
    m = m - m.mean(axis=0, keepdims=True)
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    g = np.asarray(global_, np.float64)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(np.concatenate([np.sqrt(w) * g, np.sqrt(1.0 - w) * m], axis=1), dtype=np.float32)


def fuse_average(mds: np.ndarray, global_: np.ndarray, w: float) -> np.ndarray:
    """The paper's fusion, a weighted average of the vectors: ``[w * l2n(global), (1 - w) * l2n(mds - mean)]``.

    The MDS embedding's axes are unrelated to the global descriptor's, so the
    two are averaged in disjoint coordinates: inner products of fused rows are
    ``w^2 * global cosine + (1 - w)^2 * mds cosine``. Rows have the common
    norm ``sqrt(w^2 + (1 - w)^2)``, which leaves every ranking as it is.
    """
    m = np.asarray(mds, np.float64)
    m = m - m.mean(axis=0, keepdims=True)
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    g = np.asarray(global_, np.float64)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(np.concatenate([w * g, (1.0 - w) * m], axis=1), dtype=np.float32)


# --------------------------------------------------------------------------- SuperGlobal
def superglobal_rerank(query: np.ndarray, X: np.ndarray, K: int = 9, beta: float = 0.15) -> np.ndarray:
    """SuperGlobal re-ranking scores of candidates ``X`` (n, d) for ``query`` (d,) (Shao et al., ICCV 2023).

    Refinement: each candidate becomes the weighted mean of itself (weight
    1) and its ``K`` nearest candidates (weight ``beta * similarity``).
    Query expansion: the element-wise max of the refined top-``K + 1``.
    Score: mean of the query's and the expanded query's similarity to each
    refined candidate. With fewer than ``2 * (K + 1)`` candidates (a small
    collection; SuperGlobal and L2G re-rank hundreds) the expansion is left
    out and the score is the query's similarity alone: the expansion would
    max-pool most of the shortlist, unrelated images included, and with
    signed (MDS) coordinates that pooled vector can point away from the
    query (an exact duplicate of the query ranked third of 7 images).
    """
    X = np.asarray(X, np.float32)
    q = np.asarray(query, np.float32)
    n = len(X)
    if n == 0:
        return np.zeros(0, np.float32)
    kk = min(K + 1, n)
    S = X @ X.T
    np.fill_diagonal(S, np.inf)  # oneself first
    nbr = np.argpartition(-S, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (n, 1))
    wts = np.take_along_axis(S, nbr, axis=1)
    wts = np.where(np.isinf(wts), 1.0, beta * wts)
    refined = (wts[..., None] * X[nbr]).sum(1) / wts.sum(1, keepdims=True)
    s1 = refined @ q
    if n < 2 * (K + 1):
        return s1.astype(np.float32)
    top = np.argsort(-s1, kind="stable")[:kk]
    expanded = refined[top].max(axis=0)
    s2 = refined @ expanded
    return ((s1 + s2) / 2.0).astype(np.float32)


# --------------------------------------------------------------------------- all together
def l2g_rerank(query_sims: np.ndarray, shortlist: np.ndarray, global_query: np.ndarray,
               global_shortlist: np.ndarray, config: L2GConfig | None = None,
               graph: tuple[np.ndarray, np.ndarray] | None = None,
               pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> L2GResult:
    """Re-rank a local-search shortlist with MDS + global fusion + SuperGlobal.

    Parameters
    ----------
    query_sims : (k,) local (Chamfer) similarity of the query to each shortlist image.
    shortlist : (k,) database ids, in local-search order.
    global_query : (d,) global descriptor of the query.
    global_shortlist : (k, d) global descriptors of the shortlist.
    config : L2GConfig
    graph : ``(ids (n_db, m), sims (n_db, m))`` stored neighbour lists of the database, or
    pairs : ``(a, b, s)`` known shortlist pairs (positions in ``shortlist``) when computed elsewhere.

    Returns
    -------
    L2GResult with the shortlist re-ordered.
    """
    config = config or L2GConfig()
    if config.blas_threads is None:
        return _l2g_rerank(query_sims, shortlist, global_query, global_shortlist, config, graph, pairs)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=config.blas_threads, user_api="blas"):
        return _l2g_rerank(query_sims, shortlist, global_query, global_shortlist, config, graph, pairs)


def known_query_scores(query_sims: np.ndarray, query_neighbors: int | str | None) -> np.ndarray:
    """The query's scores that enter MDS as known pairs: its ``query_neighbors`` best, the rest NaN (None: all)."""
    qs = np.asarray(query_sims, np.float64).copy()
    if isinstance(query_neighbors, (int, np.integer)) and query_neighbors < len(qs):
        qs[np.argsort(-qs, kind="stable")[query_neighbors:]] = np.nan
    return qs


def _l2g_rerank(query_sims, shortlist, global_query, global_shortlist, config, graph, pairs) -> L2GResult:
    t0 = time.perf_counter()
    shortlist = np.asarray(shortlist, np.int64)
    timings: dict[str, float] = {}
    if pairs is None:
        if graph is None:
            a = b = np.zeros(0, np.int64)
            s = np.zeros(0, np.float32)
        else:
            a, b, s = graph_pairs(shortlist, graph[0], graph[1], config.neighbors)
    else:
        a, b, s = pairs
    qs = known_query_scores(query_sims, config.query_neighbors)
    if config.sim_scale is not None:
        scale = config.sim_scale
    elif graph is not None:
        scale = float(np.median(np.asarray(graph[1])[shortlist, 0]))
    else:
        scale = float(np.max(query_sims))
    scale = max(scale, config.sim_floor + 1e-6)
    D = dissimilarity_matrix(qs, a, b, s, config.missing, config.sim_floor, scale)
    t1 = time.perf_counter()
    X, stress = mds_embed(D, config)
    t2 = time.perf_counter()
    G = np.concatenate([np.asarray(global_query, np.float32)[None], np.asarray(global_shortlist, np.float32)])
    F = (fuse_average if config.fusion == "average" else fuse)(X, G, float(config.w))
    scores = superglobal_rerank(F[0], F[1:], config.sg_k, config.sg_beta)
    order = np.argsort(-scores, kind="stable")
    t3 = time.perf_counter()
    timings.update(pairs_ms=(t1 - t0) * 1e3, mds_ms=(t2 - t1) * 1e3, fuse_rerank_ms=(t3 - t2) * 1e3,
                   total_ms=(t3 - t0) * 1e3)
    return L2GResult(shortlist[order], scores[order], timings, int(len(a)), stress)
