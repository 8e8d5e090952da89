"""Read-only serving (issue 20, #7): an index on a read-only folder or a full disk is still searched.

Before: `search`, `info` and `serve` failed with "unable to open database file" / "disk I/O error" (WAL needs its
-wal/-shm files) and the message suggested corruption. Real read-only folders: a read-only bind mount when the
tests run as root (root ignores file modes), `chmod -w` otherwise; a real full tmpfs for the full disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from finegrain import Index
from finegrain.service import create_app
from finegrain.service.background import BackgroundServer
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PHOTOS = ["chelsea.jpg", "coffee.jpg", "coins.jpg", "rocket.jpg"]


def fg(*args, timeout=300):
    return fg_in_process(*args)  # in-process: the same command-line code without an interpreter start


@pytest.fixture(scope="module")
def base(tmp_path_factory, photos_dir):
    """Four photos, HNSW search structure (its cache file is what a search would write into ann/)."""
    root = tmp_path_factory.mktemp("readonly")
    (root / "photos").mkdir()
    for name in ("coffee", "rocket", "chelsea", "coins"):
        shutil.copy(photos_dir / f"{name}.jpg", root / "photos")
    index = Index.create(root / "index", ann="hnsw")
    index.add([root / "photos"])
    index.close()
    assert not list((root / "index").glob("finegrain.sqlite-*")), "a cleanly closed catalog leaves no WAL files"
    return root


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(args)}): {proc.stderr.strip()}")


@pytest.fixture
def read_only_index(base, tmp_path):
    """A copy of the index seen through a read-only folder (a read-only bind mount as root, else chmod -w)."""
    src = tmp_path / "src"
    shutil.copytree(base / "index", src)
    shutil.rmtree(src / "ann", ignore_errors=True)
    if IS_ROOT:
        view = tmp_path / "ro"
        view.mkdir()
        _mount("--bind", str(src), str(view))
        try:
            _mount("-o", "remount,bind,ro", str(view))
            yield view
        finally:
            subprocess.run(["umount", "-l", str(view)], check=False)
    else:
        for path in [src, *src.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        try:
            yield src
        finally:
            for path in [src, *src.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)


def _note(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("note:"), proc.stderr
    assert "read-only" in lines[0] and "writes are disabled" in lines[0]
    return lines[0]


def _one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    return lines[0]


def test_read_only_folder_is_searched_and_writes_are_refused(read_only_index, base):
    idx = read_only_index
    with pytest.raises(OSError):
        (idx / "probe").write_text("x")  # really read-only
    proc = fg("search", "--index", idx, "--image", base / "photos" / "coffee.jpg", "-k", "2", "--format", "paths")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].endswith("coffee.jpg"), proc.stderr
    _note(proc)
    proc = fg("info", "--index", idx, "--json")
    assert proc.returncode == 0 and '"images": 4' in proc.stdout and '"read_only": "' in proc.stdout
    _note(proc)
    for args in (("remove", "1"), ("compact",), ("index", base / "photos")):
        line = _one_line_error(fg(*args, "--index", idx))
        assert "read-only" in line and "writes are disabled" in line, line
    proc = fg("check", "--index", idx)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stdout + proc.stderr
    assert not (idx / "ann").exists() and not list(idx.glob("finegrain.sqlite-*"))  # nothing written


def test_read_only_folder_is_served(read_only_index, base):
    with BackgroundServer(create_app(read_only_index, reload_interval=0)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/api/health").status_code == 200
        for _ in range(2):  # the HNSW cache cannot be written: built in memory, answered both times
            body = client.post("/api/search", json={"text": "a cup of coffee", "k": 4, "mode": "global"}).json()
            assert sorted(r["name"] for r in body["results"]) == PHOTOS, body
        ids = {Path(r["name"]).stem: r["id"] for r in body["results"]}
        assert client.get(f"/api/thumbnail/{ids['coffee']}").status_code == 200


def test_serve_prints_the_read_only_note(read_only_index):
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "serve", "--index", str(read_only_index),
                             "--port", "0"], stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "400"})
    try:
        first = proc.stderr.readline()
        assert first.startswith("note:") and "read-only" in first and "writes are disabled" in first, first
    finally:
        proc.kill()
        proc.wait()


def test_chmod_read_only_folder_when_not_root(base, tmp_path):
    if IS_ROOT:
        pytest.skip("root ignores file modes; the read-only bind mount above is the real test")
    src = tmp_path / "idx"
    shutil.copytree(base / "index", src)
    src.chmod(0o555)
    try:
        proc = fg("search", "--index", src, "--text", "a cat", "-k", "1")
        assert proc.returncode == 0, proc.stderr
        _note(proc)
    finally:
        src.chmod(0o755)


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB tmpfs mounted for this test (needs root)."""
    if not IS_ROOT:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_index_is_searched(base, small_fs):
    idx = small_fs / "index"
    shutil.copytree(base / "index", idx)
    shutil.rmtree(idx / "ann", ignore_errors=True)
    filler = small_fs / f"filler-{uuid.uuid4().hex}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # every block taken: -shm/-wal files and caches cannot be written
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    assert os.statvfs(small_fs).f_bavail == 0
    proc = fg("search", "--index", idx, "--image", base / "photos" / "rocket.jpg", "-k", "1", "--format", "paths")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("rocket.jpg"), proc.stderr
    assert "disk I/O error" in _note(proc)  # before: "error: index catalog ... is unreadable: disk I/O error"
    proc = fg("info", "--index", idx, "--json")
    assert proc.returncode == 0 and '"images": 4' in proc.stdout, proc.stderr
    with BackgroundServer(create_app(idx, reload_interval=0)) as url:
        body = httpx.post(url + "/api/search", json={"text": "a rocket", "k": 4}, timeout=60).json()
        assert sorted(r["name"] for r in body["results"]) == PHOTOS, body
    line = _one_line_error(fg("remove", "1", "--index", idx))
    assert "no space left" in line or "read-only" in line, line
    filler.unlink()
    assert Index.open(idx).remove([1]) == 1  # space again: writable again
