"""Hostile requests against a real ``finegrain serve`` on loopback: count 5xx answers and dropped connections.

Builds a small segmented index of scikit-image's sample photos, starts
``finegrain serve`` on a free loopback port (the real CLI, uvicorn and its
protocol), and sends N generated requests over raw sockets from a few
threads. The mix (one kind drawn per request):

* ``traversal``: thumbnail ids and static paths with ``..``, encoded
  slashes, NUL bytes, absolute paths, huge and non-ASCII ids;
* ``oversized``: bodies declared or actually over the limits, a body longer
  than its Content-Length, chunked bodies beyond the limit, an 11 MiB upload;
* ``huge_k``: k as huge, negative, fractional, inf/NaN, strings, lists;
* ``bad_json``: truncated, mutated, deeply nested, invalid UTF-8, lone
  surrogates, wrong types, unknown fields, random JSON values;
* ``bad_multipart``: wrong or missing boundaries, truncated parts, random
  bytes, mutated JPEG/PNG/GIF uploads with random form fields and boxes;
* ``long_query``: texts from 500 to 60,000 characters of random Unicode;
* ``random_bytes``: random bytes (sometimes after a valid request line);
* ``random_http``: random methods, paths, headers and bodies;
* ``rebinding``: well-formed requests addressed to a foreign Host, as a
  DNS-rebinding page would send them (must answer 421 ``bad_host``);
* ``valid``: well-formed searches, explains, thumbnails (must answer 200);
* ``slow``: a few clients that stall in the headers or the body (each
  waits for the server's deadline; run on their own threads).

A response is counted by status class; a "connection error" is a
connection closed or reset without any response. Goal: zero 5xx and zero
connection errors, and every 4xx carries a JSON body.

    python -m tools.stress.hostile_requests --requests 10000 --threads 4 --json
"""

from __future__ import annotations

import argparse
import collections
import io
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

ROOT = Path(__file__).resolve().parents[2]

TRAVERSAL = ["..%2F..%2F..%2Fetc%2Fpasswd", "../../../etc/passwd", "%2Fetc%2Fpasswd", "..", "%2e%2e%2f%2e%2e",
             "1%00.jpg", "1/../../etc/passwd", "....//....//etc/passwd", "%252e%252e%252f", "9" * 40,
             str(2**63), "-1", "1e3", "0x10", "\u0661", "%EF%BC%91", "1;ls", "$(id)", "%0d%0aX-Injected:1", "~root",
             "C:%5CWindows%5Cwin.ini", "1.0", "+1", " 1", "%20", "", "null", "[1]"]
STATIC_TRAVERSAL = ["../pyproject.toml", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/cli.py", "....//app.py",
                    "/etc/passwd", "index.html%00.js", "..\\..\\app.py"]
