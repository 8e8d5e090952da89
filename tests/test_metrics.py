"""Tests for finegrain.eval.metrics, with expected values worked out by hand.

Conventions: ranks/positions are 0-based, ``np.inf`` = not retrieved. In the
``compute_map`` tests ``ranks`` is (n_db, n_queries): column q is the ranked
list of database indices for query q.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from finegrain.eval.metrics import (
    average_precision_revisitop,
    compute_map,
    ndcg_at_k,
    ndcg_at_k_graded,
    recall_at_k,
    revisitop_map,
    revisitop_protocols,
)

LOG2_3 = math.log2(3)  # 1.5849625007211562


def col(*columns: list[int]) -> np.ndarray:
    """Stack ranked lists (one per query) into the (n_db, n_queries) layout."""
    return np.array(columns, dtype=np.int64).T


# --------------------------------------------------------------------------- recall@k


def test_recall_at_k_by_hand() -> None:
    ranks = [0, 3, np.inf, 9, 10]
    assert recall_at_k(ranks, 1) == pytest.approx(0.2)  # only rank 0 < 1 -> 1/5
    assert recall_at_k(ranks, 4) == pytest.approx(0.4)  # 0, 3 < 4 -> 2/5
    assert recall_at_k(ranks, 10) == pytest.approx(0.6)  # 0, 3, 9 < 10 -> 3/5
    assert recall_at_k(ranks, 11) == pytest.approx(0.8)  # 0, 3, 9, 10 < 11 -> 4/5 (inf never)
    assert recall_at_k([np.inf, np.inf], 1000) == 0.0  # nothing retrieved -> 0/2
    assert recall_at_k([0], 1) == 1.0  # 1/1


def test_recall_at_k_empty_raises() -> None:
    with pytest.raises(ValueError):
        recall_at_k([], 5)


# --------------------------------------------------------------------------- NDCG@k


def test_ndcg_at_k_exact_values() -> None:
    # ranks 0, 2, 6 -> 1/log2(2)=1, 1/log2(4)=1/2, 1/log2(8)=1/3; mean = (1+1/2+1/3)/3 = 11/18
    assert ndcg_at_k([0, 2, 6], k=10) == pytest.approx(11 / 18)
    # k=3: rank 6 is not < 3 -> 0; mean = (1 + 1/2 + 0)/3 = 1/2
    assert ndcg_at_k([0, 2, 6], k=3) == pytest.approx(0.5)
    # rank 2 with k=2: not in top 2 -> 0
    assert ndcg_at_k([2], k=2) == 0.0
    # rank 1 -> 1/log2(3) = 0.6309297535714575
    assert ndcg_at_k([1], k=10) == pytest.approx(1 / LOG2_3)


def test_ndcg_at_k_boundary_and_inf() -> None:
    # ranks 0, 1, 10, inf with k=10: 1 + 1/log2(3) + 0 (10 is not < 10) + 0 (inf)
    # = 1 + 0.6309297535714575 = 1.6309297535714575; / 4 = 0.4077324383928644
    assert ndcg_at_k([0, 1, 10, np.inf], k=10) == pytest.approx((1 + 1 / LOG2_3) / 4)
    # k=11: rank 10 now counts 1/log2(12) = 0.27894294565112987
    # (1 + 0.6309297535714575 + 0.27894294565112987)/4 = 0.47746817480564684
    assert ndcg_at_k([0, 1, 10, np.inf], k=11) == pytest.approx(0.47746817480564684)
    assert ndcg_at_k([np.inf], k=10) == 0.0


def test_ndcg_at_k_empty_raises() -> None:
    with pytest.raises(ValueError):
        ndcg_at_k([], 10)


def test_ndcg_at_k_graded_by_hand() -> None:
    ranking = [9, 8, 2, 7, 6, 5, 1, 0]  # relevant 2 at i=2, relevant 1 at i=6
    # DCG = 1/log2(4) + 1/log2(8) = 1/2 + 1/3 = 5/6
    # IDCG (2 relevant) = 1/log2(2) + 1/log2(3) = 1 + 0.6309297535714575 = 1.6309297535714575
    # NDCG = 0.8333333/1.6309298 = 0.5109529...
    assert ndcg_at_k_graded(ranking, {1, 2}, k=10) == pytest.approx((5 / 6) / (1 + 1 / LOG2_3))
    # k=5: only i=2 in the top 5 -> (1/2) / 1.6309297535714575 = 0.30657...
    assert ndcg_at_k_graded(ranking, {1, 2}, k=5) == pytest.approx(0.5 / (1 + 1 / LOG2_3))
    # k=1: IDCG = min(1, 2) terms = 1; ranking[0]=9 not relevant -> 0
    assert ndcg_at_k_graded(ranking, {1, 2}, k=1) == 0.0
    # perfect: relevant at i=0, 1 -> DCG = IDCG -> 1
    assert ndcg_at_k_graded([1, 2, 9], {1, 2}, k=10) == pytest.approx(1.0)
    # more relevant than k: IDCG uses k terms. k=2, relevant {1,2,3}, ranking [1,3,...]:
    # DCG = 1 + 1/log2(3) = IDCG(2 terms) -> 1
    assert ndcg_at_k_graded([1, 3, 7, 2], {1, 2, 3}, k=2) == pytest.approx(1.0)
    # relevant never retrieved -> 0
    assert ndcg_at_k_graded([4, 5, 6], [1], k=10) == 0.0


def test_ndcg_graded_single_matches_single_item_version() -> None:
    # one relevant item at 0-based rank 3 -> both give 1/log2(5) = 0.43067655807339306
    assert ndcg_at_k_graded([7, 8, 9, 42, 1], [42], k=10) == pytest.approx(ndcg_at_k([3], k=10))
    assert ndcg_at_k([3], k=10) == pytest.approx(0.43067655807339306)


def test_ndcg_graded_empty_relevant_raises() -> None:
    with pytest.raises(ValueError):
        ndcg_at_k_graded([1, 2], [], k=10)


# --------------------------------------------------------------------------- revisitop AP


def test_average_precision_revisitop_by_hand() -> None:
    # positions [0, 2], nres 2, step 1/2:
    #   j=0 rank 0: before 1 (rank 0), after 1/1 = 1   -> (1 + 1)   * 1/2 / 2 = 1/2
    #   j=1 rank 2: before 1/2,         after 2/3       -> (7/6)     * 1/2 / 2 = 7/24
    #   AP = 12/24 + 7/24 = 19/24 = 0.7916666
    assert average_precision_revisitop(np.array([0, 2]), 2) == pytest.approx(19 / 24)
    # positions [1, 3], nres 3, step 1/3:
    #   j=0 rank 1: before 0/1 = 0, after 1/2 -> (1/2) * 1/3 / 2 = 1/12
    #   j=1 rank 3: before 1/3,     after 2/4 -> (5/6) * 1/3 / 2 = 5/36
    #   AP = 3/36 + 5/36 = 8/36 = 2/9 = 0.2222 (the non-interpolated AP would be (1/2+2/4)/3 = 1/3)
    assert average_precision_revisitop(np.array([1, 3]), 3) == pytest.approx(2 / 9)
    # perfect [0, 1, 2], nres 3: each step (1 + 1) * 1/3 / 2 = 1/3 -> 1
    assert average_precision_revisitop(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    # one of two positives found, at rank 0: (1 + 1) * 1/2 / 2 = 1/2
    assert average_precision_revisitop(np.array([0]), 2) == pytest.approx(0.5)
    # nothing retrieved -> 0
    assert average_precision_revisitop(np.array([], dtype=np.int64), 4) == 0.0


# --------------------------------------------------------------------------- compute_map


def test_compute_map_junk_removal_single_query() -> None:
    # ranked list: pos 0:3, 1:0(junk), 2:5, 3:1(ok), 4:4(junk), 5:2(ok)
    ranks = col([3, 0, 5, 1, 4, 2])
    gnd = [{"ok": [1, 2], "junk": [0, 4]}]
    # positives at [3, 5]; junk at [1, 4]; 1 junk before 3 -> 2, 2 junk before 5 -> 3 => [2, 3]
    #   j=0 rank 2: before 0/2 = 0, after 1/3 -> (1/3) * 1/2 / 2 = 1/12
    #   j=1 rank 3: before 1/3,     after 2/4 -> (5/6) * 1/2 / 2 = 5/24
    #   AP = 2/24 + 5/24 = 7/24 = 0.2916666
    m, aps, mpr, prs = compute_map(ranks, gnd, kappas=(1, 2, 3, 5))
    assert m == pytest.approx(7 / 24)
    assert aps[0] == pytest.approx(7 / 24)
    # 1-based positions after junk removal: [3, 4]
    #   k=1: kq = min(4, 1) = 1, #(<=1) = 0 -> 0
    #   k=2: kq = 2, #(<=2) = 0 -> 0
    #   k=3: kq = 3, #(<=3) = 1 -> 1/3
    #   k=5: kq = min(4, 5) = 4, #(<=4) = 2 -> 2/4 = 1/2
    np.testing.assert_allclose(prs[0], [0, 0, 1 / 3, 1 / 2])
    np.testing.assert_allclose(mpr, [0, 0, 1 / 3, 1 / 2])


def test_compute_map_without_junk_differs() -> None:
    # same ranking without junk: positives at [3, 5], nres 2
    #   j=0 rank 3: before 0, after 1/4        -> (1/4)  * 1/2 / 2 = 1/16
    #   j=1 rank 5: before 1/5, after 2/6 = 1/3 -> (8/15) * 1/2 / 2 = 2/15
    #   AP = 1/16 + 2/15 = 15/240 + 32/240 = 47/240 = 0.1958333
    m, aps, _, _ = compute_map(col([3, 0, 5, 1, 4, 2]), [{"ok": [1, 2]}])
    assert m == pytest.approx(47 / 240)


def test_compute_map_multi_query_by_hand() -> None:
    ranks = col(
        [2, 4, 0, 1, 3],  # q0: ok {2, 0}, no junk -> positions [0, 2]
        [1, 0, 3, 2, 4],  # q1: ok {4} at 4, junk {3} at 2 -> shifted [3]
        [0, 1, 2, 3, 4],  # q2: no positives -> NaN, skipped
        [3, 1, 4, 0, 2],  # q3: ok {3, 1, 4} at [0, 1, 2], junk {0} at 3 (after) -> [0, 1, 2]
    )
    gnd = [
        {"ok": [2, 0], "junk": []},
        {"ok": [4], "junk": [3]},
        {"ok": [], "junk": [1]},
        {"ok": [3, 1, 4], "junk": [0]},
    ]
    # q0: positions [0, 2], nres 2 -> 19/24 (see test_average_precision_revisitop_by_hand)
    # q1: position [3], nres 1: before 0/3 = 0, after 1/4 -> (1/4) * 1 / 2 = 1/8
    # q3: positions [0, 1, 2], nres 3 -> 1
    # mAP = (19/24 + 3/24 + 24/24) / 3 = (46/24)/3 = 46/72 = 23/36 = 0.638888
    m, aps, mpr, prs = compute_map(ranks, gnd, kappas=(1, 3))
    assert m == pytest.approx(23 / 36)
    assert aps[0] == pytest.approx(19 / 24)
    assert aps[1] == pytest.approx(1 / 8)
    assert np.isnan(aps[2])
    assert aps[3] == pytest.approx(1.0)
    # mP@k, 1-based positions: q0 [1, 3], q1 [4], q3 [1, 2, 3]
    #   q0: k=1 kq=min(3,1)=1 -> 1/1 = 1;  k=3 kq=3 -> 2/3
    #   q1: k=1 kq=1 -> 0/1 = 0;           k=3 kq=min(4,3)=3 -> 0/3 = 0
    #   q3: k=1 kq=1 -> 1;                 k=3 kq=3 -> 3/3 = 1
    #   mean over the 3 valid queries: k=1 (1+0+1)/3 = 2/3; k=3 (2/3+0+1)/3 = 5/9
    np.testing.assert_allclose(prs[0], [1, 2 / 3])
    np.testing.assert_allclose(prs[1], [0, 0])
    assert np.isnan(prs[2]).all()
    np.testing.assert_allclose(prs[3], [1, 1])
    np.testing.assert_allclose(mpr, [2 / 3, 5 / 9])


def test_compute_map_mpk_uses_last_positive_when_fewer_than_k() -> None:
    # positives at 1-based [1, 2] among 10: P@10 uses kq = min(2, 10) = 2 -> 2/2 = 1 (not 2/10)
    ranks = col(list(range(10)))
    _, _, mpr, _ = compute_map(ranks, [{"ok": [0, 1]}], kappas=(10,))
    assert mpr[0] == pytest.approx(1.0)
    # positives at 1-based [2, 9]: k=5 -> kq = 5, #(<=5) = 1 -> 1/5; k=10 -> kq = 9, 2/9
    _, _, mpr, _ = compute_map(ranks, [{"ok": [1, 8]}], kappas=(5, 10))
    np.testing.assert_allclose(mpr, [1 / 5, 2 / 9])


def test_compute_map_positive_not_in_ranking() -> None:
    # truncated ranking [0, 1, 2]; ok {1, 7}: 7 never ranked -> positions [1], nres 2
    #   j=0 rank 1: before 0, after 1/2 -> (1/2) * 1/2 / 2 = 1/8
    m, _, _, _ = compute_map(col([0, 1, 2]), [{"ok": [1, 7], "junk": []}])
    assert m == pytest.approx(1 / 8)


def test_compute_map_all_empty_raises() -> None:
    with pytest.raises(ValueError):
        compute_map(col([0, 1]), [{"ok": [], "junk": [0]}])


# --------------------------------------------------------------------------- protocols


def test_revisitop_protocols_definitions() -> None:
    out = revisitop_protocols([{"easy": [0, 1], "hard": [2], "junk": [3]}])
    assert set(out) == {"easy", "medium", "hard"}
    # Easy: ok = easy, junk = junk + hard
    assert sorted(out["easy"][0]["ok"]) == [0, 1]
    assert sorted(out["easy"][0]["junk"]) == [2, 3]
    # Medium: ok = easy + hard, junk = junk
    assert sorted(out["medium"][0]["ok"]) == [0, 1, 2]
    assert sorted(out["medium"][0]["junk"]) == [3]
    # Hard: ok = hard, junk = junk + easy
    assert sorted(out["hard"][0]["ok"]) == [2]
    assert sorted(out["hard"][0]["junk"]) == [0, 1, 3]


def test_revisitop_map_by_hand() -> None:
    # ranked list: pos 0:item0(junk) 1:item3(hard) 2:item2 3:item1(easy) 4:item4
    ranks = col([0, 3, 2, 1, 4])
    gnd = [{"easy": [1], "hard": [3], "junk": [0]}]
    out = revisitop_map(ranks, gnd, kappas=(1, 5))
    # Easy: ok {1} at 3; junk {0, 3} at [0, 1], both before -> position 1
    #   AP: before 0/1 = 0, after 1/2 -> (1/2) * 1 / 2 = 1/4 -> 25 %
    #   1-based [2]: P@1 kq=1 -> 0; P@5 kq=min(2,5)=2 -> 1/2 -> 50 %
    assert out["map_easy"] == pytest.approx(25.0)
    assert out["mp1_easy"] == pytest.approx(0.0)
    assert out["mp5_easy"] == pytest.approx(50.0)
    # Medium: ok {1, 3} at [3, 1] -> sorted [1, 3]; junk {0} at 0 -> shifted [0, 2]
    #   AP = 19/24 = 0.7916666 -> 79.1666 %
    #   1-based [1, 3]: P@1 = 1/1 -> 100 %; P@5 kq=min(3,5)=3 -> 2/3 -> 66.666 %
    assert out["map_medium"] == pytest.approx(100 * 19 / 24)
    assert out["mp1_medium"] == pytest.approx(100.0)
    assert out["mp5_medium"] == pytest.approx(200 / 3)
    # Hard: ok {3} at 1; junk {0, 1} at [0, 3]; one before -> position 0 -> AP 1 -> 100 %
    #   1-based [1]: P@1 = 1; P@5 kq=min(1,5)=1 -> 1/1 -> 100 %
    assert out["map_hard"] == pytest.approx(100.0)
    assert out["mp1_hard"] == pytest.approx(100.0)
    assert out["mp5_hard"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- properties


def _reference_compute_map(ranks, gnd, kappas=()):
    """Literal transcription of revisitop's reference compute_map/compute_ap (loops)."""

    def compute_ap(ranks, nres):
        ap = 0.0
        recall_step = 1.0 / nres
        for j in range(len(ranks)):
            rank = ranks[j]
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        return ap

    total, nq, nempty = 0.0, len(gnd), 0
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = compute_ap(pos, len(qgnd))
        total += ap
        aps[i] = ap
        pos += 1
        for j, kappa in enumerate(kappas):
            kq = min(max(pos), kappa)
            pr[j] += (pos <= kq).sum() / kq
    return total / (nq - nempty), aps, pr / (nq - nempty)


