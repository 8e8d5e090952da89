"""Anonymous memory of a searching process, step by step, on a large index; and what malloc_trim costs.

Usage::

    python -m experiments.anon_memory_steps INDEX
    PYTHONPATH=<a checkout of an older commit>/src python -m experiments.anon_memory_steps INDEX

Opens INDEX, then prints RssAnon / RssFile / VmHWM (MiB) after: opening (catalog records), loading the
model, loading the global ANN structure, building the segment table, an explicit glibc ``malloc_trim(0)``,
and one ``hierarchical`` search; then the time of five more ``malloc_trim`` calls. Since 3a61277 a
snapshot calls it after each derived build itself, so on later code the "segment table" step already
shows the trimmed figure. Produced "Freed heap given back" in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
import time

from finegrain.index import Index
from finegrain.retrieval import multivector as mvr
from finegrain.retrieval.dense import global_ann


def malloc_trim() -> None:  # called directly, so the probe also runs on code from before pages.release_free_heap
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory() -> dict[str, int]:
    found = re.findall(r"(RssAnon|RssFile|VmHWM):\s+(\d+)", open("/proc/self/status").read())
    return {k: int(v) // 1024 for k, v in found}


def main(path: str) -> None:
    index = Index.open(path)
    snap = index.snapshot
    print(json.dumps({"step": "open", "images": len(snap), **memory()}), flush=True)
    index.embed_query(text="a dog")
    print(json.dumps({"step": "model", **memory()}), flush=True)
    global_ann(snap)
    print(json.dumps({"step": "global ANN", **memory()}), flush=True)
    mvr.segment_table(snap)
    print(json.dumps({"step": "segment table", **memory()}), flush=True)
    malloc_trim()
    print(json.dumps({"step": "malloc_trim", **memory()}), flush=True)
    index.search(text="a dog runs on the beach", k=10, mode="hierarchical")
    print(json.dumps({"step": "one hierarchical search", **memory()}), flush=True)
    ms = []
    for _ in range(5):
        t0 = time.perf_counter()
        malloc_trim()
        ms.append(round((time.perf_counter() - t0) * 1000, 3))
    print(json.dumps({"malloc_trim_ms": ms}), flush=True)
    index.close()


if __name__ == "__main__":
    main(sys.argv[1])
