"""Per-search breadth of the global ANN structures: HNSW efSearch and IVF nprobe for one call only."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain import Index
from finegrain.store.ann import VectorIndex


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5000, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = rows[rng.choice(len(rows), 40, replace=False)] + 0.3 * rng.standard_normal((40, 32)).astype(np.float32)
    exact = np.argsort(-(queries @ rows.T), axis=1, kind="stable")[:, :10]
    return rows, queries.astype(np.float32), exact


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist())]))


def test_ivf_breadth_is_lists_probed(data):
    rows, queries, exact = data
    ivf = VectorIndex(rows, kind="ivf")
    built = ivf.faiss.nprobe
    narrow = _recall(ivf.search(queries, 10, breadth=1)[1], exact)
    every = _recall(ivf.search(queries, 10, breadth=ivf.faiss.nlist)[1], exact)
    assert every == 1.0 and narrow < 0.9  # every list probed is exact; one list of 128 misses most
    assert _recall(ivf.search(queries, 10, breadth=10**6)[1], exact) == 1.0  # capped at the number of lists
    assert ivf.faiss.nprobe == built  # the call's own setting, not the structure's


def test_hnsw_breadth_is_ef_search(data):
    rows, queries, exact = data
    hnsw = VectorIndex(rows, kind="hnsw")
    built = hnsw.faiss.hnsw.efSearch
    narrow = _recall(hnsw.search(queries, 10, breadth=10)[1], exact)
    wide = _recall(hnsw.search(queries, 10, breadth=len(rows))[1], exact)
    assert wide >= 0.99 and wide >= narrow
    assert hnsw.faiss.hnsw.efSearch == built
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="breadth"):
            hnsw.search(queries, 10, breadth=bad)


def test_global_search_takes_breadth(tmp_path, photos_dir):
    index = Index.create(tmp_path / "index")
    index.add([photos_dir])
    plain = [(h.id, round(h.score, 6)) for h in index.search(text="a cat", k=3, mode="global")]
    flat = [(h.id, round(h.score, 6)) for h in index.search(text="a cat", k=3, mode="global", breadth=4)]
    assert flat == plain  # an exact index ignores it
    with pytest.raises(ValueError, match="breadth"):
        index.search(text="a cat", k=3, mode="global", breadth=0)
    index.close()
