"""The ``objects-max`` candidate stage: top-n images by ``objects_mean``, then the objects of those images only."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.index import Index
from finegrain.objects.config import ObjectConfig
from finegrain.retrieval import Query
from finegrain.retrieval import object_candidates as oc
from finegrain.retrieval import objects as objects_mode
from finegrain.store.catalog import NewImage
from finegrain.store.vectors import FieldRows

DIM = 24


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _object_index(path, n: int, ann: str = "auto", seed: int = 5) -> Index:
    """``n`` images with 2 to 6 random object vectors each (their mean as ``objects_mean``), written directly."""
    idx = Index.create(path, ann=ann, objects=ObjectConfig(max_objects=6))
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 7, n)
    crops = _unit(rng.standard_normal((int(counts.sum()), DIM)))
    owners = np.repeat(np.arange(n), counts)
    means = _unit(np.stack([crops[owners == i].mean(axis=0) for i in range(n)]))
    images = [NewImage(f"/o/{i}.jpg", f"{i:064x}", 1, 1, 32, 32) for i in range(n)]
    fields = {"global": FieldRows(_unit(rng.standard_normal((n, idx.encoder.dim))), np.arange(n)),
              "objects": FieldRows(crops, owners, {"box": np.tile(np.array([0, 0, 1, 1], np.float32), (len(owners), 1)),
                                                   "score": np.ones(len(owners), np.float32)}),
              "objects_mean": FieldRows(means, np.arange(n))}
    with idx.writer() as w:
        w.commit(images, fields, [], [], [])
    idx.refresh()
    return idx


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    idx = _object_index(tmp_path_factory.mktemp("objcand") / "idx", 90)
    yield idx
    idx.close()


@pytest.fixture()
def fixed_query(monkeypatch, index):
    """Searches embed to a fixed object-space vector (no encoder run); returns (query, vector)."""
    vector = _unit(np.random.default_rng(11).standard_normal((1, DIM)))[0]
    monkeypatch.setattr(objects_mode, "embed_object_query", lambda snapshot, query: vector)
    return Query(image="unused.jpg"), vector


def _full(index: Index, vector: np.ndarray) -> dict[int, float]:
    """objects-max scores of every image by brute force: the best object row of each image."""
    rows = index.fields["objects"]
    sims = rows.vectors @ vector
    return {int(i): float(sims[rows.owners == i].max()) for i in np.unique(rows.owners)}


def _exact_stage(index: Index, vector: np.ndarray, n: int, allowed: set[int] | None = None) -> set[int]:
    """The top n images by fused descriptor, plus the owners of the n best object rows (allowed ones only)."""
    out: set[int] = set()
    for field in ("objects_mean", "objects"):
        rows = index.fields[field]
        order = np.argsort(-(rows.vectors @ vector), kind="stable")
        owners = [int(rows.owners[j]) for j in order if allowed is None or int(rows.owners[j]) in allowed]
        out |= set(owners[:n])
    return out


def test_the_stage_is_the_top_n_by_fused_descriptor_and_scores_are_exact(index, fixed_query):
    query, vector = fixed_query
    snap = index.snapshot
    pool = set(snap.ids[oc.candidate_positions(snap, vector, 12)].tolist())
    assert pool == _exact_stage(index, vector, 12)
    got = index.search(query=query, k=10, mode="objects-max", candidates=12)
    assert "candidates_ms" in got.timings and got.stats.candidates_per_level == [len(pool)] and 12 <= len(pool) <= 24
    full = _full(index, vector)
    # the full scan restricted to the candidates: same images, same order, same scores
    want = sorted(pool, key=lambda i: -full[i])[:10]
    assert [h.id for h in got] == want
    np.testing.assert_allclose([h.score for h in got], [full[i] for i in want], rtol=1e-5)
    assert got.stats.sim_ops == int(np.isin(index.fields["objects"].owners, list(pool)).sum())


def test_a_stage_as_large_as_the_index_is_the_full_scan(index, fixed_query):
    query, vector = fixed_query
    full = index.search(query=query, k=10, mode="objects-max")  # 90 images: every image by default
    same = index.search(query=query, k=10, mode="objects-max", candidates=90)
    zero = index.search(query=query, k=10, mode="objects-max", candidates=0)
    assert [h.id for h in same] == [h.id for h in zero] == [h.id for h in full]
    assert "candidates_ms" not in full.timings
    scores = _full(index, vector)
    assert [h.id for h in full] == sorted(scores, key=lambda i: -scores[i])[:10]


@pytest.mark.parametrize("selector", [False, True])
def test_filters_inside_the_stage_equal_the_filtered_full_scan(index, fixed_query, monkeypatch, selector):
    query, vector = fixed_query
    if selector:  # the FAISS ID-selector path that large filtered indexes take
        monkeypatch.setattr(oc, "EXACT_ALLOWED_ROWS", 0)
    kept = [int(i) for i in index.snapshot.ids if int(i) % 3 != 0]
    pool = set(index.snapshot.ids[oc.candidate_positions(index.snapshot, vector, 8,
                                                         np.isin(index.snapshot.ids, kept))].tolist())
    assert pool == _exact_stage(index, vector, 8, set(kept))
    got = index.search(query=query, k=5, mode="objects-max", candidates=8, filters={"ids": kept})
    full = _full(index, vector)
    assert [h.id for h in got] == sorted(pool, key=lambda i: -full[i])[:5]
    assert got.allowed == len(kept) and "candidates_ms" in got.timings


def test_hnsw_stage_with_filters(tmp_path, monkeypatch):
    idx = _object_index(tmp_path / "hnsw", 60, ann="hnsw", seed=9)
    vector = _unit(np.random.default_rng(2).standard_normal((1, DIM)))[0]
    monkeypatch.setattr(oc, "EXACT_ALLOWED_ROWS", 0)
    snap = idx.snapshot
    ids = {int(i) for i in snap.ids[:20]}
    kept = np.isin(snap.ids, list(ids))
    got = set(snap.ids[oc.candidate_positions(snap, vector, 6, kept)].tolist())
    assert got <= ids and 6 <= len(got) <= 12
    # an HNSW graph of 60 points searched with efSearch >= 128 is exhaustive: the exact filtered top 6
    assert got == _exact_stage(idx, vector, 6, ids)
    assert set(snap.ids[oc.candidate_positions(snap, vector, 30, kept)].tolist()) == ids  # fewer allowed than 30
    idx.close()


def test_candidates_option_checks(index):
    for bad in (-1, 1.5, "many"):
        with pytest.raises(ValueError, match="candidates"):
            index.search(image="unused.jpg", mode="objects-max", candidates=bad)
    with pytest.raises(ValueError, match="objects-max only"):
        index.search(image="unused.jpg", mode="objects", candidates=5)


def test_real_index_top_hits_agree_with_the_full_scan(tmp_path, photos_dir):
    """Six real photos with region proposals: each photo as the query, a stage of at most 2 + 2 of the 6 images."""
    idx = Index.create(tmp_path / "real", objects=ObjectConfig(max_objects=4))
    assert idx.add([photos_dir]).indexed == 6
    agree = []
    for photo in sorted(photos_dir.iterdir()):
        full = idx.search(image=photo, k=2, mode="objects-max", candidates=0)
        staged = idx.search(image=photo, k=2, mode="objects-max", candidates=2)
        assert 2 <= staged.stats.candidates_per_level[0] <= 4 and staged.stats.sim_ops < full.stats.sim_ops
        scores = {h.id: h.score for h in idx.search(image=photo, k=6, mode="objects-max", candidates=0)}
        for h in staged:  # a staged hit scores exactly as in the full scan
            assert h.score == pytest.approx(scores[h.id], abs=1e-5)
        assert staged[0].id == full[0].id  # the photo itself comes first either way
        agree.append(len({h.id for h in staged} & {h.id for h in full}) / 2)
    assert np.mean(agree) >= 0.6  # 0.667 measured: a stage of 2 + 2 of 6 photos keeps most of the top 2
    idx.close()
