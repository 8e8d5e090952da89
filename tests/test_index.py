"""The on-disk index: add, incremental re-index, search, removal, crash safety, bad files."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain import Index
from finegrain.index import IndexLockedError
from finegrain.store.catalog import IndexFormatError
from finegrain.store.vectors import FieldRows, new_chunk_name, write_chunk


@pytest.fixture()
def collection(tmp_path, photos_dir) -> Path:
    folder = tmp_path / "photos"
    shutil.copytree(photos_dir, folder)
    return folder


@pytest.fixture()
def index(tmp_path, collection) -> Index:
    idx = Index.create(tmp_path / "index")
    idx.add([collection])
    return idx


def test_add_search_info(index, collection):
    assert len(index) == 6
    info = index.info()
    assert info["images"] == 6 and info["failed"] == 0
    assert info["encoder"] == "effnet-minilm" and info["bytes_on_disk"] > 6 * 512 * 4
    hits = index.search(text="a photo", k=4)
    assert len(hits) == 4
    assert [h.rank for h in hits] == [0, 1, 2, 3]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert {h.path for h in hits} <= {str(p) for p in collection.iterdir()}
    # An indexed image as the query finds itself first, with cosine ~1.
    hits = index.search(image=collection / "rocket.jpg", k=2)
    assert Path(hits[0].path).name == "rocket.jpg" and hits[0].score > 0.99


def test_search_vectors_is_faiss_shaped(index):
    q = index.embed_query(text="a cat")
    scores, ids = index.search_vectors(np.stack([q, q]), k=10)  # more than the 6 images
    assert scores.shape == ids.shape == (2, 10) and ids.dtype == np.int64
    assert (ids[:, :6] >= 0).all() and (ids[:, 6:] == -1).all()
    assert set(ids[0, :6]) == set(index.records)


def test_bad_queries_raise_clear_errors(index, tmp_path, collection):
    with pytest.raises(ValueError, match="empty"):
        index.search(text="   ")
    with pytest.raises(ValueError, match="exactly one"):
        index.search()
    with pytest.raises(ValueError, match="k must be"):
        index.search(text="cat", k=0)
    with pytest.raises(ValueError, match="unknown search mode"):
        index.search(text="cat", mode="nope")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    from finegrain.images import ImageLoadError

    with pytest.raises(ImageLoadError):
        index.search(image=bad)
    with pytest.raises(ValueError, match="bbox"):
        index.search(image=collection / "coffee.jpg", bbox=[10, 10, 10, 50])


def test_bbox_query_crops(index, collection):
    full = index.embed_query(image=collection / "chelsea.jpg")
    crop = index.embed_query(image=collection / "chelsea.jpg", bbox=[120, 20, 300, 200])
    assert float(full @ crop) < 0.999


def test_incremental_reindex(index, collection):
    report = index.add([collection])
    assert (report.indexed, report.unchanged) == (0, 6)
    # New mtime, same bytes: recognised by content hash, not re-encoded.
    os.utime(collection / "coffee.jpg", ns=(1, 1))
    report = index.add([collection])
    assert (report.indexed, report.unchanged) == (0, 6)
    # Changed content: the old entry is replaced by a new one.
    old_id = next(r.id for r in index.records.values() if r.path.endswith("coffee.jpg"))
    Image.open(collection / "coffee.jpg").rotate(90).save(collection / "coffee.jpg")
    report = index.add([collection])
    assert report.indexed == 1 and len(index) == 6
    assert old_id not in index.records
    # A new file is added, a deleted one removed on request only.
    Image.open(collection / "rocket.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(collection / "rocket2.jpg")
    (collection / "camera.jpg").unlink()
    report = index.add([collection])
    assert (report.indexed, report.removed, len(index)) == (1, 0, 7)
    report = index.add([collection], remove_missing=True)
    assert (report.removed, len(index)) == (1, 6)
    paths = {Path(r.path).name for r in index.records.values()}
    assert "camera.jpg" not in paths and "rocket2.jpg" in paths


def test_bad_files_are_reported_not_fatal(tmp_path, collection):
    (collection / "empty.jpg").write_bytes(b"")
    data = (collection / "coffee.jpg").read_bytes()
    (collection / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (collection / "notes.png").write_text("this is text, not a picture")
    (collection / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    idx = Index.create(tmp_path / "index")
    report = idx.add([collection])
    reasons = dict(report.failed)
    assert report.indexed == 6 and len(report.failed) == 4
    assert "empty" in reasons[str(collection / "empty.jpg")]
    assert "symlink" in reasons[str(collection / "dangling.jpg")]
    assert "not a recognised image" in reasons[str(collection / "notes.png")]
    assert "truncated" in reasons[str(collection / "truncated.jpg")] or "decode" in reasons[str(collection / "truncated.jpg")]
    info = Index.open(tmp_path / "index").info()
    assert info["failed"] == 4 and {f["path"] for f in info["failures"]} == set(reasons)
    # Fixing a file turns its failure into an indexed image.
    (collection / "empty.jpg").write_bytes(data)
    report = idx.add([collection])
    assert report.indexed == 1 and idx.info()["failed"] == 3


def test_remove_compact_keep_vectors(index):
    before = {i: index.global_rows.vectors[r].copy() for r, i in enumerate(index.global_rows.owners)}
    victim = sorted(index.records)[2]
    index.remove([victim])
    assert victim not in index.records and len(index) == 5
    index.compact()
    reopened = Index.open(index.path)
    assert reopened.info()["chunks"] == 1 and reopened.info()["removed_pending_compaction"] == 0
    for r, i in enumerate(reopened.global_rows.owners):
        np.testing.assert_array_equal(reopened.global_rows.vectors[r], before[int(i)])
    with pytest.raises(KeyError):
        reopened.remove([victim])


def test_orphan_chunk_from_crash_is_ignored_and_swept(index, collection):
    n = len(index)
    # A chunk written but never committed (the process died before the transaction).
    rows = FieldRows(np.ones((3, index.catalog.get_meta("dim")), np.float32), np.array([900, 901, 902]))
    name = new_chunk_name()
    write_chunk(index.path, "global", name, rows)
    reopened = Index.open(index.path)
    assert len(reopened) == n and len(reopened.global_rows) == n
    reopened.add([collection])  # a writer sweeps what no transaction owns
    assert not list((index.path / "vectors" / "global").glob(f"{name}*"))


def test_writer_lock(index, collection):
    other = Index.open(index.path)
    with other.writer():
        with pytest.raises(IndexLockedError):
            index.add([collection])


def test_refresh_sees_other_writers(index, collection, tmp_path):
    reader = Index.open(index.path)
    Image.open(collection / "coins.jpg").rotate(45).save(collection / "coins2.jpg")
    index.add([collection])
    assert len(reader) == 6 and reader.refresh() and len(reader) == 7


def test_open_errors(tmp_path, index):
    with pytest.raises(IndexFormatError, match="no finegrain index"):
        Index.open(tmp_path / "missing")
    db = sqlite3.connect(index.path / "finegrain.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(IndexFormatError, match="newer"):
        Index.open(index.path)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "finegrain.sqlite").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(IndexFormatError):
        Index.open(garbage)
    with pytest.raises(FileExistsError):
        Index.create(index.path)


def test_killed_indexing_run_keeps_committed_work(tmp_path, photos_dir):
    """SIGKILL an indexing process mid-run; the index opens, and a re-run finishes without duplicates."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for src in sorted(photos_dir.iterdir()):
        img = Image.open(src).convert("RGB")
        for j in range(12):
            w, h = img.size
            x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
            img.crop((x, y, x + 2 * w // 3, y + 2 * h // 3)).save(folder / f"{src.stem}_{j}.jpg")
    index_dir = tmp_path / "index"
    Index.create(index_dir).close()
    script = ("import sys; from finegrain import Index; "
              "Index.open(sys.argv[1]).add([sys.argv[2]], batch_size=4, commit_every=8)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(index_dir), str(folder)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        n = sqlite3.connect(index_dir / "finegrain.sqlite").execute(
            "SELECT COUNT(*) FROM images WHERE status = 'indexed'").fetchone()[0]
        if n >= 16:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Index.open(index_dir)
    done = len(partial)
    assert 16 <= done < 72 and len(partial.global_rows) == done
    report = partial.add([folder])
    assert (report.indexed, report.unchanged) == (72 - done, done)
    final = Index.open(index_dir)
    paths = [r.path for r in final.records.values()]
    assert len(final) == 72 and len(set(paths)) == 72
