"""A field gathered from several chunks: memory-mapped from a cache file when large, in memory otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from random_index_helpers import unit

from finegrain.index import Index
from finegrain.retrieval.dense import search_vectors
from finegrain.store import snapshot as snapshot_mod
from finegrain.store.catalog import NewImage
from finegrain.store.pages import is_mapped
from finegrain.store.vectors import FieldRows


def _three_commits(path, rng):
    idx = Index.create(path)
    d = idx.encoder.dim
    vecs = unit(rng.standard_normal((30, d)))
    for c in range(3):
        ids = range(c * 10, c * 10 + 10)
        with idx.writer() as w:
            w.commit([NewImage(f"/g/{i}.jpg", f"{i:064x}", 1, 1, 8, 8) for i in ids],
                     {"global": FieldRows(vecs[c * 10:c * 10 + 10], np.arange(10))}, [], [], [])
    idx.refresh()
    return idx, vecs


def test_large_gathered_field_is_mapped_from_a_cache_file_and_searches_the_same(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    idx, vecs = _three_commits(tmp_path / "in-memory", rng)
    want = search_vectors(idx.snapshot, vecs[3:4], 5)[1]
    assert not is_mapped(idx.snapshot.global_rows.vectors)  # small: gathered in memory
    idx.close()

    monkeypatch.setattr(snapshot_mod, "MAPPED_GATHER_BYTES", 0)  # every gathered field counts as large
    idx, _ = _three_commits(tmp_path / "mapped", np.random.default_rng(0))
    rows = idx.snapshot.global_rows
    assert is_mapped(rows.vectors)
    np.testing.assert_array_equal(np.asarray(rows.vectors), vecs)
    cache = idx.snapshot.cache_file("rows-global", ".npy")
    assert cache.exists()
    np.testing.assert_array_equal(search_vectors(idx.snapshot, vecs[3:4], 5)[1], want)
    idx.close()

    # a damaged cache file (wrong shape) is rewritten, not trusted
    np.save(cache, np.zeros((2, 2), np.float32))
    idx = Index.open(tmp_path / "mapped")
    np.testing.assert_array_equal(np.asarray(idx.snapshot.global_rows.vectors), vecs)
    idx.close()


def test_gathered_field_falls_back_to_memory_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot_mod, "MAPPED_GATHER_BYTES", 0)
    idx, vecs = _three_commits(tmp_path / "idx", np.random.default_rng(1))
    idx.close()
    (tmp_path / "idx" / "ann").mkdir(exist_ok=True)

    def refuse(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot_mod.Path, "replace", lambda *_a, **_k: refuse())
    idx = Index.open(tmp_path / "idx")
    rows = idx.snapshot.global_rows
    assert not is_mapped(rows.vectors)
    np.testing.assert_array_equal(rows.vectors, vecs)
    assert not [p for p in (tmp_path / "idx" / "ann").iterdir()]  # no file left half-written
    idx.close()


def test_the_next_writer_sweeps_the_old_gathered_file(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot_mod, "MAPPED_GATHER_BYTES", 0)
    idx, _ = _three_commits(tmp_path / "idx", np.random.default_rng(2))
    old = idx.snapshot.cache_file("rows-global", ".npy")
    _ = idx.snapshot.global_rows
    assert old.exists()
    idx.remove([int(idx.snapshot.ids[0])])
    idx.refresh()
    assert len(idx.snapshot.global_rows) == 29
    new = idx.snapshot.cache_file("rows-global", ".npy")
    assert new != old and new.exists()
    with idx.writer():  # the next writer sweeps caches of older rows, as it does the ANN caches
        pass
    assert not old.exists() and new.exists()
    idx.close()


def test_a_writer_that_committed_sweeps_the_old_gathered_file_when_it_closes(tmp_path, monkeypatch):
    """A commit that drops rows (``compress --drop-originals``, a removal) frees their gathered copy at once,
    not at some later write; a reader that still maps the old file keeps reading it (unlinked, not unmapped)."""
    monkeypatch.setattr(snapshot_mod, "MAPPED_GATHER_BYTES", 0)
    idx, vecs = _three_commits(tmp_path / "idx", np.random.default_rng(3))
    held = idx.snapshot.global_rows.vectors  # mapped from the old generation's file
    old = idx.snapshot.cache_file("rows-global", ".npy")
    assert old.exists()
    idx.remove([int(idx.snapshot.ids[0])])
    assert not old.exists()
    np.testing.assert_array_equal(np.asarray(held), vecs)
    idx.close()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])


@pytest.mark.parametrize("threshold", [0, snapshot_mod.MAPPED_GATHER_BYTES])
def test_a_field_with_no_chunks_reads_as_empty(tmp_path, monkeypatch, threshold):
    """A new or emptied index has no chunks: its rows are empty, whatever the cache threshold (was IndexError)."""
    monkeypatch.setattr(snapshot_mod, "MAPPED_GATHER_BYTES", threshold)
    idx = Index.create(tmp_path / "empty")
    rows = idx.snapshot.global_rows
    assert rows.vectors.shape == (0, idx.encoder.dim) and len(rows.owners) == 0
    idx.close()


def test_gathered_field_never_takes_more_than_half_the_free_disk(tmp_path, monkeypatch):
    """A derived cache must not fill the disk the index's commits need: too little room -> gathered in memory."""
    import collections

    from finegrain.store import ann

    monkeypatch.setattr(snapshot_mod, "MAPPED_GATHER_BYTES", 0)
    idx, vecs = _three_commits(tmp_path / "idx", np.random.default_rng(2))
    idx.close()
    usage = collections.namedtuple("usage", "total used free")
    need = vecs.nbytes
    monkeypatch.setattr(ann.shutil, "disk_usage", lambda _p: usage(10 * need, 8 * need, 2 * need - 1))
    idx = Index.open(tmp_path / "idx")
    rows = idx.snapshot.global_rows
    assert not is_mapped(rows.vectors) and not idx.snapshot.cache_file("rows-global", ".npy").exists()
    np.testing.assert_array_equal(rows.vectors, vecs)
    idx.close()
    monkeypatch.setattr(ann.shutil, "disk_usage", lambda _p: usage(10 * need, 8 * need, 2 * need))  # just enough
    idx = Index.open(tmp_path / "idx")
    assert is_mapped(idx.snapshot.global_rows.vectors)
    idx.close()
