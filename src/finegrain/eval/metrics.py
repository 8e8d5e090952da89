"""Retrieval metrics: Recall@K, NDCG@K and the Revisited Oxford/Paris mAP.

Ranks are 0-based throughout (rank 0 = the first result), as returned by
``np.argsort``; ``np.inf`` marks an item that was not retrieved at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def recall_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Fraction of queries whose (best) relevant item has 0-based rank < ``k``."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no queries")
    return float(np.mean(r < k))


def ndcg_at_k(ranks: Sequence[float] | np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k for queries with exactly one relevant item at 0-based ``ranks``.

    With one relevant item the ideal DCG is 1, so NDCG = 1/log2(rank+2) if
    the item is in the top k (1-based rank r: 1/log2(r+1)), else 0.
    """
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no queries")
    gains = np.where(r < k, 1.0 / np.log2(np.minimum(r, k) + 2.0), 0.0)
    return float(gains.mean())


def ndcg_at_k_graded(ranking: Sequence[int], relevant: Iterable[int], k: int = 10) -> float:
    """NDCG@k of one ranked id list against a set of equally relevant ids."""
    relevant = set(relevant)
    if not relevant:
        raise ValueError("no relevant items")
    dcg = sum(1.0 / np.log2(i + 2) for i, item in enumerate(list(ranking)[:k]) if item in relevant)
    idcg = sum(1.0 / np.log2(i + 2) for i in range(min(k, len(relevant))))
    return float(dcg / idcg)


def average_precision_revisitop(positions: np.ndarray, n_relevant: int) -> float:
    """AP with the trapezoidal rule of the revisitop reference ``compute_ap``.

    ``positions`` are the 0-based ranks of the relevant items (junk already
    removed), sorted ascending; ``n_relevant`` is the number of positives.
    """
    ap = 0.0
    step = 1.0 / n_relevant
    for j, rank in enumerate(np.asarray(positions, dtype=np.float64)):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_after = (j + 1) / (rank + 1)
        ap += (precision_before + precision_after) * step / 2.0
    return float(ap)


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = ()
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Revisited Oxford/Paris mAP, exactly as the revisitop reference ``compute_map``.

    Parameters
    ----------
    ranks:
        (n_db, n_queries) array; column q lists database indices by decreasing score.
    gnd:
        One dict per query with ``ok`` (positives) and optionally ``junk`` (ignored).
    kappas:
        Cut-offs for mean precision at k (mP@k).

    Returns
    -------
    (map, aps, mean_pr, prs): mAP over queries that have positives; per-query
    AP (NaN for queries without positives); mP@k per kappa; per-query P@k.
    """
    ranks = np.asarray(ranks)
    n_queries = ranks.shape[1]
    aps = np.zeros(n_queries)
    prs = np.zeros((n_queries, len(kappas)))
    total_ap, total_pr, empty = 0.0, np.zeros(len(kappas)), 0
    for q in range(n_queries):
        positives = np.asarray(gnd[q].get("ok", []), dtype=np.int64)
        if positives.size == 0:
            aps[q], prs[q] = np.nan, np.nan
            empty += 1
            continue
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        column = ranks[:, q]
        pos = np.sort(np.flatnonzero(np.isin(column, positives)))
        junk_pos = np.sort(np.flatnonzero(np.isin(column, junk)))
        # Remove junk from the ranking: shift each positive up by the junk ranked before it.
        pos = pos - np.searchsorted(junk_pos, pos)
        ap = average_precision_revisitop(pos, len(positives))
        aps[q] = ap
        total_ap += ap
        pos1 = pos + 1  # 1-based
        for j, kappa in enumerate(kappas):
            kq = min(pos1.max(), kappa) if pos1.size else kappa
            prs[q, j] = (pos1 <= kq).sum() / kq
        total_pr += prs[q]
    valid = n_queries - empty
    if valid == 0:
        raise ValueError("no query has positives")
    return total_ap / valid, aps, total_pr / valid, prs


def revisitop_protocols(gnd: Sequence[dict]) -> dict[str, list[dict]]:
    """Turn revisitop ``gnd`` entries (easy/hard/junk) into Easy/Medium/Hard ok/junk sets."""
    out: dict[str, list[dict]] = {"easy": [], "medium": [], "hard": []}
    for g in gnd:
        easy, hard, junk = list(g.get("easy", [])), list(g.get("hard", [])), list(g.get("junk", []))
        out["easy"].append({"ok": easy, "junk": junk + hard})
        out["medium"].append({"ok": easy + hard, "junk": junk})
        out["hard"].append({"ok": hard, "junk": junk + easy})
    return out


def revisitop_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """mAP and mP@k (in percent) under the Easy, Medium and Hard protocols."""
    out = {}
    for name, protocol in revisitop_protocols(gnd).items():
        m, _, mpr, _ = compute_map(ranks, protocol, kappas)
        out[f"map_{name}"] = 100 * m
        for kappa, value in zip(kappas, mpr):
            out[f"mp{kappa}_{name}"] = 100 * value
    return out