def _random_gnd(rng: np.random.Generator, n_db: int, n_q: int) -> list[dict]:
    gnd = []
    for _ in range(n_q):
        perm = rng.permutation(n_db)
        n_ok, n_junk = int(rng.integers(1, 8)), int(rng.integers(0, 6))
        gnd.append({"ok": perm[:n_ok].tolist(), "junk": perm[n_ok : n_ok + n_junk].tolist()})
    return gnd


def test_perfect_ranking_has_map_one() -> None:
    rng = np.random.default_rng(0)
    n_db, n_q = 40, 6
    gnd = _random_gnd(rng, n_db, n_q)
    columns = []
    for g in gnd:
        ok, junk = list(g["ok"]), list(g["junk"])
        rest = [i for i in rng.permutation(n_db).tolist() if i not in ok and i not in junk]
        head = ok + junk
        head = [head[i] for i in rng.permutation(len(head))]  # junk interleaved with positives: ignored
        columns.append(head + rest)
    m, aps, mpr, _ = compute_map(col(*columns), gnd, kappas=(1, 5, 10))
    assert m == pytest.approx(1.0)
    np.testing.assert_allclose(aps, 1.0)
    np.testing.assert_allclose(mpr, 1.0)  # kq = min(#ok, k) and all of the first kq are positives


def test_random_rankings_ap_in_unit_interval_and_match_reference() -> None:
    rng = np.random.default_rng(1234)
    n_db, n_q = 30, 8
    for _ in range(20):
        gnd = _random_gnd(rng, n_db, n_q)
        ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
        m, aps, mpr, prs = compute_map(ranks, gnd, kappas=(1, 5, 10))
        assert 0.0 <= m <= 1.0
        assert np.all((aps >= 0) & (aps <= 1 + 1e-12))
        assert np.all((prs >= 0) & (prs <= 1))
        ref_m, ref_aps, ref_mpr = _reference_compute_map(ranks, gnd, kappas=(1, 5, 10))
        assert m == pytest.approx(ref_m)
        np.testing.assert_allclose(aps, ref_aps)
        np.testing.assert_allclose(mpr, ref_mpr)


def test_random_positions_ap_in_unit_interval() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n_db = int(rng.integers(1, 50))
        n_rel = int(rng.integers(1, n_db + 1))
        n_found = int(rng.integers(0, n_rel + 1))
        positions = np.sort(rng.choice(n_db, size=n_found, replace=False))
        ap = average_precision_revisitop(positions, n_rel)
        assert 0.0 <= ap <= 1.0 + 1e-12
