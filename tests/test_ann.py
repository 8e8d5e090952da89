"""FAISS wrapper: exact by default, HNSW/IVF agree with exact search on clustered data."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.store.ann import VectorIndex


def _data(n=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, d))
    x = centers[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, 20)] + 0.05 * rng.normal(size=(20, d))
    return x.astype(np.float32), q.astype(np.float32)


def test_flat_is_exact_and_auto_small_is_flat():
    x, q = _data()
    idx = VectorIndex(x)
    assert idx.kind == "flat"
    scores, rows = idx.search(q, 5)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :5]
    np.testing.assert_array_equal(rows, exact)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, exact, 1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_kinds_recall_and_cache(kind, tmp_path):
    x, q = _data()
    cache = tmp_path / f"{kind}.faiss"
    idx = VectorIndex(x, kind, cache)
    _, rows = idx.search(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall >= 0.9, recall
    assert cache.exists()
    again = VectorIndex(x, kind, cache)  # read back from the cache file
    np.testing.assert_array_equal(again.search(q, 10)[1], rows)


def test_bad_arguments():
    x, q = _data(100)
    with pytest.raises(ValueError, match="unknown index kind"):
        VectorIndex(x, "lsh")
    idx = VectorIndex(x)
    with pytest.raises(ValueError, match="dimension"):
        idx.search(q[:, :5], 3)
    with pytest.raises(ValueError, match="positive"):
        idx.search(q, 0)
    empty = VectorIndex(np.zeros((0, 8), np.float32))
    scores, rows = empty.search(np.ones((1, 8), np.float32), 3)
    assert (rows == -1).all()
