"""Two probes of a multi-vector query at 1M images: mapped file pages in RSS, and query-encoding time.

Usage::

    python -m experiments.query_path_probes rss INDEX DATA [N_QUERIES]
    python -m experiments.query_path_probes encode INDEX DATA [N_QUERIES]

``rss``: ``hierarchical`` queries (the index's saved settings; Flickr8k dev captions, seed 0) in this fresh
process, then the resident MB of each mapping (``/proc/self/smaps``) after the first query and after all;
with ``--madvise-random`` every memory-mapped .npy is advised ``MADV_RANDOM`` first. ``encode``: the p50 of
one query's text encoding (rule decomposition, 3-4 texts) with the texts on one scoring worker and split
over the workers, back to back, then right after each of: an ``exhaustive`` scoring of every image, a sleep
of 10 ms, a sum over 120 MB, a pool ``dot_rows``. Produced "Memory" and "Query encoding" in
docs/benchmarks.md ("The fused candidate stage at 1M").
"""

from __future__ import annotations

import mmap
import re
import sys
import time
from collections import Counter

import numpy as np

from finegrain.bench.scale import flickr8k_queries
from finegrain.compress import storage
from finegrain.index import Index
from finegrain.retrieval import Query
from finegrain.retrieval import multivector as mvr
from finegrain.search import multivector as mv
from finegrain.store import vectors


def mapped_mb() -> Counter:
    out: Counter = Counter()
    name = "[anon]"
    for line in open("/proc/self/smaps"):
        m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if m:
            name = m.group(1) or "[anon]"
        elif line.startswith("Rss:"):
            out[name] += int(line.split()[1]) // 1024
    return out


def rss(path: str, data: str, n: int, random_advice: bool) -> None:
    if random_advice:
        plain = vectors.load_npy

        def advised(p, mmap_: bool = False, **kw):  # type: ignore[no-untyped-def]
            arr = plain(p, mmap=kw.get("mmap", mmap_))
            if getattr(arr, "_mmap", None) is not None:
                arr._mmap.madvise(mmap.MADV_RANDOM)
            return arr
        vectors.load_npy = advised  # type: ignore[assignment]
    index = Index.open(path)
    texts = flickr8k_queries(data, "dev", n, 0)
    for i, t in enumerate(texts):
        index.search(text=t, k=10, mode="hierarchical")
        if i in (0, len(texts) - 1):
            c = mapped_mb()
            print(f"after {i + 1} queries: {sum(c.values())} MB resident")
            for name, mb in c.most_common(4):
                print(f"  {mb:6d} MB  {name[-70:]}")


def encode(path: str, data: str, n: int) -> None:
    index = Index.open(path)
    snap = index.snapshot
    texts = flickr8k_queries(data, "dev", n, 0)
    params = mvr.MultiVectorParams()
    queries = [mvr.query_vectors(snap, Query(text=t), params)[1] for t in texts]
    table, glob, cfg = mvr.segment_table(snap), snap.global_rows.vectors, params.config()
    big = np.random.default_rng(0).random(30_000_000).astype(np.float32)
    rows = np.random.default_rng(1).random((20_000, 512)).astype(np.float32)
    workers = storage.scoring_workers

    def p50(between=None, one_worker: bool = False) -> float:
        storage.scoring_workers = (lambda: 1) if one_worker else workers  # type: ignore[assignment]
        ms = []
        for t, q in zip(texts, queries):
            t0 = time.perf_counter()
            mvr.query_vectors(snap, Query(text=t), params)
            ms.append((time.perf_counter() - t0) * 1000)
            if between is not None:
                between(q)
        storage.scoring_workers = workers  # type: ignore[assignment]
        return float(np.median(ms))

    p50()  # warm-up
    print(f"one worker, back to back: {p50(one_worker=True):.1f} ms")
    print(f"split over {workers()} workers, back to back: {p50():.1f} ms")
    exhaustive = p50(lambda q: mv.search("exhaustive", table, glob, q, 10, cfg))
    print(f"after an exhaustive scoring of every image: {exhaustive:.1f} ms")
    print(f"after a 10 ms sleep: {p50(lambda q: time.sleep(0.01)):.1f} ms")
    print(f"after a sum over 120 MB: {p50(lambda q: big.sum()):.1f} ms")
    print(f"after a pool dot_rows: {p50(lambda q: storage.dot_rows(rows, q)):.1f} ms")


def main(argv: list[str]) -> None:
    probe, path, data = argv[0], argv[1], argv[2]
    n = int(argv[3]) if len(argv) > 3 and argv[3].isdigit() else 20
    if probe == "rss":
        rss(path, data, n, "--madvise-random" in argv)
    else:
        encode(path, data, n)


if __name__ == "__main__":
    main(sys.argv[1:])
