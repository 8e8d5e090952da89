"""Tiered compaction: `Index.add` merges the smallest chunks when commits pile up, never the whole index."""

from __future__ import annotations

import numpy as np

from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index
from finegrain.store import integrity
from finegrain.store.catalog import NewImage
from finegrain.store.vectors import FieldRows


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _commit(idx: Index, rng, start: int, n: int) -> None:
    d, per = idx.encoder.dim, 5
    images = [NewImage(f"/m/{i}.jpg", f"{i:064x}", 1, 1, 32, 32) for i in range(start, start + n)]
    segs = FieldRows(_unit(rng.standard_normal((n * per, d))), np.repeat(np.arange(n), per),
                     {"level": np.tile(np.array([0, 1, 1, 1, 1]), n), "box": np.zeros((n * per, 4), np.float32),
                      "area": np.full(n * per, 0.25, np.float32)})
    with idx.writer() as w:
        w.commit(images, {"global": FieldRows(_unit(rng.standard_normal((n, d))), np.arange(n)), "segments": segs},
                 [], [], [])


def _answers(idx: Index) -> dict:
    """Every mode's top 8 (ids, scores) for two text queries: what a compaction must not change."""
    queries = ["a dog on a red sofa", "two children play in the water"]
    return {(q, m): [(h.id, round(h.score, 5)) for h in idx.search(text=q, k=8, mode=m)]
            for q in queries for m in ("global", "exhaustive", "hierarchical")}


def test_merging_the_small_chunks_keeps_every_answer(tmp_path):
    idx = Index.create(tmp_path / "idx", segments=SegmentConfig(levels=(4,)))
    rng = np.random.default_rng(3)
    _commit(idx, rng, 0, 40)  # one big chunk, then ten small commits
    for c in range(10):
        _commit(idx, rng, 40 + 3 * c, 3)
    idx.refresh()
    idx.remove([1, 41, 50])  # rows of removed images sit in the big chunk and in small ones
    idx.refresh()
    before = _answers(idx)
    big = max(idx.catalog.chunks("global"), key=lambda c: c[2])
    with idx.writer() as w:
        merged_away = w.merge_small(keep=4)
    assert merged_away == 2 * 7  # per field (global, segments): 11 chunks -> 4
    for field in ("global", "segments"):
        chunks = idx.catalog.chunks(field)
        assert len(chunks) == 4
    assert big in idx.catalog.chunks("global")  # the big chunk was not rewritten
    idx.refresh()
    after = _answers(idx)
    assert after == before
    assert idx.info()["removed_pending_compaction"] == 3  # purged by a full compaction only
    report = integrity.check_index(tmp_path / "idx")
    assert not report.problems and report.chunks == 8 and not report.unverified
    on_disk = {p.name.split(".")[0] for p in (tmp_path / "idx" / "vectors").rglob("*.npy")}
    assert on_disk == {name for name, _, _ in idx.catalog.chunks()}  # the merged chunks' files are gone
    idx.compact()
    assert len(idx.catalog.chunks("global")) == 1 and idx.info()["removed_pending_compaction"] == 0
    idx.close()


def test_nothing_to_merge_below_the_limit(tmp_path):
    idx = Index.create(tmp_path / "idx", segments=SegmentConfig(levels=(4,)))
    rng = np.random.default_rng(4)
    for c in range(3):
        _commit(idx, rng, 3 * c, 3)
    chunks = idx.catalog.chunks()
    with idx.writer() as w:
        assert w.merge_small(keep=4) == 0
    assert idx.catalog.chunks() == chunks
    idx.close()


def test_a_full_compaction_writes_pieces_of_bounded_size(tmp_path):
    """`compact` holds one piece of a field in memory at a time: a small budget gives several chunks, same answers."""
    idx = Index.create(tmp_path / "idx", segments=SegmentConfig(levels=(4,)))
    rng = np.random.default_rng(5)
    for c in range(6):
        _commit(idx, rng, 10 * c, 10)
    idx.refresh()
    idx.remove([3, 27])
    idx.refresh()
    before = _answers(idx)
    d = idx.encoder.dim
    with idx.writer() as w:
        w.compact(chunk_bytes=25 * d * 4)  # about 25 global rows, 25 segment rows per piece
    idx.refresh()
    global_chunks = idx.catalog.chunks("global")
    assert sorted(c[2] for c in global_chunks) == [19, 19, 20]  # 9+10 | 9+10 | 10+10 rows: none over 25
    # 50 segment rows per source chunk, over the budget: each makes a piece alone (removed rows dropped)
    assert sorted(c[2] for c in idx.catalog.chunks("segments")) == [45, 45, 50, 50, 50, 50]
    assert idx.info()["removed_pending_compaction"] == 0
    after = _answers(idx)
    assert after == before
    report = integrity.check_index(tmp_path / "idx")
    assert not report.problems and not report.unverified
    idx.close()


def test_merges_go_in_groups_of_bounded_size(tmp_path):
    """No merge group holds more than ``chunk_bytes`` of vectors: a merge's memory does not grow with the index."""
    idx = Index.create(tmp_path / "idx", segments=SegmentConfig(levels=(4,)))
    rng = np.random.default_rng(6)
    for c in range(12):
        _commit(idx, rng, 4 * c, 4)  # 12 chunks per field: 4 global rows, 20 segment rows each
    idx.refresh()
    before = _answers(idx)
    d = idx.encoder.dim
    with idx.writer() as w:
        w.merge_small(keep=2, chunk_bytes=40 * d * 4)  # 40 rows per group at most
    idx.refresh()
    assert sorted(c[2] for c in idx.catalog.chunks("global")) == [8, 40]  # 10 chunks fit one group, the other 2 stay
    # segments: 20 rows per chunk, two per group; groups of merged chunks are over the budget, so it stops
    segment_rows = sorted(c[2] for c in idx.catalog.chunks("segments"))
    assert segment_rows == [40] * 6 and sum(segment_rows) == 240
    assert _answers(idx) == before
    report = integrity.check_index(tmp_path / "idx")
    assert not report.problems and not report.unverified
    idx.close()
