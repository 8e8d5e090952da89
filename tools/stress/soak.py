"""Soak: a bounded mixed workload, checking that memory and open file handles stay flat.

For ``--minutes`` minutes, on loopback:

* a writer (this process, one ``Index``) adds a batch of new photos every
  ``--add-every`` seconds (``Index.add``), and now and then deletes a few
  files and re-indexes with ``remove_missing`` (which also exercises
  compaction once more than 32 chunks exist);
* ``finegrain serve`` (a subprocess) serves the same index and re-opens it
  after each commit; ``--clients`` threads send text searches (all modes),
  image searches, explains, thumbnails and stats to it;
* the writer's ``Index`` also answers library searches between batches.

Every ``--sample-every`` seconds it samples the server's and this process's
resident memory (RSS) and open file descriptors. The verdict compares the
second half of the run with the first sample after warm-up: file
descriptors must not grow, and RSS growth over the second half must stay
under ``--max-rss-growth-mb``.

    python -m tools.stress.soak --minutes 20 --json
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _proc_stats(pid: int | str = "self") -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process."""
    with open(f"/proc/{pid}/statm") as fh:
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Photos:
    """Generates distinct small photos (random crops of the scikit-image samples)."""

    def __init__(self, folder: Path, seed: int = 0):
        from PIL import Image
        from skimage import data

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.sources = [Image.fromarray(getattr(data, n)()).convert("RGB")
                        for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")]
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def make(self, n: int) -> list[Path]:
        out = []
        for _ in range(n):
            img = self.sources[self.count % len(self.sources)]
            w, h = img.size
            cw, ch = int(w * self.rng.uniform(0.4, 0.9)), int(h * self.rng.uniform(0.4, 0.9))
            x, y = int(self.rng.integers(0, w - cw)), int(self.rng.integers(0, h - ch))
            path = self.folder / f"p{self.count:06d}.jpg"
            img.crop((x, y, x + cw, y + ch)).resize((192, 144)).save(path, quality=85)
            self.count += 1
            out.append(path)
        return out


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
             ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _multipart(image: bytes, k: int) -> tuple[bytes, dict]:
    b = "soakboundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{b}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={b}"}


def client_loop(port: int, stop: threading.Event, stats: collections.Counter, lock: threading.Lock, seed: int,
                query_image: bytes) -> None:
    rng = random.Random(seed)
    texts = ["a cat", "a rocket on a launch pad", "a cup of coffee", "a man with a camera", "some coins",
             "an astronaut in a white suit", "a red and white object next to a blue sky"]
    while not stop.is_set():
        r = rng.random()
        try:
            if r < 0.55:
                body = json.dumps({"text": rng.choice(texts), "k": rng.randint(1, 20),
                                   "mode": rng.choice(["global", "hierarchical", "exhaustive"]),
                                   "explain": rng.random() < 0.1}).encode()
                status, data = _request(port, "POST", "/api/search", body, {"Content-Type": "application/json"})
                kind = "search"
                if status == 200:
                    ids = [h["id"] for h in json.loads(data)["results"]]
                    if ids and rng.random() < 0.5:
                        status, _ = _request(port, "GET", f"/api/thumbnail/{rng.choice(ids)}")
                        kind = "thumbnail"
            elif r < 0.7:
                body, headers = _multipart(query_image, rng.randint(1, 10))
                status, _ = _request(port, "POST", "/api/search/image", body, headers)
                kind = "image_search"
            elif r < 0.8:
                body = json.dumps({"text": rng.choice(texts), "id": rng.randint(1, 50), "mode": "hierarchical"}).encode()
                status, _ = _request(port, "POST", "/api/explain", body, {"Content-Type": "application/json"})
                kind = "explain"
            elif r < 0.9:
                status, _ = _request(port, "GET", "/api/stats")
                kind = "stats"
            else:  # a bad request now and then
                status, _ = _request(port, "POST", "/api/search", b'{"text": ', {"Content-Type": "application/json"})
                kind = "bad"
        except (OSError, http.client.HTTPException) as exc:
            with lock:
                stats["connection_errors"] += 1
                stats[f"error:{type(exc).__name__}"] += 1
            time.sleep(0.5)
            continue
        with lock:
            stats["requests"] += 1
            stats[f"{kind}:{status}"] += 1
            if status >= 500:
                stats["5xx"] += 1