ENDPOINTS = ["/api/search", "/api/search/image", "/api/explain", "/api/explain/image", "/api/thumbnail/1",
             "/api/stats", "/api/health", "/api/reload", "/", "/static/app.js", "/openapi.json", "/api/nope",
             "/docs", "/api", "/api/search/", "//api//search"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def build_index(work: Path) -> tuple[Path, list[bytes]]:
    """A segmented index of the scikit-image photos; returns it and sample image bytes (JPEG, PNG, GIF)."""
    from PIL import Image
    from skimage import data

    from finegrain import Index
    from finegrain.decompose.segments import SegmentConfig

    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    samples = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        img = Image.fromarray(getattr(data, name)())
        img.save(photos / f"{name}.jpg", quality=90)
        small = img.resize((img.width // 4, img.height // 4))
        for fmt in ("JPEG", "PNG", "GIF"):
            buf = io.BytesIO()
            small.convert("RGB" if fmt == "JPEG" else small.mode).save(buf, fmt)
            samples.append(buf.getvalue())
    index = Index.create(work / "index", segments=SegmentConfig(levels=(4, 9)))
    index.add([photos])
    index.close()
    return work / "index", samples


# ----------------------------------------------------------------------------- request generators
def _request(method: str, path: str, body: bytes = b"", headers: dict | None = None, length: int | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    hdrs = dict(headers or {})
    if body or length is not None or method in ("POST", "PUT"):
        hdrs.setdefault("Content-Length", str(len(body) if length is None else length))
    head += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body


def _json_req(path: str, obj) -> bytes:
    return _request("POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def _multipart(fields: dict, files: dict, boundary: str = "fgboundary") -> tuple[bytes, dict]:
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode())
        out.write(value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass"))
        out.write(b"\r\n")
    for name, (filename, data, ctype) in files.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 20)):
        op = rng.random()
        if op < 0.5 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.7 and b:
            del b[rng.randrange(len(b)):][: rng.randint(1, 200)]
        elif op < 0.85:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = os.urandom(rng.randint(1, 64))
        else:
            b = b[: rng.randint(0, len(b))]
    return bytes(b)


def _random_text(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0xA0, 0x2FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F6FF), (0x0, 0x1F),
             (0x300, 0x36F), (0x202A, 0x202E)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def _random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([None, True, False, rng.randint(-2**70, 2**70), rng.random() * 1e6, "", "a cat",
                           _random_text(rng, rng.randint(0, 30)), -0.0, 1e308])
    if r < 0.65:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["text", "k", "mode", "explain", "id", "box", _random_text(rng, 5)]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


class Generator:
    """Draws one hostile request (raw bytes) of a random kind."""

    KINDS = ["traversal", "oversized", "huge_k", "bad_json", "bad_multipart", "long_query", "random_bytes",
             "random_http", "valid", "rebinding"]
    WEIGHTS = [12, 6, 12, 20, 16, 8, 6, 12, 8, 4]

    def __init__(self, rng: random.Random, samples: list[bytes]):
        self.rng = rng
        self.samples = samples

    def draw(self) -> tuple[str, bytes]:
        kind = self.rng.choices(self.KINDS, self.WEIGHTS)[0]
        return kind, getattr(self, kind)()

    def traversal(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.7:
            return _request("GET", "/api/thumbnail/" + rng.choice(TRAVERSAL))
        return _request("GET", "/static/" + rng.choice(STATIC_TRAVERSAL))

    def oversized(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.3:  # declared far over the limit, tiny body
            return _request("POST", rng.choice(["/api/search", "/api/search/image", "/api/explain"]), b"{}",
                            {"Content-Type": "application/json"}, length=rng.choice([10**7, 10**12, 2**63, 70_000]))
        if r < 0.55:  # actually over the JSON limit
            return _json_req("/api/search", {"text": "a " * rng.randint(33_000, 60_000)})
        if r < 0.7:  # chunked JSON beyond the limit
            chunk = b"x" * 8192
            body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
            return _request("POST", "/api/search", body, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        if r < 0.85:  # Content-Length smaller than the body: the rest is a broken second request
            return _request("POST", "/api/search", b'{"text": "a cat"}' + b"x" * 5000, {"Content-Type": "application/json"},
                            length=10)
        # an image upload over the image limit (11 MiB)
        body, headers = _multipart({"k": "3"}, {"image": ("big.jpg", b"\xff" * (11 * 2**20), "image/jpeg")})
        return _request("POST", "/api/search/image", body, headers)

    def huge_k(self) -> bytes:
        rng = self.rng
        k = rng.choice([10**6, 10**12, 10**30, -1, 0, 101, 1.5, "1e9", "ten", None, [], {}, True, 2**63, -2**63])
        if rng.random() < 0.5:
            path = rng.choice(["/api/search", "/api/explain"])  # "id" only where declared: unknown fields are a 422
            return _json_req(path, {"text": "a cat", "k": k, **({"id": 1} if path == "/api/explain" else {})})
        if rng.random() < 0.3:
            return _request("POST", "/api/search", b'{"text": "a cat", "k": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1" * 5000]) + b"}",
                            {"Content-Type": "application/json"})
        body, headers = _multipart({"k": str(k)}, {"image": ("q.jpg", rng.choice(self.samples), "image/jpeg")})
        return _request("POST", "/api/search/image", body, headers)

    def bad_json(self) -> bytes:
        rng = self.rng
        valid = json.dumps({"text": "a cat on a mat", "k": 5, "mode": rng.choice(["global", "hierarchical"])}).encode()
        r = rng.random()
        if r < 0.25:
            body = _mutate(valid, rng)
        elif r < 0.35:
            depth = rng.choice([100, 1000, 5000, 20_000])
            body = b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
        elif r < 0.45:
            body = b'{"text": "' + os.urandom(rng.randint(1, 100)) + b'"}'  # invalid UTF-8
        elif r < 0.55:
            body = b'{"text": "a \\ud800 cat \\udfff", "k": 3}'  # lone surrogates
        elif r < 0.65:
            body = b'{"text": "a", "text": "b", "k": 1, "k": 2}'
        elif r < 0.75:
            body = b"\xef\xbb\xbf" + valid  # BOM
        else:
            body = json.dumps(_random_json(rng)).encode()
        ctype = rng.choice(["application/json", "application/json; charset=latin-1", "text/plain", "", "application/x-www-form-urlencoded", "application/json; charset=utf-16"])
        return _request("POST", rng.choice(["/api/search", "/api/explain", "/api/reload"]), body,
                        {"Content-Type": ctype} if ctype else {})

    def bad_multipart(self) -> bytes:
        rng = self.rng
        image = rng.choice(self.samples)
        if rng.random() < 0.6:
            image = _mutate(image, rng)
        fields = {}
        for name in ("k", "mode", "box", "explain", "id"):
            if rng.random() < 0.5:
                fields[name] = rng.choice(["3", "-1", "0", "1e9", "global", "hierarchical", "bogus", "1,2,3,4",
                                           "0,0,10000,10000", "nan,1,2,3", "inf,0,1,1", "5,5,5,5", "true", "", "1"])
        body, headers = _multipart(fields, {"image": ("q.jpg", image, rng.choice(["image/jpeg", "text/plain", "", "image/png"]))})
        r = rng.random()
        if r < 0.2:
            body = _mutate(body, rng)
        elif r < 0.3:
            headers = {"Content-Type": "multipart/form-data"}  # no boundary
        elif r < 0.4:
            headers = {"Content-Type": "multipart/form-data; boundary=other"}
        elif r < 0.5:
            body = body[: rng.randint(0, len(body))]
        elif r < 0.55:
            body, headers = os.urandom(rng.randint(0, 4000)), {"Content-Type": "multipart/form-data; boundary=x"}
        return _request("POST", rng.choice(["/api/search/image", "/api/explain/image"]), body, headers)

    def long_query(self) -> bytes:
        rng = self.rng
        text = _random_text(rng, rng.choice([501, 2_000, 10_000, 20_000]))
        path = rng.choice(["/api/search", "/api/explain"])
        return _json_req(path, {"text": text, "k": 5, **({"id": 1} if path == "/api/explain" else {})})

    def random_bytes(self) -> bytes:
        rng = self.rng
        junk = os.urandom(rng.randint(1, 4096))
        if rng.random() < 0.5:
            return b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + str(len(junk)).encode() + b"\r\n\r\n" + junk
        if rng.random() < 0.3:
            return b"GET /" + junk[:200].replace(b" ", b"_") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        return junk

    def random_http(self) -> bytes:
        rng = self.rng
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO"])
        path = rng.choice(ENDPOINTS) + rng.choice(["", "?k=5", "?" + "a=" * 200, "?text=%ff%fe", "#frag", "/.."])
        headers = {}
        for _ in range(rng.randint(0, 4)):
            headers[rng.choice(["Content-Type", "X-API-Key", "Authorization", "Accept", "Range", "Expect",
                                "X-Forwarded-For", _random_text(rng, 6).encode("ascii", "ignore").decode() or "X"])] = rng.choice(
                ["application/json", "Bearer " + "k" * 3000, "bytes=0-1", "100-continue", "*/*", "\u00ff", "x" * 8000])
        body = json.dumps(_random_json(rng)).encode() if method in ("POST", "PUT", "PATCH") else b""
        return _request(method, path, body, headers)

    def rebinding(self) -> bytes:
        host = self.rng.choice(["attacker.example", "attacker.example:8000", "127.0.0.1.nip.io", "localhost.evil.test",
                                "192.168.0.10", "[fe80::1]:80", "xn--80ak6aa92e.com", "LOCALHOST.evil"])
        raw = self.valid()
        return raw.replace(b"Host: 127.0.0.1\r\n", b"Host: " + host.encode() + b"\r\n", 1)

    def valid(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return _json_req("/api/search", {"text": rng.choice(["a cat", "a rocket on a launch pad", "coffee and a cup",
                                                                  "coins"]), "k": rng.randint(1, 10),
                                             "mode": rng.choice(["global", "hierarchical", "single", "exhaustive"]),
                                             "explain": rng.random() < 0.2})
        if r < 0.6:
            return _request("GET", f"/api/thumbnail/{rng.randint(1, 6)}")
        if r < 0.8:
            return _json_req("/api/explain", {"text": "a cat", "id": rng.randint(1, 6), "mode": "hierarchical"})
        body, headers = _multipart({"k": "3"}, {"image": ("q.png", rng.choice(self.samples), "image/png")})
        return _request("POST", "/api/search/image", body, headers)


# ----------------------------------------------------------------------------- sending
def send(host: str, port: int, raw: bytes, timeout: float = 60.0, half_close: bool = False
         ) -> tuple[int | None, bytes, str | None]:
    """Send ``raw``; returns (status or None, response bytes, error or None).

    ``half_close`` shuts the sending side after ``raw`` (for random bytes
    that may not form a complete request: uvicorn then closes at once
    instead of waiting for the header deadline; no answer is expected).

    A server that answers before it has read the whole request (413, 408)
    may reset the connection while we are still sending; the answer is
    still read when it arrived.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    chunks, error = [], None
    try:
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError) as exc:
            error = f"send: {type(exc).__name__}"
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (ConnectionResetError, socket.timeout) as exc:
            error = error or f"recv: {type(exc).__name__}"
    finally:
        sock.close()
    response = b"".join(chunks)
    if response.startswith(b"HTTP/1."):
        try:
            return int(response.split(b" ", 2)[1]), response, None
        except (IndexError, ValueError):
            pass
    return None, response, error or "no response"


def _is_json_body(response: bytes, head_request: bool = False) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    if b"content-type: application/json" not in head.lower():
        return False
    if head_request:
        return True  # a HEAD answer has headers only
    if b"transfer-encoding: chunked" in head.lower():
        return True  # not de-chunked here; the content type is enough
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return isinstance(obj, dict) and "error" in obj


def slow_clients(host: str, port: int, n: int) -> list[dict]:
    """``n`` clients that stall (silent, trickling headers, stalled body); each must get a 408 JSON or a close."""
    results = []

    def one(kind: str) -> None:
        sock = socket.create_connection((host, port), timeout=120)
        t0 = time.monotonic()
        try:
            if kind == "trickle":
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                for i in range(200):  # one header line every 0.5 s, forever unless the server stops it
                    sock.sendall(b"X-Slow-%d: 1\r\n" % i)
                    time.sleep(0.5)
            elif kind == "body":
                sock.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"text\": ")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (BrokenPipeError, ConnectionResetError):
            data = b""
            try:
                data = sock.recv(65536)
            except OSError:
                pass
        finally:
            sock.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None
        results.append({"kind": kind, "status": status, "json": _is_json_body(data) if status else False,
                        "seconds": round(time.monotonic() - t0, 1)})

    threads = [threading.Thread(target=one, args=(k,)) for k in (["silent", "trickle", "body"] * n)[:n]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run(n: int, threads: int, seed: int, url: str | None = None, work: Path | None = None, slow: int = 9,
        log=print) -> dict:
    """Start a server (unless ``url``), send ``n`` hostile requests, and return the counts."""
    tmp = None
    proc = None
    if url is None:
        tmp = tempfile.mkdtemp(prefix="finegrain-hostile-")
        work = work or Path(tmp)
        index, samples = build_index(work)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_file = open(work / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "finegrain.cli", "serve", "--index", str(index), "--port", str(port)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=_env())
        host = "127.0.0.1"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status, _, _ = send(host, port, _request("GET", "/api/health"), timeout=5)
                if status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start")
    else:
        host, port = url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])
        samples = build_index(Path(tempfile.mkdtemp()))[1]
    rss_before = _rss(proc.pid) if proc else None
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    statuses = collections.Counter()
    failures: list[dict] = []
    lock = threading.Lock()
    next_i = [0]
    t0 = time.monotonic()

    def worker(wid: int) -> None:
        rng = random.Random(seed * 1000 + wid)
        gen = Generator(rng, samples)
        while True:
            with lock:
                if next_i[0] >= n:
                    return
                next_i[0] += 1
                i = next_i[0]
            kind, raw = gen.draw()
            try:
                status, response, error = send(host, port, raw, half_close=kind == "random_bytes")
            except OSError as exc:
                status, response, error = None, b"", f"connect: {type(exc).__name__}"
            with lock:
                klass = "conn_error" if status is None else f"{status // 100}xx"
                counts[kind][klass] += 1
                if status is not None:
                    statuses[status] += 1
                bad = (status is None and kind not in ("random_bytes",)) or (status is not None and status >= 500) \
                    or (status is not None and 400 <= status < 500 and not _is_json_body(response, raw.startswith(b"HEAD "))) \
                    or (kind == "valid" and status != 200) or (kind == "rebinding" and status != 421)
                if status is None and kind == "random_bytes" and not error:
                    bad = True
                if bad and len(failures) < 50:
                    failures.append({"kind": kind, "status": status, "error": error, "request": raw[:300].decode("latin-1"),
                                     "response": response[:400].decode("latin-1")})
                if i % 1000 == 0:
                    log(f"{i} requests, {dict(statuses)}")

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.monotonic() - t0
    slow_results = slow_clients(host, port, slow) if slow else []
    alive, _, _ = send(host, port, _request("GET", "/api/health"))
    rss_after = _rss(proc.pid) if proc else None
    if proc:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()
        server_log = (work / "server.log").read_text(errors="replace")
        tracebacks = server_log.count("Traceback")
        log_tail = server_log[-6000:] if tracebacks or proc.returncode not in (0, -15) else ""
    else:
        tracebacks, log_tail = None, ""
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    non_json_4xx = sum(1 for f in failures if f["status"] and 400 <= f["status"] < 500)
    return {
        "requests": n, "threads": threads, "seconds": round(seconds, 1),
        "by_class": dict(total), "by_status": {str(k): v for k, v in sorted(statuses.items())},
        "by_kind": {k: dict(v) for k, v in counts.items()},
        "5xx": total.get("5xx", 0),
        "connection_errors": total.get("conn_error", 0),
        "connection_errors_random_bytes": counts["random_bytes"].get("conn_error", 0),
        "non_json_4xx_seen": non_json_4xx,
        "valid_not_200": sum(1 for f in failures if f["kind"] == "valid"),
        "rebinding_not_421": sum(1 for f in failures if f["kind"] == "rebinding"),
        "slow_clients": slow_results,
        "alive_after": alive == 200,
        "server_tracebacks_logged": tracebacks,
        "server_rss_mb": [round(rss_before / 2**20, 1) if rss_before else None,
                          round(rss_after / 2**20, 1) if rss_after else None],
        "failures": failures,
        "server_log_tail": log_tail,
    }


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow", type=int, default=9, help="Slow clients (each waits for a server deadline).")
    parser.add_argument("--url", default=None, help="Target a running server on loopback instead of starting one.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.url and not args.url.startswith(("http://127.", "http://localhost")):
        parser.error("--url must be a loopback address")
    result = run(args.requests, args.threads, args.seed, args.url, slow=args.slow,
                 log=lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps({k: v for k, v in result.items() if k not in ("failures", "server_log_tail", "by_kind")}))
        for f in result["failures"][:20]:
            print(f)
        print(result["server_log_tail"])
    ok = result["5xx"] == 0 and result["connection_errors"] - result["connection_errors_random_bytes"] == 0 \
        and not result["failures"] and result["alive_after"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
