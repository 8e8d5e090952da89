"""The snapshot's column-wise record table: the same answers as the dict of records it replaced, in less memory."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from finegrain.store.catalog import Catalog, NewImage
from finegrain.store.records import ImageRecord, RecordTable


def _rows(n: int, start: int = 1) -> list[tuple]:
    rows = []
    for i in range(start, start + n):
        missing = i % 7 == 0  # an older index, or a Ray manifest without sizes: NULL columns
        rows.append((i * 3, f"/photos/ümlaut-{i}/日本-{i}.jpg" if i % 2 else f"/p/{i}.png",
                     None if i % 11 == 0 else hashlib.sha256(str(i).encode()).hexdigest(),
                     None if missing else 1000 + i, None if missing else i * 10**15, 640 + i % 5,
                     None if missing else 480))
    return rows


def test_the_table_answers_like_a_dict_of_records():
    rows = _rows(300)
    table = RecordTable.from_rows(iter(rows))
    expected = {r[0]: ImageRecord(*r, status="indexed", error=None) for r in rows}
    assert len(table) == len(expected) and list(table) == list(expected)
    assert dict(table.items()) == expected and list(table.values()) == list(expected.values())
    assert np.array_equal(table.ids, np.array(sorted(expected), np.int64))
    for image_id in (3, 21, 33, 900):
        assert table[image_id] == expected[image_id] and table.get(image_id) == expected[image_id]
    for absent in (0, 1, 4, 901, -3, 2**70, -(2**70), "3", 3.0, True, None):
        assert absent not in table and table.get(absent) is None
        with pytest.raises(KeyError):
            table[absent]
    assert table[np.int64(6)] == expected[6]
    assert table.paths([2, 0]) == [rows[2][1], rows[0][1]]
    assert table.column("width").tolist() == [r[5] for r in rows]
    known = table.known("size")
    assert known.tolist() == [r[3] is not None for r in rows]
    assert table.column("size", fill=-1).tolist() == [-1 if r[3] is None else r[3] for r in rows]
    with pytest.raises(KeyError, match="no integer column"):
        table.column("path")
    assert table.texts("sha256") == [r[2] for r in rows] and table.texts("path", [1]) == [rows[1][1]]
    with pytest.raises(KeyError, match="no text column"):
        table.texts("size")
    with pytest.raises(ValueError):  # shared as the snapshot's ids: lookups need it sorted
        table.ids[0] = 10**6


def test_batches_join_up_and_order_is_checked(monkeypatch):
    from finegrain.store import records

    monkeypatch.setattr(records, "_BATCH", 7)  # many batches, a short last one
    rows = _rows(50)
    table = RecordTable.from_rows(rows)
    assert [table[r[0]] for r in rows] == [ImageRecord(*r, status="indexed", error=None) for r in rows]
    assert len(RecordTable.from_rows([])) == 0 and RecordTable.from_rows([]).paths() == []
    with pytest.raises(ValueError, match="ascending id order"):
        RecordTable.from_rows(rows[::-1])
    with pytest.raises(ValueError, match="ascending id order"):
        RecordTable.from_rows(rows[:3] + rows[2:3])
    for damaged in [(1, "/a", 5, 1, 1, 1, 1), (1, b"/a", "x", 1, 1, 1, 1), (1, "/a", "x", "big", 1, 1, 1),
                    (1, "/a", "x", 2**70, 1, 1, 1), (1, "/a", "x", 1, 1)]:  # what Index.open reports as damage
        with pytest.raises(ValueError):
            RecordTable.from_rows([damaged])


def test_a_catalog_reads_its_indexed_images_into_a_table(tmp_path):
    with Catalog(tmp_path, create=True) as catalog:
        with catalog.transaction() as tx:
            ids = catalog.reserve_ids(3)
            tx.add_images(ids, [NewImage(f"/x/{i}.jpg", f"{i:064x}", i, i, 10, 20) for i in range(3)])
            tx.add_failure("/x/broken.jpg", "cannot identify image file")
        with catalog.transaction() as tx:
            tx.remove([ids[1]])
        table = catalog.indexed_records()
        assert list(table) == [ids[0], ids[2]]
        assert [table[i] for i in table] == catalog.images("indexed")


def test_a_large_table_costs_a_fraction_of_the_records_it_replaces():
    n = 20_000
    table = RecordTable.from_rows((i, f"/synthetic/1000000/{i:07d}.jpg", hashlib.sha256(str(i).encode()).hexdigest(),
                                   0, 0, 224, 224) for i in range(1, n + 1))
    # ids 8 + path 30 + 8 + sha 64 + 8 + four ints 32: 150 bytes an image (the records were ~600).
    assert table.nbytes() / n <= 160
    assert table[n].path == f"/synthetic/1000000/{n:07d}.jpg"


@pytest.mark.parametrize("collide", [False, True])
def test_live_by_path_answers_like_the_dict_it_replaced(monkeypatch, collide):
    """What an indexing run compares files against: indexed rows found by a hash of the path, failed rows by
    a dict; with every path hashing into three buckets, lookups still find exactly the right row."""
    import finegrain.store.records as records

    if collide:
        monkeypatch.setattr(records, "hash", lambda text: len(text) % 3, raising=False)
    rows = _rows(200)
    failed = {p: ImageRecord(9000 + i, p, None, None, None, None, None, "failed", "cannot decode")
              for i, p in enumerate(["/bad/1.jpg", "/bad/日本.png"])}
    live = records.LiveByPath(RecordTable.from_rows(iter(rows)), failed)
    expected = {r[1]: ImageRecord(*r, status="indexed", error=None) for r in rows} | failed
    assert len(live) == len(expected) and list(live) == list(expected)
    assert dict(live.items()) == expected
    for path, rec in expected.items():
        assert live[path] == rec and live.get(path) == rec and path in live
    for absent in ("/p/2.pngx", "/nowhere.jpg", "", 3, None):
        assert absent not in live and live.get(absent) is None
    queries = [rows[5][1], "/bad/1.jpg", "/nowhere.jpg", rows[0][1], rows[199][1], "/p/9999.png"]
    assert live.indexed_rows(queries).tolist() == [5, -1, -1, 0, 199, -1]
    sizes, mtimes, known = live.stat_columns()
    assert known.tolist() == [r[3] is not None and r[4] is not None for r in rows]
    assert sizes[1] == rows[1][3] and mtimes[1] == rows[1][4]


def test_catalog_live_by_path_holds_indexed_and_failed_rows_only(tmp_path):
    with Catalog(tmp_path, create=True) as catalog:
        with catalog.transaction() as tx:
            ids = catalog.reserve_ids(3)
            tx.add_images(ids, [NewImage(f"/a/{i}.jpg", f"{i:064x}", 10 + i, 100 + i, 4, 3) for i in range(3)])
            tx.remove([ids[1]])
            tx.add_failure("/a/bad.jpg", "cannot decode image", 5, 6)
        live = catalog.live_by_path()
        assert sorted(live) == ["/a/0.jpg", "/a/2.jpg", "/a/bad.jpg"]
        assert live["/a/2.jpg"].id == ids[2] and live["/a/bad.jpg"].status == "failed"
        assert live.indexed_rows(["/a/1.jpg", "/a/2.jpg", "/a/bad.jpg"]).tolist() == [-1, 1, -1]


def test_writer_move_onto_an_indexed_path_removes_the_image_there(tmp_path):
    """A file renamed over another indexed file: the one at the new path is removed, the moved one keeps its id."""
    from random_index_helpers import random_segmented_index

    from finegrain import Index

    random_segmented_index(tmp_path / "idx", 5, seed=1).close()
    index = Index.open(tmp_path / "idx")
    (a, rec_a), (b, rec_b) = list(index.records.items())[:2]
    with index.writer() as w:
        with pytest.raises(KeyError, match="unknown image ids"):
            w.move([(10**6, "/elsewhere.jpg", 1)])
        assert w.move([(a, rec_b.path, 123)]) == 1
    assert b not in index.records and index.records[a].path == rec_b.path and index.records[a].mtime_ns == 123
    assert len(index.records) == 4
    index.close()