def run(minutes: float, clients: int, add_every: float, batch: int, sample_every: float, work: Path,
        max_rss_growth_mb: float, log=print) -> dict:
    from finegrain import Index
    from finegrain.decompose.segments import SegmentConfig

    photos = Photos(work / "photos")
    photos.make(24)
    index = Index.create(work / "index", segments=SegmentConfig(levels=(4, 9)))
    index.add([photos.folder], batch_size=16)
    query_image = (photos.folder / "p000002.jpg").read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_log = open(work / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "finegrain.cli", "serve", "--index", str(work / "index"),
                               "--port", str(port), "--reload-interval", "1"],
                              stdout=server_log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + 300
    while True:
        try:
            if _request(port, "GET", "/api/health")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError("the server did not start")
        time.sleep(0.5)

    stop = threading.Event()
    stats: collections.Counter = collections.Counter()
    lock = threading.Lock()
    threads = [threading.Thread(target=client_loop, args=(port, stop, stats, lock, i, query_image), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    samples = []
    writer = collections.Counter()
    t0 = time.monotonic()
    end = t0 + minutes * 60
    next_add, next_sample, rounds = t0, t0, 0
    rng = random.Random(0)
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_sample:
            srv_rss, srv_fds = _proc_stats(server.pid)
            own_rss, own_fds = _proc_stats()
            with lock:
                requests = stats["requests"]
            samples.append({"t_s": round(now - t0, 1), "server_rss_mb": round(srv_rss, 1), "server_fds": srv_fds,
                            "writer_rss_mb": round(own_rss, 1), "writer_fds": own_fds, "images": len(index),
                            "requests": requests, "threads": threading.active_count()})
            next_sample = now + sample_every
        if now >= next_add:
            rounds += 1
            photos.make(batch)
            remove = rounds % 5 == 0
            if remove:  # delete a few files, then let the index drop them
                for path in rng.sample(sorted(photos.folder.iterdir()), 3):
                    path.unlink()
            report = index.add([photos.folder], batch_size=16, commit_every=4, remove_missing=remove)
            writer["indexed"] += report.indexed
            writer["removed"] += report.removed
            writer["failed"] += len(report.failed)
            writer["adds"] += 1
            next_add = time.monotonic() + add_every
            if rounds % 10 == 0:
                log(f"{now - t0:.0f}s: {len(index)} images, {samples[-1]}")
        index.search(text=rng.choice(["a cat", "a rocket", "coins"]), k=5, mode=rng.choice(["global", "hierarchical"]))
        writer["library_searches"] += 1
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    srv_rss, srv_fds = _proc_stats(server.pid)
    server.terminate()
    server.wait(timeout=60)
    server_log.close()
    tracebacks = (work / "server.log").read_text(errors="replace").count("Traceback")
    index.close()

    def verdict(key_rss: str, key_fds: str) -> dict:
        warm = samples[min(len(samples) - 1, max(1, len(samples) // 10))]  # after warm-up (first 10%)
        half = samples[len(samples) // 2:]
        growth = half[-1][key_rss] - half[0][key_rss]
        minutes_half = max((half[-1]["t_s"] - half[0]["t_s"]) / 60, 1e-9)
        return {"rss_mb_start": samples[0][key_rss], "rss_mb_after_warmup": warm[key_rss],
                "rss_mb_end": samples[-1][key_rss], "rss_mb_max": max(s[key_rss] for s in samples),
                "rss_growth_second_half_mb": round(growth, 1),
                "rss_growth_second_half_mb_per_min": round(growth / minutes_half, 2),
                "fds_start": samples[0][key_fds], "fds_after_warmup": warm[key_fds], "fds_end": samples[-1][key_fds],
                "fds_max": max(s[key_fds] for s in samples),
                "flat": growth <= max_rss_growth_mb and samples[-1][key_fds] <= warm[key_fds] + 2}

    return {
        "minutes": minutes, "clients": clients, "images_final": samples[-1]["images"],
        "requests": stats["requests"], "requests_per_s": round(stats["requests"] / (minutes * 60), 2),
        "5xx": stats["5xx"], "connection_errors": stats["connection_errors"],
        "by_kind": {k: v for k, v in sorted(stats.items()) if ":" in k},
        "writer": dict(writer), "server_tracebacks": tracebacks,
        "server": verdict("server_rss_mb", "server_fds"), "writer_process": verdict("writer_rss_mb", "writer_fds"),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--add-every", type=float, default=20.0, help="Seconds between two indexing batches.")
    parser.add_argument("--batch", type=int, default=8, help="New photos per batch.")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="finegrain-soak-"))
    try:
        result = run(args.minutes, args.clients, args.add_every, args.batch, args.sample_every, tmp,
                     args.max_rss_growth_mb, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = result["5xx"] == 0 and result["connection_errors"] == 0 and result["server"]["flat"] \
        and result["writer_process"]["flat"] and not result["server_tracebacks"]
    result["ok"] = ok
    print(json.dumps(result) if args.json else json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
