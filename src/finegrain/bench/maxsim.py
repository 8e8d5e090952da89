"""finegrain's exact multi-vector score written as plain MaxSim, so that late-interaction engines compute it natively.

numpy only, no finegrain import: the fast-plaid runner (its own virtualenv) loads this file by path.

finegrain's exact score (:mod:`finegrain.search.multivector`, ``exhaustive`` over every image) is::

    score(d) = w * <q_0, g_d> + (1 - w) / (N + 1) * sum_j max_s <q_j, s>      (j = 0..N, s: every segment of d)

Late-interaction engines (ColBERT, PLAID, Qdrant's and LanceDB's multivectors) score
``sum_i max_v <Q_i, D_v>``. One extra dimension turns the first into the second:

- document vectors: the global vector ``[g, 1]``, each segment ``[s, -1]``;
- query vectors: ``[q_0, M]`` for the global term, ``[q_j, -M]`` for each sub-query term, ``M = 2``.

With unit vectors, ``<[q_0, M], [g, 1]> = <q_0, g> + M`` beats every ``<[q_0, M], [s, -1]> = <q_0, s> - M``
(cosines differ by at most 2 < 2M), so the global term's max is always the global vector, and each
sub-query term's max is always a segment. The weights: the global term counts
``r = w (N + 1) / (1 - w)`` times a sub-query term (``N + 1`` for the default w = 0.5). Engines that
score by dot product take the weights as scales of the query vectors (exact for any w); engines that
normalise (cosine) get the global vector repeated ``r`` times, exact when ``r`` is a whole number. Every
document vector has norm sqrt(2) and every query vector norm sqrt(1 + M^2), so cosine and dot rankings agree.
The sum differs from finegrain's score by a positive factor and a constant: the same ranking.

One difference: finegrain scores an image with no segments at all as if every sub-query matched its
global vector (``<q_0, g>``); here such an image's sub-query terms get ``<q_j, g> - M``. Indexes built
with segments give every image segments, so rankings there are the same.
"""

from __future__ import annotations

import numpy as np

MARGIN = 2.0


def augment_docs(globals_: np.ndarray, segments: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: ``[g, 1]`` then its segments ``[s, -1]``; returns (vectors (n + m, d + 1), offsets (n + 1)).

    ``offsets`` (n + 1,) are the images' row ranges in ``segments``.
    """
    n, d = globals_.shape
    counts = np.diff(offsets).astype(np.int64)
    out_offsets = np.zeros(n + 1, np.int64)
    out_offsets[1:] = np.cumsum(counts + 1)
    out = np.empty((int(out_offsets[-1]), d + 1), np.float32)
    heads = out_offsets[:-1]
    out[heads, :d] = globals_
    out[heads, d] = 1.0
    body = np.ones(len(out), bool)
    body[heads] = False
    out[body, :d] = segments
    out[body, d] = -1.0
    return out, out_offsets


def augment_queries(queries: np.ndarray, weight_global: float) -> tuple[np.ndarray, np.ndarray]:
    """(1 + N, d) query vectors (full query first) -> (augmented vectors, their weights); terms of weight 0 dropped."""
    n_terms = len(queries)
    vectors = np.empty((n_terms + 1, queries.shape[1] + 1), np.float32)
    vectors[0, :-1], vectors[0, -1] = queries[0], MARGIN
    vectors[1:, :-1], vectors[1:, -1] = queries, -MARGIN
    if weight_global >= 1.0:
        weights = np.array([1.0] + [0.0] * n_terms)
    else:
        weights = np.array([weight_global * n_terms / (1.0 - weight_global)] + [1.0] * n_terms)
    keep = weights > 0
    return vectors[keep], weights[keep].astype(np.float32)


def scaled(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Query vectors scaled by their weights (for engines that score by dot product)."""
    return (vectors * weights[:, None]).astype(np.float32)


def repeated(vectors: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, bool]:
    """Query vectors each repeated ``round(weight)`` times (for cosine engines); and whether that is exact."""
    times = np.maximum(1, np.rint(weights)).astype(np.int64)
    return np.repeat(vectors, times, axis=0), bool(np.allclose(times, weights, atol=1e-6))


def maxsim(queries: np.ndarray, weights: np.ndarray, docs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Exact weighted MaxSim of every image in a block: (n,) scores, images' rows ``offsets[i]:offsets[i+1]``."""
    sims = docs @ queries.T  # (rows, terms)
    best = np.maximum.reduceat(sims, offsets[:-1], axis=0)  # every image has its global row: no empty range
    return best @ weights


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the ``k`` best, best first (ties: lower position first)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
    order = part[np.lexsort((part, -scores[part]))]
    return scores[order], ids[order]


def merge_top_k(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of two (scores, ids) lists."""
    scores, ids = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
    return top_k(scores, ids, k)
