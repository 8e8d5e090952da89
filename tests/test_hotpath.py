"""The multi-vector query path's overheads (issue 15, "Scale"): same results, less work around the scoring.

- the segment table gathers a candidate set's rows from every chunk into one array and scores it once;
- the exact candidate stage scores every query vector in one pass over the global rows;
- above the flat threshold (or with ``ann="hnsw"``) the stage uses the index's HNSW structure;
- the scoring kernel never runs torch on the caller's thread.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from random_index_helpers import unit

from finegrain.compress.storage import Codec, dot_rows
from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index
from finegrain.retrieval import Query, dense
from finegrain.retrieval import multivector as mvr
from finegrain.search import multivector as mv
from finegrain.store.catalog import NewImage
from finegrain.store.vectors import FieldRows

LEVELS = (4, 9)  # levels 0 (whole image), 1 and 2


def _image_rows(rng, n_images, first, dim):
    """Segments of images ``first ..``: level 0 one row, levels 1-2 one to four rows (level 1 missing for some)."""
    owners, levels = [], []
    for i in range(first, first + n_images):
        for level in range(3):
            if level == 1 and i % 7 == 0:
                continue
            count = 1 if level == 0 else int(rng.integers(1, 5))
            owners += [i - first] * count
            levels += [level] * count
    n = len(owners)
    return FieldRows(unit(rng.standard_normal((n, dim))), np.array(owners, np.int64),
                     {"level": np.array(levels, np.int16), "box": np.zeros((n, 4), np.float32),
                      "area": np.full(n, 0.25, np.float32)})


def _build(path, batches, seed=0, ann="auto", dim=None):
    """An index whose images arrive in ``batches`` commits (one chunk per field each), random unit vectors."""
    idx = Index.create(path, ann=ann, segments=SegmentConfig(levels=LEVELS))
    dim = dim or idx.encoder.dim
    rng = np.random.default_rng(seed)
    total = sum(batches)
    glob, segs = unit(rng.standard_normal((total, dim))), _image_rows(rng, total, 0, dim)  # the same data
    first = 0                                                                               # however committed
    with idx.writer() as w:
        for n in batches:
            images = [NewImage(f"/r/{i}.jpg", f"{i:064x}", 1, 1, 32, 32) for i in range(first, first + n)]
            mine = segs.select((segs.owners >= first) & (segs.owners < first + n))
            mine = FieldRows(mine.vectors, mine.owners - first, mine.attrs)  # commit owners count from 0
            w.commit(images, {"global": FieldRows(glob[first:first + n], np.arange(n)), "segments": mine},
                     [], [], [])
            first += n
    idx.refresh()
    return idx


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """The same 150 images twice: committed in 6 chunks, and in one."""
    root = tmp_path_factory.mktemp("hot")
    many = _build(root / "many", [25] * 6)
    one = _build(root / "one", [150])
    yield many, one
    many.close()
    one.close()


def _merged(table_parts, ids, n_levels, codec):
    """The same rows as one chunk (the single-piece table the chunked one must agree with)."""
    dim = table_parts[0].vectors.shape[1]
    return mv.SegmentTable(FieldRows.concat(table_parts, dim), ids, n_levels, codec)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_chunked_table_scores_like_one_table(dtype):
    rng = np.random.default_rng(3)
    dim, n_levels = 8, 3
    parts, owners0 = [], 0
    for n in (9, 1, 14, 6):  # uneven chunks, one of a single image
        rows = _image_rows(rng, n, owners0, dim)
        rows = FieldRows(rows.vectors, rows.owners + owners0, rows.attrs)
        parts.append(rows)
        owners0 += n
    codec = Codec()
    if dtype == "int8":
        codec = Codec(scale=np.full(dim, 0.01, np.float32), offset=np.linspace(-0.1, 0.1, dim).astype(np.float32),
                      dtype="int8")
        parts = [FieldRows(np.clip(np.rint(p.vectors * 100), -127, 127).astype(np.int8), p.owners, p.attrs)
                 for p in parts]
    ids = np.arange(owners0)
    table = mv.SegmentTable(parts, ids, n_levels, codec)
    assert len(table.pieces) == 4
    one = _merged(parts, ids, n_levels, codec)
    assert len(one.pieces) == 1
    queries = unit(rng.standard_normal((3, dim)))
    for level in range(n_levels):
        for cand in (None, np.array([0, 8, 9, 10, 23, 29]), np.array([9]), np.array([7, 14]), np.zeros(0, int)):
            got, ops = table.level_max(level, queries, cand)
            want, want_ops = one.level_max(level, queries, cand)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert np.array_equal(np.isinf(got), np.isinf(want)) and ops == want_ops
    glob = unit(rng.standard_normal((len(ids), dim)))
    for mode in ("single", "exhaustive", "hierarchical"):
        for cand in (None, np.array([1, 2, 3, 9, 10, 17, 20, 22, 25, 28, 29])):
            a = mv.search(mode, table, glob, queries, 5, mv.MultiVectorConfig(), cand)
            b = mv.search(mode, one, glob, queries, 5, mv.MultiVectorConfig(), cand)
            assert np.array_equal(a[1], b[1])
            np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


@pytest.mark.parametrize("mode", ["exhaustive", "hierarchical", "single"])
@pytest.mark.parametrize("candidates", [0, 12])
def test_an_index_in_many_chunks_ranks_like_one_in_a_single_chunk(chunked, mode, candidates):
    many, one = chunked
    assert len(mvr.segment_table(many.snapshot).pieces) == 6 and len(mvr.segment_table(one.snapshot).pieces) == 1
    for text in ("a dog on a red sofa next to a window", "two children play in the water"):
        a = many.search(text=text, k=10, mode=mode, candidates=candidates)
        b = one.search(text=text, k=10, mode=mode, candidates=candidates)
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-6)
        assert a.stats.sim_ops == b.stats.sim_ops


def _faiss_stage(snap, queries, n, allowed=None):
    """The candidate stage as it was: FAISS top-n of each query vector (search_vectors), united."""
    _, ids = dense.search_vectors(snap, queries, n, allowed=allowed)
    return np.sort(snap.positions(np.unique(ids[ids >= 0])))


def _spy_on_faiss(monkeypatch):
    """Record (kind, number of query vectors, k) of every FAISS top-k search of a VectorIndex."""
    from finegrain.store.ann import VectorIndex

    calls = []
    search = VectorIndex.search

    def spy(self, queries, k, breadth=None):
        calls.append((self.kind, len(np.atleast_2d(queries)), k))
        return search(self, queries, k, breadth)

    monkeypatch.setattr(VectorIndex, "search", spy)
    return calls


def test_the_exact_stage_is_faiss_flat_top_n_united(chunked, monkeypatch):
    many, _ = chunked
    snap = many.snapshot
    rng = np.random.default_rng(5)
    queries = unit(rng.standard_normal((5, many.encoder.dim)))
    calls = _spy_on_faiss(monkeypatch)
    for n in (1, 7, 40, 149, 150, 400):
        got = mvr.candidate_positions(snap, queries, n)
        assert not calls  # flat below the ANN threshold: one pass of our own over the rows, no FAISS search
        assert np.array_equal(got, _faiss_stage(snap, queries, n))
        calls.clear()
    allowed = rng.random(len(snap)) < 0.4
    for n in (3, 20, int(allowed.sum()), 200):
        got = mvr.candidate_positions(snap, queries, n, allowed)
        assert np.array_equal(got, _faiss_stage(snap, queries, n, allowed)) and allowed[got].all()


def test_an_hnsw_index_stage_uses_the_hnsw_structure(tmp_path, monkeypatch):
    """Above 200,000 images global search is HNSW; ``ann="hnsw"`` forces it here, at 1,200 images."""
    idx = _build(tmp_path / "hnsw", [600, 600], seed=1, ann="hnsw")
    try:
        snap = idx.snapshot
        calls = _spy_on_faiss(monkeypatch)
        rng = np.random.default_rng(2)
        queries = unit(rng.standard_normal((4, idx.encoder.dim)))
        got = mvr.candidate_positions(snap, queries, 300)
        assert calls == [("hnsw", 4, 300)]  # one batched search of the HNSW graph, no exact scan
        g = np.asarray(snap.global_rows.vectors)
        exact = np.unique(np.argsort(-(queries @ g.T), axis=1)[:, :300])
        assert len(np.intersect1d(got, exact)) / len(exact) >= 0.95  # 300 > efSearch 128: searched with ef 300
        hits = idx.search(text="a man rides a bike down a hill", k=10, mode="hierarchical", candidates=100)
        assert len(hits) == 10 and "candidates_ms" in hits.timings and calls[-1][0] == "hnsw"
    finally:
        idx.close()


def test_the_scoring_kernel_never_runs_torch_on_the_callers_thread(monkeypatch):
    import torch

    threads = []
    matmul = torch.matmul

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", spy)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    for n in (5, 5_000, 100_000):  # one block, a few blocks (one worker), many blocks (every worker)
        rows = rng.integers(-127, 128, (n, 16), dtype=np.int8)
        np.testing.assert_allclose(dot_rows(rows, q), rows.astype(np.float32) @ q.T, rtol=1e-5, atol=1e-3)
    assert threads and all(name.startswith("finegrain-score") for name in threads), set(threads)


def test_a_staged_text_query_still_uses_every_query_vector(chunked):
    many, _ = chunked
    snap = many.snapshot
    query = Query(text="a dog with a red ball next to a man")
    texts, queries = mvr.query_vectors(snap, query, mvr.MultiVectorParams())
    assert len(queries) == len(texts) > 1
    pool = mvr.candidate_positions(snap, queries, 3)
    for v in queries:  # each vector's own top 3 is in the pool
        assert set(np.argsort(-(np.asarray(snap.global_rows.vectors) @ v))[:3].tolist()) <= set(pool.tolist())


def test_a_query_s_texts_are_encoded_with_torch_on_one_thread(chunked, monkeypatch):
    """Small batches (a query and its sub-queries) go to a one-thread worker; large ones stay where they are."""
    import torch

    enc = chunked[0].encoder
    seen = []
    embed = type(enc)._embed_text_batch

    def spy(self, batch):
        seen.append((threading.current_thread().name, torch.get_num_threads(), len(batch)))
        return embed(self, batch)

    monkeypatch.setattr(type(enc), "_embed_text_batch", spy)
    from finegrain.compress.storage import scoring_workers

    texts = ["a dog with a red ball next to a man", "a dog", "a red ball", "a man"]
    small = enc.encode_texts(texts)
    split = seen[:]
    large = enc.encode_texts(texts * 5)  # 20 texts: more than a query has
    # the query's texts: split over the workers (one run each), torch on one thread in every one
    assert len(split) == min(4, scoring_workers()) and sum(n for _, _, n in split) == 4
    assert all(name.startswith("finegrain-score") and threads == 1 for name, threads, _ in split)
    assert seen[len(split)][0] == threading.current_thread().name and seen[len(split)][2] == 20
    np.testing.assert_allclose(small, large[:4], atol=1e-5)
    one = enc.encode_texts(texts[:1])  # a single text (global search): on a worker too
    assert seen[-1][0].startswith("finegrain-score") and seen[-1][2] == 1
    np.testing.assert_allclose(one, small[:1], atol=1e-5)


def test_hnsw_asked_for_more_than_ef_search_rows_finds_them():
    """FAISS's HNSW explores efSearch (128) candidates whatever k is: on clustered rows (like the synthetic scale
    indexes: noisy copies of a few sources) k=1,000 found 71 % of the true top 1,000 before ef was raised to k."""
    from finegrain.store.ann import VectorIndex

    rng = np.random.default_rng(4)
    centres = unit(rng.standard_normal((200, 64)))
    rows = unit(centres[rng.integers(0, 200, 4000)] + rng.standard_normal((4000, 64)).astype(np.float32) / 16)
    hnsw = VectorIndex(rows, "hnsw")
    queries = unit(rng.standard_normal((6, 64)))
    for k in (50, 1000):
        _, found = hnsw.search(queries, k)
        exact = np.argsort(-(queries @ rows.T), axis=1)[:, :k]
        assert (found >= 0).all()
        recall = np.mean([len(np.intersect1d(f, e)) / k for f, e in zip(found, exact)])
        assert recall >= 0.95, (k, recall)


def test_the_exact_stage_refuses_nan_rows_like_the_faiss_index(tmp_path):
    """A damaged global chunk (NaN) is refused with the index's one-line error, not ranked."""
    from finegrain.store.catalog import IndexFormatError

    idx = _build(tmp_path / "nan", [40], seed=3, dim=None)
    path = idx.path
    idx.close()
    chunk = next(p for p in (path / "vectors" / "global").glob("*.npy") if not p.name.endswith(".owner.npy"))
    rows = np.load(chunk, mmap_mode="r+")
    rows[3] = np.nan
    rows.flush()
    del rows
    idx = Index.open(path)
    try:
        queries = unit(np.random.default_rng(0).standard_normal((2, idx.encoder.dim)))
        with pytest.raises(IndexFormatError, match="NaN or inf"):
            mvr.candidate_positions(idx.snapshot, queries, 5)
    finally:
        idx.close()
