"""Reliability, round two (issue 20): each defect reproduced against the real thing first.

FIFOs in place of indexed files, concurrent requests to a real server on
loopback, a real `finegrain serve` process whose memory is measured, the
real command line.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from finegrain import Index
from finegrain.service import create_app
from finegrain.service.background import BackgroundServer

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def fg(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "finegrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unblock_fifo(path: Path) -> None:
    """Let any thread still blocked opening/reading ``path`` finish (only old code blocks there)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        return
    time.sleep(0.2)
    os.close(fd)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, photos_dir):
    root = tmp_path_factory.mktemp("round2")
    (root / "photos").mkdir()
    for name in ("coffee", "rocket", "chelsea", "coins"):
        shutil.copy(photos_dir / f"{name}.jpg", root / "photos")
    index = Index.create(root / "index")
    index.add([root / "photos"])
    ids = {Path(r.path).stem: r.id for r in index.records.values()}
    index.close()
    return root, ids


# ------------------------------------------------------------------ #1 FIFO hang
def test_fifo_in_place_of_an_indexed_file_never_hangs_the_server(small_index, tmp_path):
    root, ids = small_index
    copy = tmp_path / "root"
    shutil.copytree(root, copy, symlinks=True)
    # The catalog stores absolute paths of the original photos folder: point one of them at a FIFO there.
    victim = root / "photos" / "coins.jpg"
    saved = victim.read_bytes()
    victim.unlink()
    os.mkfifo(victim)
    try:
        app = create_app(root / "index", reload_interval=0, warm=False)
        with BackgroundServer(app) as base:
            def thumb(_):
                t0 = time.monotonic()
                with httpx.Client(base_url=base, timeout=20) as c:
                    r = c.get(f"/api/thumbnail/{ids['coins']}")
                return r.status_code, r.json(), time.monotonic() - t0

            with ThreadPoolExecutor(60) as pool:
                futures = [pool.submit(thumb, i) for i in range(60)]
                with httpx.Client(base_url=base, timeout=10) as c:  # health keeps answering meanwhile
                    for _ in range(5):
                        assert c.get("/api/health").json()["status"] == "ok"
                results = [f.result(timeout=60) for f in futures]
            assert all(status == 404 and body["error"] == "image_unavailable" for status, body, _ in results), results[:3]
            assert max(t for _, _, t in results) < 15
            with httpx.Client(base_url=base, timeout=10) as c:
                assert c.get("/api/health").status_code == 200
                assert c.get(f"/api/thumbnail/{ids['coffee']}").headers["content-type"] == "image/jpeg"
        # The CLI's query path: `search --image FIFO` is refused at once, not hung.
        proc = fg("search", "--index", root / "index", "--image", victim, "--json", timeout=240)
        assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        _unblock_fifo(victim)
        victim.unlink()
        victim.write_bytes(saved)


def test_safe_read_refuses_fifos_devices_folders_and_big_files(tmp_path):
    from finegrain.images import ImageLoadError, load_image, read_file_safely

    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    for path, reason in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                         (tmp_path, "is a directory"), (tmp_path / "missing.jpg", "file not found")):
        with pytest.raises(ImageLoadError, match=reason):
            load_image(path)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(ImageLoadError, match="larger than"):
        read_file_safely(big, max_bytes=1024)
    assert read_file_safely(big) == b"x" * 2048


# ------------------------------------------------------------------ #9 loopback serving
def test_host_header_is_checked_against_dns_rebinding(small_index):
    root, _ = small_index
    app = create_app(root / "index", reload_interval=0, warm=False, allowed_hosts=("search.example.org",))
    with BackgroundServer(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        port = base.rsplit(":", 1)[1]
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "10.0.0.1"):
            r = c.get("/api/health", headers={"Host": host})
            assert r.status_code == 421 and r.json()["error"] == "bad_host", (host, r.text)
            assert c.get("/", headers={"Host": host}).status_code == 421
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "[::1]:8000", "127.0.0.2",
                     "search.example.org", "SEARCH.example.org.:443"):
            assert c.get("/api/health", headers={"Host": host}).status_code == 200, host


