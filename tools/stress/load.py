"""Bounded load check of ``finegrain serve`` on loopback: throughput, latency percentiles, errors, server memory.

Starts the server on a copy of INDEX (the original is never written) on a
free loopback port, or targets a running one with --url (loopback only).
Sends a fixed number of text searches from --concurrency threads, each with
its own keep-alive connection, using distinct Flickr8k captions as queries
(or generated phrases when the data is absent), then prints one table (and
JSON with --json). The server's resident memory is sampled every 0.25 s.

    python -m tools.stress.load --index ~/.cache/finegrain/bench/flickr8k-dev-effnet-minilm
    python -m tools.stress.load --index INDEX --requests 2000 --concurrency 8 --mode global --json
    python -m tools.stress.load --url http://127.0.0.1:8000 --requests 500

The load generator runs on the same machine as the server and competes with
it for the CPU: report the core count with the numbers.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

CAPTIONS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "flickr8k" / "captions.tsv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--index", type=Path, help="Index to serve (copied to a temporary folder first).")
    target.add_argument("--url", help="A running server on loopback, e.g. http://127.0.0.1:8000.")
    ap.add_argument("--requests", type=int, default=2000, help="Measured requests (after --warmup).")
    ap.add_argument("--concurrency", type=int, default=8, help="Client threads, one connection each.")
    ap.add_argument("--mode", default="global", help="Search mode of every request.")
    ap.add_argument("-k", type=int, default=10, help="Results per search.")
    ap.add_argument("--warmup", type=int, default=50, help="Unmeasured requests first.")
    ap.add_argument("--max-seconds", type=float, default=600, help="Stop sending after this long, whatever is left.")
    ap.add_argument("--queries", type=Path, default=CAPTIONS, help="Flickr8k captions.tsv (else generated phrases).")
    ap.add_argument("--torch-threads", type=int, default=1, help="Passed to finegrain serve (with --index).")
    ap.add_argument("--json", action="store_true", help="Also print the result as one JSON line.")
    args = ap.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be positive")

    queries = load_queries(args.queries, args.requests + args.warmup)
    with server(args) as (url, pid):
        host, port = split_loopback(url)
        health = get_json(host, port, "/api/health")
        run_load(host, port, queries[:args.warmup], args, None)  # warm-up: caches, allocator, JIT paths
        memory = MemorySampler(pid)
        with memory:
            result = run_load(host, port, queries[args.warmup:], args, args.max_seconds)
        result.update({"images": health["images"], "mode": args.mode, "k": args.k, "concurrency": args.concurrency,
                       "cpu_cores": os.cpu_count(), **memory.summary()})
    print_table(result)
    if args.json:
        print(json.dumps(result))


# ------------------------------------------------------------------ server
class server:
    """Context manager: (base URL, server pid or None) of the server under test."""

    def __init__(self, args):
        self.args = args
        self.proc = None
        self.tmp = None

    def __enter__(self):
        if self.args.url:
            split_loopback(self.args.url)
            return self.args.url.rstrip("/"), None
        self.tmp = Path(tempfile.mkdtemp(prefix="finegrain-load-"))
        index = self.tmp / "index"
        shutil.copytree(self.args.index.expanduser(), index, ignore=shutil.ignore_patterns(".lock"))
        port = free_port()
        cmd = [sys.executable, "-m", "finegrain", "serve", "--index", str(index), "--port", str(port),
               "--torch-threads", str(self.args.torch_threads)]
        self.log = open(self.tmp / "server.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); log: {self.tmp / 'server.log'}")
            try:
                get_json("127.0.0.1", port, "/api/health")
                return url, self.proc.pid
            except OSError:
                time.sleep(0.25)
        raise SystemExit("the server did not answer /api/health within 180 s")

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise SystemExit(f"refusing to load {url}: only http:// servers on loopback (127.0.0.0/8, ::1) are targets")
    return host, parts.port or 80


def get_json(host: str, port: int, path: str) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


# ------------------------------------------------------------------ queries
def load_queries(path: Path, n: int) -> list[str]:
    """``n`` distinct queries: Flickr8k captions if available, else generated phrases."""
    out, seen = [], set()
    if path and path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                text = " ".join(row["caption"].split()).rstrip(" .")
                if text and text.lower() not in seen:
                    seen.add(text.lower())
                    out.append(text)
                if len(out) == n:
                    return out
    subjects = ["a dog", "two children", "a man", "a woman", "a brown horse", "a group of people", "a black cat",
                "a girl in a red dress", "a cyclist", "a surfer"]
    actions = ["running", "jumping", "standing", "sitting", "playing", "walking", "climbing", "smiling"]
    places = ["on the beach", "in the snow", "on a street", "in a park", "near a lake", "on grass", "in a field",
              "by a fountain", "on a bridge", "in the water"]
    for s, a, p in itertools.product(subjects, actions, places):
        if len(out) == n:
            break
        out.append(f"{s} {a} {p}")
    while len(out) < n:
        out.append(f"{out[len(out) % 800]} at dusk {len(out)}")
    return out


# ------------------------------------------------------------------ load
def run_load(host: str, port: int, queries: list[str], args, max_seconds: float | None) -> dict:
    """Send one search per query from ``args.concurrency`` threads; latencies in ms and error counts."""
    latencies = np.full(len(queries), np.nan)
    errors: dict[str, int] = {}
    lock = threading.Lock()
    counter = itertools.count()
    deadline = time.monotonic() + max_seconds if max_seconds else None

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while True:
            i = next(counter)
            if i >= len(queries) or (deadline and time.monotonic() > deadline):
                break
            body = json.dumps({"text": queries[i], "k": args.k, "mode": args.mode})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                ok = response.status == 200 and "results" in json.loads(data)
                reason = None if ok else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                reason = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            if reason is None:
                latencies[i] = (time.perf_counter() - t0) * 1000
            else:
                with lock:
                    errors[reason] = errors.get(reason, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(min(args.concurrency, max(1, len(queries))))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    done = latencies[~np.isnan(latencies)]
    sent = min(next(counter), len(queries))
    pct = (lambda q: round(float(np.percentile(done, q)), 1)) if len(done) else (lambda q: None)
    return {"requests": sent, "ok": int(len(done)), "errors": int(sum(errors.values())), "error_kinds": errors,
            "seconds": round(seconds, 2), "throughput_rps": round(len(done) / seconds, 1) if seconds else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": pct(100),
            "mean_ms": round(float(done.mean()), 1) if len(done) else None}


class MemorySampler:
    """Resident memory of a process (from /proc) every ``interval`` seconds while in the ``with`` block."""

    def __init__(self, pid: int | None, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            if rss:
                self.samples.append(rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.pid:
            self._thread.join()
            rss = self._rss()
            if rss:
                self.samples.append(rss)

    def summary(self) -> dict:
        if not self.samples:
            return {"rss_start_mib": None, "rss_end_mib": None, "rss_peak_mib": None}
        mib = np.asarray(self.samples, float) / 2**20
        quarter = max(1, len(mib) // 4)
        return {"rss_start_mib": round(float(mib[0]), 1), "rss_end_mib": round(float(mib[-1]), 1),
                "rss_peak_mib": round(float(mib.max()), 1),
                "rss_first_quarter_mib": round(float(mib[:quarter].mean()), 1),
                "rss_last_quarter_mib": round(float(mib[-quarter:].mean()), 1), "rss_samples": len(mib),
                "rss_timeline_mib": [round(float(v), 1) for v in mib[np.linspace(0, len(mib) - 1, 11).astype(int)]]}


def print_table(r: dict) -> None:
    rows = [("images indexed", r["images"]), ("mode, k", f"{r['mode']}, {r['k']}"),
            ("requests (ok / errors)", f"{r['requests']} ({r['ok']} / {r['errors']})"),
            ("concurrency", r["concurrency"]), ("CPU cores (shared with the client)", r["cpu_cores"]),
            ("wall time s", r["seconds"]), ("throughput req/s", r["throughput_rps"]),
            ("latency p50 / p90 / p99 / max ms", f"{r['p50_ms']} / {r['p90_ms']} / {r['p99_ms']} / {r['max_ms']}"),
            ("server RSS start / end / peak MiB", f"{r['rss_start_mib']} / {r['rss_end_mib']} / {r['rss_peak_mib']}")]
    if r.get("rss_timeline_mib"):
        rows.append(("server RSS at 0, 10, ..., 100 % MiB", " ".join(str(v) for v in r["rss_timeline_mib"])))
    if r["error_kinds"]:
        rows.append(("error kinds", r["error_kinds"]))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
