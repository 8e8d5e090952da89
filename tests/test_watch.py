"""finegrain watch: real file operations against the watchdog observer and the polling observer."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain import Index
from finegrain.watch import ChangeSet, WatchCommit, Watcher

pytest.importorskip("watchdog", reason="watchdog is a core dependency; install it")


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def pictures(tmp_path_factory, photos_dir) -> dict[str, bytes]:
    """Small JPEGs (fast to encode) of the six sample photos, as bytes."""
    out = {}
    for path in sorted(photos_dir.iterdir()):
        img = Image.open(path).convert("RGB")
        img.thumbnail((128, 128))
        buf = tmp_path_factory.mktemp("pic") / "x.jpg"
        img.save(buf, quality=85)
        out[path.stem] = buf.read_bytes()
    return out


def catalog(idx: Path) -> dict[str, str]:
    """Indexed files (path relative to the watched folder's parent) -> sha256, read by a fresh reader."""
    index = Index.open(idx)
    try:
        return {r.path: r.sha256 for r in index.records.values()}
    finally:
        index.close()


def ids(idx: Path) -> dict[str, int]:
    index = Index.open(idx)
    try:
        return {r.path: r.id for r in index.records.values()}
    finally:
        index.close()


def failures(idx: Path) -> dict[str, str]:
    index = Index.open(idx)
    try:
        return {r.path: r.error or "" for r in index.failures()}
    finally:
        index.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Running:
    """A Watcher on its own thread (as the CLI runs it), with every commit collected."""

    def __init__(self, idx: Path, folder: Path, poll: bool, **kwargs):
        self.index = Index.open(idx) if (idx / "finegrain.sqlite").exists() else Index.create(idx)
        self.commits: queue.Queue[WatchCommit] = queue.Queue()
        self.all: list[WatchCommit] = []
        self.watcher = Watcher(self.index, [folder], poll=poll, interval=0.2, log=self.commits.put, **kwargs)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watcher.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        first = self.next(120)
        assert first.kind == "scan", first
        return self

    def next(self, timeout: float = 60) -> WatchCommit:
        commit = self.commits.get(timeout=timeout)
        self.all.append(commit)
        return commit

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the watch did not stop"
        while not self.commits.empty():
            self.all.append(self.commits.get())
        self.index.close()


# ------------------------------------------------------------ unit: settling
def test_changeset_waits_for_a_stable_size_and_expands_new_folders(tmp_path):
    now = [100.0]
    changes = ChangeSet(clock=lambda: now[0])
    growing = tmp_path / "growing.jpg"
    growing.write_bytes(b"x" * 10)
    changes.touch(str(growing))
    assert changes.take(settle=1.0) == ([], [])  # first look: size noted
    now[0] += 0.5
    with open(growing, "ab") as fh:
        fh.write(b"y" * 10)
    assert changes.take(settle=1.0) == ([], [])  # grew: noted again
    now[0] += 0.9
    assert changes.take(settle=1.0) == ([], [])  # unchanged for 0.9 s only
    now[0] += 0.2
    assert changes.take(settle=1.0) == ([str(growing)], [])
    assert len(changes) == 0

    folder = tmp_path / "album"
    (folder / "inner").mkdir(parents=True)
    for name in ("a.jpg", "inner/b.HEIC", "notes.txt"):
        (folder / name).write_bytes(b"z")
    changes.touch(str(folder))
    assert changes.take(settle=1.0) == ([], [])
    now[0] += 1.5
    ready, gone = changes.take(settle=1.0)
    assert sorted(ready) == [str(folder / "a.jpg"), str(folder / "inner" / "b.HEIC")] and gone == []


def test_changeset_holds_a_removal_while_the_other_end_of_a_move_settles(tmp_path):
    now = [0.0]
    changes = ChangeSet(clock=lambda: now[0])
    old, new = tmp_path / "old.jpg", tmp_path / "new.jpg"
    new.write_bytes(b"moved")
    changes.touch(str(old))
    changes.touch(str(new))
    assert changes.take(settle=1.0, hold=30) == ([], [])  # old is gone, but new is still settling
    now[0] += 1.1
    assert changes.take(settle=1.0, hold=30) == ([str(new)], [str(old)])  # one batch
    busy = tmp_path / "busy.jpg"  # a file that never settles must not hold a removal for ever
    busy.write_bytes(b"1")
    changes.touch(str(old))
    changes.touch(str(busy))
    assert changes.take(settle=1.0, hold=30) == ([], [])
    now[0] += 31
    busy.write_bytes(b"12")
    assert changes.take(settle=1.0, hold=30) == ([], [str(old)])
    assert len(changes) == 1


# -------------------------------------------------- real files, both observers
@pytest.mark.parametrize("poll", [False, True], ids=["events", "polling"])
def test_watch_follows_real_file_operations(tmp_path, pictures, poll):
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "coffee.jpg").write_bytes(pictures["coffee"])
    idx = tmp_path / "index"
    root = str(folder)
    with Running(idx, folder, poll, quiet=0.3, settle=1.5, max_wait=10) as run:
        assert catalog(idx) == {f"{root}/coffee.jpg": sha(pictures["coffee"])}  # the start-up scan

        (folder / "rocket.jpg").write_bytes(pictures["rocket"])  # create
        (folder / "2024" / "chelsea.jpg").write_bytes(pictures["chelsea"])  # create in a sub-folder
        wait_for(lambda: len(catalog(idx)) == 3, 60, "two new files")

        (folder / "coffee.jpg").write_bytes(pictures["coins"])  # modify: new content under the same name
        wait_for(lambda: catalog(idx).get(f"{root}/coffee.jpg") == sha(pictures["coins"]), 60, "the modified file")
        assert len(catalog(idx)) == 3

        before = ids(idx)
        os.rename(folder / "rocket.jpg", folder / "2024" / "rocket-moved.jpg")  # move
        wait_for(lambda: f"{root}/2024/rocket-moved.jpg" in catalog(idx), 60, "the moved file")
        assert f"{root}/rocket.jpg" not in catalog(idx) and len(catalog(idx)) == 3
        assert ids(idx)[f"{root}/2024/rocket-moved.jpg"] == before[f"{root}/rocket.jpg"]  # vectors kept, not encoded

        shutil.move(str(folder / "2024"), str(folder / "2025"))  # a whole folder moved
        wait_for(lambda: sorted(catalog(idx)) == [f"{root}/2025/chelsea.jpg", f"{root}/2025/rocket-moved.jpg",
                                                   f"{root}/coffee.jpg"], 60, "the moved folder")
        assert ids(idx)[f"{root}/2025/chelsea.jpg"] == before[f"{root}/2024/chelsea.jpg"]
        assert ids(idx)[f"{root}/2025/rocket-moved.jpg"] == before[f"{root}/rocket.jpg"]

        os.remove(folder / "coffee.jpg")  # delete
        wait_for(lambda: f"{root}/coffee.jpg" not in catalog(idx), 60, "the deleted file")

        # a file arriving slowly: written in parts with pauses longer than `quiet` (+ a tick), shorter than `settle`
        data = pictures["astronaut"]
        with open(folder / "arriving.jpg", "wb") as fh:
            for start in range(0, len(data), len(data) // 4 + 1):
                fh.write(data[start:start + len(data) // 4 + 1])
                fh.flush()
                time.sleep(0.8)
        wait_for(lambda: f"{root}/arriving.jpg" in catalog(idx), 60, "the slowly written file")
        assert catalog(idx)[f"{root}/arriving.jpg"] == sha(data)  # indexed whole, never half

        shutil.rmtree(folder / "2025")  # a folder deleted
        wait_for(lambda: sorted(catalog(idx)) == [f"{root}/arriving.jpg"], 60, "the deleted folder")
    assert not failures(idx), failures(idx)
    assert not [c.failed for c in run.all if c.failed]  # no half-written file was ever tried
    assert len(run.all) >= 8 and all(c.indexed or c.moved or c.removed or c.failed for c in run.all)
    assert sum(c.moved for c in run.all) == 3 and sum(c.indexed for c in run.all) == 5  # 3 moved, not re-encoded
    generations = [c.generation for c in run.all]
    assert generations == sorted(generations)


def test_failures_of_deleted_files_do_not_linger(tmp_path, pictures, monkeypatch):
    """A bad file's failure row goes when the file goes; a file deleted while being committed is not a failure."""
    folder = tmp_path / "photos"
    folder.mkdir()
    index = Index.create(tmp_path / "index")
    watcher = Watcher(index, [folder], settle=0.0)
    try:
        bad = folder / "bad.jpg"
        bad.write_bytes(b"not an image at all")
        watcher.changes.touch(str(bad))
        assert watcher.commit() is None  # first look: size noted
        commit = watcher.commit()
        assert commit is not None and commit.failed == [(str(bad), "not a recognised image format")]
        assert [r.path for r in index.failures()] == [str(bad)]
        bad.unlink()
        watcher.changes.touch(str(bad))
        commit = watcher.commit()
        assert commit is not None and not commit.failed and index.failures() == []

        brief = folder / "brief.jpg"
        brief.write_bytes(pictures["coins"])
        watcher.changes.touch(str(brief))
        assert watcher.commit() is None
        take = watcher.changes.take

        def take_then_delete(*args, **kwargs):  # the file disappears after it settled, before it is read
            ready, gone = take(*args, **kwargs)
            brief.unlink()
            return ready, gone

        monkeypatch.setattr(watcher.changes, "take", take_then_delete)
        commit = watcher.commit()
        assert commit is not None and commit.failed == [] and commit.indexed == 0
        assert index.failures() == [] and len(index) == 0
    finally:
        index.close()


def test_startup_scan_commits_in_batches_and_can_be_stopped_between_them(tmp_path, pictures):
    folder = tmp_path / "photos"
    (folder / "old").mkdir(parents=True)
    names = ["astronaut", "coffee", "chelsea", "rocket", "coins"]
    for name in names:
        (folder / f"{name}.jpg").write_bytes(pictures[name])
    (folder / "old" / "camera.jpg").write_bytes(pictures["camera"])
    (folder / "raw.dng").write_bytes(b"raw")
    index = Index.create(tmp_path / "index")
    try:
        index.add([folder / "old"])  # indexed earlier; deleted while no watch ran
        shutil.rmtree(folder / "old")
        watcher = Watcher(index, [folder], max_batch=2)
        stop = threading.Event()
        commits = []
        for commit in watcher.scan(stop):
            commits.append(commit)
            stop.set()  # Ctrl-C during the first commit: the scan ends after it
        assert len(commits) == 1 and commits[0].indexed == 2 and commits[0].removed == 1
        assert [Path(p).name for p, _ in commits[0].failed] == ["raw.dng"]  # unsupported: reported, as by `index`
        assert len(index) == 2
        commits = list(watcher.scan())  # the next start goes on from there
        assert [c.indexed for c in commits] == [2, 1] and commits[0].unchanged == 2
        assert sorted(Path(r.path).stem for r in index.records.values()) == sorted(names)
        assert [c.as_dict()["indexed"] for c in watcher.scan()] == [0]  # nothing left: one line, nothing committed
    finally:
        index.close()


def test_writer_move_keeps_vectors_swaps_and_replaces(tmp_path, pictures):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("coffee", "rocket", "coins"):
        (folder / f"{name}.jpg").write_bytes(pictures[name])
    index = Index.create(tmp_path / "index")
    try:
        index.add([folder])
        by_name = {Path(r.path).stem: r.id for r in index.records.values()}
        gen = index.generation
        with index.writer() as writer:  # coffee and rocket trade names; coins moves onto rocket's old name too
            assert writer.move([(by_name["coffee"], str(folder / "rocket.jpg"), 1),
                                (by_name["rocket"], str(folder / "coffee.jpg"), 2)]) == 2
        assert index.generation == gen + 1
        assert index.get(by_name["coffee"]).path == str(folder / "rocket.jpg")
        with index.writer() as writer:
            writer.move([(by_name["coins"], str(folder / "rocket.jpg"), 3)])
        assert {r.path: r.id for r in index.records.values()} == {str(folder / "rocket.jpg"): by_name["coins"],
                                                                 str(folder / "coffee.jpg"): by_name["rocket"]}
        hits = index.search(image=folder / "coins.jpg", k=1)  # the vectors went with the id
        assert hits.hits[0].id == by_name["coins"] and hits.hits[0].path == str(folder / "rocket.jpg")
        with pytest.raises(KeyError, match="unknown image ids"), index.writer() as writer:
            writer.move([(by_name["coffee"], str(folder / "x.jpg"), 4)])  # removed above: not live
    finally:
        index.close()


def test_python_api_rejects_bad_settings(tmp_path):
    index = Index.create(tmp_path / "index")
    try:
        with pytest.raises(FileNotFoundError, match="not a folder"):
            Watcher(index, [tmp_path / "missing"])
        with pytest.raises(ValueError, match="quiet must be"):
            Watcher(index, [tmp_path], quiet=-1)
        with pytest.raises(ValueError, match="max_batch"):
            Watcher(index, [tmp_path], max_batch=0)
    finally:
        index.close()


# ------------------------------------------------------------ the command line
def watch_cmd(folder: Path, idx: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finegrain", "watch", str(folder), "--index", str(idx), "--json",
                             "--quiet", "0.3", "--settle", "0.5", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float = 120) -> dict:
    """The next JSON line the watch prints (one per commit)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not (box and box[0]):
        stderr = proc.stderr.read() if proc.poll() is not None else ""  # type: ignore[union-attr]
        pytest.fail(f"no commit line within {timeout}s; stderr: {stderr}")
    return json.loads(box[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_and_commits_what_settled(tmp_path, pictures, sig):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes(pictures["coffee"])
    idx = tmp_path / "index"
    proc = watch_cmd(folder, idx, "--quiet", "30")  # long quiet: nothing commits until the signal
    try:
        assert read_line(proc)["event"] == "scan"
        (folder / "coins.jpg").write_bytes(pictures["coins"])
        time.sleep(1.5)  # seen by the observer, not committed (quiet is 30 s)
        assert len(catalog(idx)) == 1
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert json.loads(out.splitlines()[-1])["indexed"] == 1
    assert sorted(Path(p).name for p in catalog(idx)) == ["coffee.jpg", "coins.jpg"]


def test_sigkill_leaves_a_consistent_index_and_the_next_run_catches_up(tmp_path, pictures):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = Image.open(__import__("io").BytesIO(pictures["astronaut"])).convert("RGB")
    idx = tmp_path / "index"
    proc = watch_cmd(folder, idx, "--max-batch", "3")
    try:
        assert read_line(proc)["event"] == "scan"
        for i in range(24):  # a stream of files; the watch is killed while it commits them
            arr = np.asarray(base).copy()
            arr[rng.integers(0, 100):, : rng.integers(10, 120)] = rng.integers(0, 255, 3)
            Image.fromarray(arr).save(folder / f"shot{i:02d}.jpg", quality=80)
        read_line(proc)  # at least one commit happened
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    index = Index.open(idx)  # consistent: it opens and every listed chunk is there
    held = len(index)
    assert len(index.search(image=folder / "shot00.jpg", k=3).hits) == min(3, held)
    index.close()
    os.remove(folder / "shot00.jpg")  # changed while no watch ran
    (folder / "late.jpg").write_bytes(pictures["coffee"])
    proc = watch_cmd(folder, idx)
    try:
        scan = read_line(proc)
        assert scan["event"] == "scan" and scan["failed"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    names = sorted(Path(p).name for p in catalog(idx))
    assert names == sorted(p.name for p in folder.iterdir()), names
    assert "shot00.jpg" not in names and "late.jpg" in names


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "finegrain", "watch", str(tmp_path / "nope"), "--index",
                          str(tmp_path / "idx")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "not a folder" in out.stderr and not (tmp_path / "idx").exists()


# ------------------------------------------------------------ a served index
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _search(base: str, text: str) -> list[str]:
    req = urllib.request.Request(f"{base}/api/search", data=json.dumps({"text": text, "k": 10}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [r["name"] for r in json.loads(resp.read())["results"]]


def test_served_index_picks_up_watched_changes(tmp_path, pictures):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes(pictures["coffee"])
    idx = tmp_path / "index"
    with Running(idx, folder, poll=False, quiet=0.3, settle=0.5):
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "finegrain", "serve", "--index", str(idx), "--port",
                                   str(port), "--reload-interval", "0.2"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            def up() -> bool:
                assert server.poll() is None, server.stderr.read()  # type: ignore[union-attr]
                try:
                    return _get(f"{base}/api/health")["images"] == 1
                except OSError:
                    return False

            wait_for(up, 120, "the server")
            (folder / "rocket.jpg").write_bytes(pictures["rocket"])
            (folder / "chelsea.jpg").write_bytes(pictures["chelsea"])
            wait_for(lambda: _get(f"{base}/api/health")["images"] == 3, 60, "the server to see two new images")
            assert set(_search(base, "a cat")) == {"coffee.jpg", "rocket.jpg", "chelsea.jpg"}
            os.remove(folder / "coffee.jpg")
            wait_for(lambda: _get(f"{base}/api/health")["images"] == 2, 60, "the server to drop the deleted image")
            assert "coffee.jpg" not in _search(base, "a cup of coffee")
        finally:
            server.terminate()
            server.wait(timeout=30)