def test_empty_or_non_ascii_api_keys(small_index):
    root, _ = small_index
    with pytest.raises(ValueError, match="empty"):
        create_app(root / "index", api_key="", warm=False)
    with pytest.raises(ValueError, match="empty"):
        create_app(root / "index", api_key="  ", warm=False)
    key = "clé-ключ-鍵"
    app = create_app(root / "index", api_key=key, reload_interval=0, warm=False)
    with BackgroundServer(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert c.get("/api/stats", headers={"X-API-Key": key.encode("utf-8")}).status_code == 200
        assert c.get("/api/stats", headers={"Authorization": b"Bearer " + key.encode("utf-8")}).status_code == 200
        assert c.get("/api/stats", headers={"X-API-Key": key.encode("latin-1", "replace")}).status_code == 401
        assert c.get("/api/stats", headers={"X-API-Key": "cl"}).status_code == 401


@pytest.mark.parametrize("how", ["option", "env"])
def test_serve_refuses_an_empty_api_key(small_index, how):
    root, _ = small_index
    env = {k: v for k, v in os.environ.items() if k != "FINEGRAIN_API_KEY"}
    args = ["serve", "--index", root / "index", "--port", _free_port()]
    if how == "option":
        args += ["--api-key", ""]
    else:
        env["FINEGRAIN_API_KEY"] = ""
    proc = fg(*args, timeout=120, env=env)
    assert proc.returncode == 2 and "API key is empty" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ #10 memory
def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to measure the server's memory")
def test_concurrent_thumbnails_of_large_pngs_keep_memory_bounded(tmp_path, photos_dir):
    from finegrain.service.holder import decode_slots

    folder = tmp_path / "big"
    folder.mkdir()
    n = 12
    for i in range(n):  # indexed small, then swapped for the large file (the thumbnail reads the stored path)
        shutil.copy(photos_dir / "coffee.jpg", folder / f"img{i:02d}.png")
    index = Index.create(tmp_path / "index")
    assert index.add([folder]).indexed == n
    ids = sorted(index.records)
    index.close()
    w, h = 7000, 5800  # 40.6 megapixels: allowed (limit 64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.uint16)
    arr = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], -1).astype(np.uint8)
    big = tmp_path / "large.png"
    Image.fromarray(arr).save(big, compress_level=1)
    del arr, xx, yy
    for i in range(n):
        (folder / f"img{i:02d}.png").unlink()
        os.link(big, folder / f"img{i:02d}.png")

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "serve", "--index", str(tmp_path / "index"),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/api/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        before = _status_kb(proc.pid, "VmRSS")

        def thumb(image_id):
            return httpx.get(f"{base}/api/thumbnail/{image_id}", timeout=300)

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(thumb, ids))
        assert all(r.status_code == 200 and r.headers["content-type"] == "image/jpeg" for r in responses)
        thumb0 = Image.open(__import__("io").BytesIO(responses[0].content))
        assert max(thumb0.size) == 256
        growth_mb = (_status_kb(proc.pid, "VmHWM") - before) / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # One decode of this PNG holds ~165 MB (Pillow keeps RGB as 4 bytes a pixel); 12 at once took > 2.5 GB.
    bound = decode_slots() * 300 + 400
    print(f"peak RSS growth {growth_mb:.0f} MB over {n} concurrent thumbnails (bound {bound} MB)")
    assert growth_mb < bound


# ------------------------------------------------------------------ #6 hostile ground-truth pickles
MINI_GND = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "rparis6k-mini" / "gnd_rparis6k-mini.pkl"


def _gnd_pickle(folder: Path, imlist) -> Path:
    import pickle

    folder.mkdir(exist_ok=True)
    path = folder / "gnd_x.pkl"
    path.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": [], "gnd": []}, protocol=4))
    return path


def test_hostile_ground_truth_pickles_fail_fast_with_a_clear_error(tmp_path):
    from finegrain.eval.revisitop import BadGroundTruthError, load_gnd

    laughs: list = ["lol"] * 10
    for _ in range(8):  # 10^9 strings once expanded; 200 bytes as a pickle
        laughs = [laughs] * 10
    looped: list = []
    looped.append(looped)
    deep: list = []
    for _ in range(200):
        deep = [deep]
    cases = {"billion laughs": (_gnd_pickle(tmp_path / "a", laughs), "billion laughs"),
             "self-referential": (_gnd_pickle(tmp_path / "b", looped), "contains itself"),
             "deeply nested": (_gnd_pickle(tmp_path / "c", deep), "nested more than"),
             "tuple": (_gnd_pickle(tmp_path / "d", [("a", "b")]), "unexpected pickle opcode TUPLE")}
    (tmp_path / "e").mkdir()
    if MINI_GND.is_file():
        data = MINI_GND.read_bytes()
        (tmp_path / "e" / "gnd_t.pkl").write_bytes(data[: len(data) // 2])
        cases["truncated"] = (tmp_path / "e" / "gnd_t.pkl", "not a readable ground-truth file")
    big = tmp_path / "e" / "gnd_big.pkl"
    with open(big, "wb") as fh:
        fh.truncate(65 * 2**20)  # sparse: 65 MiB of zeros
    cases["oversized"] = (big, "larger than 64 MiB")
    for what, (path, message) in cases.items():
        t0 = time.monotonic()
        with pytest.raises(BadGroundTruthError, match=message):
            load_gnd(path)
        assert time.monotonic() - t0 < 10, what


def test_thumbnails_of_unusual_images_match_the_full_decode(tmp_path, photos_dir):
    """The reduced-size thumbnail decode gives what decoding fully and shrinking gives (modes, EXIF rotation)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from reliability_helpers import make_hostile_folder

    from finegrain.images import load_image, load_thumbnail

    kinds = make_hostile_folder(tmp_path / "h", photos_dir / "astronaut.jpg")
    for name, kind in kinds.items():
        if kind != "good":
            continue
        full = load_image(tmp_path / "h" / name)
        full.thumbnail((128, 128))
        thumb = load_thumbnail(tmp_path / "h" / name, 128)
        assert thumb.mode == "RGB" and thumb.size == full.size, name
        diff = np.abs(np.asarray(thumb, np.float32) - np.asarray(full, np.float32)).mean()
        assert diff < 3, (name, diff)  # measured: at most 0.64 (alpha), 0 for most
