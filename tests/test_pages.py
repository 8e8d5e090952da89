"""Memory-mapped index files: read like np.load, and their resident pages unmapped past a budget."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from random_index_helpers import random_segmented_index

from finegrain.store import pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or pages.resident_file_bytes() is None,
                                reason="the resident-page accounting is read from Linux's /proc/self/statm")


def test_a_mapped_file_reads_like_np_load(tmp_path):
    for arr in (np.arange(12, dtype=np.int8).reshape(3, 4), np.asfortranarray(np.ones((5, 2), np.float16)),
                np.zeros((0, 7), np.float32), np.arange(6, dtype=np.int64)):
        path = tmp_path / "a.npy"
        np.save(path, arr)
        got = pages.map_npy(path)
        assert got.shape == arr.shape and got.dtype == arr.dtype and np.array_equal(got, arr)
        assert not got.flags.writeable


def test_bad_files_are_refused_with_a_reason(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        pages.map_npy(path)
    path = tmp_path / "short.npy"
    np.save(path, np.ones((100, 8), np.float32))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        pages.map_npy(path)
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError):
        pages.map_npy(path)


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(pages.ENV, raising=False)
    assert pages.budget_bytes() is None and pages.DEFAULT_BUDGET_MB is None  # no bound unless asked
    monkeypatch.setenv(pages.ENV, "64")
    assert pages.budget_bytes() == 64 << 20
    monkeypatch.setenv(pages.ENV, "off")
    assert pages.budget_bytes() is None
    for bad in ("-1", "lots"):
        monkeypatch.setenv(pages.ENV, bad)
        with pytest.raises(ValueError, match=pages.ENV):
            pages.budget_bytes()


@linux_only
def test_pages_read_past_the_budget_leave_the_resident_set(tmp_path, monkeypatch):
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).integers(-100, 100, 64 << 20, dtype=np.int8).reshape(-1, 64))
    arr = pages.map_npy(path)
    monkeypatch.setenv(pages.ENV, "off")
    assert not pages.trim()  # off: nothing is ever released
    before = pages.resident_file_bytes()
    total = int(arr[::64].astype(np.int64).sum())  # one row every 4 KiB: every page of the file faulted in
    grown = pages.resident_file_bytes() - before
    assert grown > 48 << 20
    assert not pages.trim()  # "off": the pages stay
    monkeypatch.setenv(pages.ENV, "16")
    assert pages.trim()
    assert pages.resident_file_bytes() - before < 8 << 20
    assert int(arr[::64].astype(np.int64).sum()) == total  # read again from the page cache, unchanged
    assert pages.trim()  # mapped again past the budget: released again
    assert not pages.trim()  # nothing read since: under budget


@linux_only
def test_searches_that_release_pages_every_time_answer_the_same(tmp_path, monkeypatch):
    idx = random_segmented_index(tmp_path / "idx", 60, seed=3)
    try:
        monkeypatch.setenv(pages.ENV, "off")
        want = [(h.id, h.score) for h in idx.search(text="a red bicycle by a wall", k=10, mode="exhaustive")]
        monkeypatch.setenv(pages.ENV, "0")  # every search that mapped anything releases
        for _ in range(3):
            got = [(h.id, h.score) for h in idx.search(text="a red bicycle by a wall", k=10, mode="exhaustive")]
            assert got == want
    finally:
        idx.close()


@linux_only
def test_freed_heap_goes_back_to_the_system():
    """Freed small arrays below the heap's top stay in glibc's heap until ``malloc_trim``: RSS falls after it."""
    import ctypes.util

    if "libc" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("not glibc")

    def anon_mb() -> float:
        text = open("/proc/self/status").read()
        return int(text.split("RssAnon:")[1].split()[0]) / 1024

    pages.release_free_heap()
    blocks = [np.ones(64 * 1024 // 8) for _ in range(2000)]  # 125 MiB of 64 KiB arrays: on the heap, not mmapped
    del blocks[:-1]  # all but the last, which keeps the heap's top where it was: nothing shrinks by itself
    before = anon_mb()
    assert pages.release_free_heap()
    assert anon_mb() < before - 50


@linux_only
def test_release_array_gives_back_one_mapping_only(tmp_path):
    path = tmp_path / "part.npy"
    np.save(path, np.random.default_rng(1).integers(-100, 100, 32 << 20, dtype=np.int8).reshape(-1, 64))
    arr = pages.map_npy(path)
    before = pages.resident_file_bytes()
    total = int(arr[::64].astype(np.int64).sum())
    assert pages.resident_file_bytes() - before > 24 << 20
    assert pages.release_array(arr[10:20])  # a view finds its mapping
    assert pages.resident_file_bytes() - before < 4 << 20
    assert int(arr[::64].astype(np.int64).sum()) == total  # still readable, unchanged
    assert not pages.release_array(np.zeros(4))  # an array in memory: nothing to give back
