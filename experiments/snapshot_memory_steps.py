"""Where a large index's memory goes, step by step: the model, the global rows, the ANN graph, each query.

Usage: python -m experiments.snapshot_memory_steps INDEX_DIR MODE [MODE ...]
Prints VmHWM / VmRSS / RssAnon / RssFile (MiB) and the memory Python and numpy hold (tracemalloc, MiB)
after loading the model, after reading the global rows, after the global ANN structure, and after one
query of each MODE, then the 12 largest allocation sites. Produced the "Memory changes behind these rows"
table of docs/benchmarks.md (issue 15, the 1M synthetic index of `bench scale`).
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in KEYS:
            out[key] = int(line.split()[1]) // 1024
    return out


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    tracemalloc.start()
    from finegrain.index import Index
    from finegrain.retrieval.dense import global_ann

    index = Index.open(sys.argv[1])
    index.embed_query(text="a dog")

    def report(step: str) -> None:
        print(step, status(), "traced MiB", tracemalloc.get_traced_memory()[0] >> 20, flush=True)

    report("model")
    rows = index.snapshot.global_rows
    report(f"global rows {rows.vectors.shape}")
    global_ann(index.snapshot)
    report("ann")
    for mode in sys.argv[2:]:
        t0 = time.perf_counter()
        index.search(text="a dog runs on the beach", k=10, mode=mode)
        report(f"{mode} ({time.perf_counter() - t0:.2f} s)")
    for stat in tracemalloc.take_snapshot().statistics("lineno")[:12]:
        print(stat)
    index.close()


if __name__ == "__main__":
    main()
