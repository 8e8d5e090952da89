"""The multi-vector candidate stage on HNSW (what ``ann="auto"`` switches to at 200,000 images): recall and work.

Usage::

    python -m experiments.hotpath_hnsw INDEX DATA [N_QUERIES] [N ...]

On a synthetic index of ``finegrain bench scale``: the global rows in an HNSW graph as the index builds it
(``store.ann.VectorIndex(kind="hnsw")``: M=32, efConstruction=80, efSearch=128; FAISS searches with
ef = max(efSearch, k)), the dev captions' query vectors (full query and rule sub-queries, seed 0). Per
candidate count N: recall of each query vector's HNSW top-N against the exact top-N, recall of the
stage's union, and the median time of one batched HNSW search against the exact one-pass scan (ratios
only on a loaded machine). Then ``hierarchical`` with the stage running on HNSW against ``exhaustive``
over every image (top-10 agreement), as ``finegrain bench scale`` would measure it at 1M.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from finegrain.bench.scale import flickr8k_queries
from finegrain.compress.storage import dot_rows
from finegrain.index import Index
from finegrain.retrieval import Query
from finegrain.retrieval import multivector as mvr
from finegrain.store.ann import VectorIndex


def main(argv: list[str]) -> None:
    path, data = argv[0], argv[1]
    n_queries = int(argv[2]) if len(argv) > 2 else 20
    sizes = [int(v) for v in argv[3:]] or [500, 2000]
    texts = flickr8k_queries(data, "dev", n_queries, 0)
    index = Index.open(path)
    snap = index.snapshot
    rows = np.ascontiguousarray(snap.global_rows.vectors, np.float32)
    t0 = time.perf_counter()
    hnsw = VectorIndex(rows, "hnsw", snap.cache_file("global"))  # cached next to the catalog, as search does
    print(f"{len(rows):,} global rows; HNSW ready in {time.perf_counter() - t0:.0f} s")
    params = mvr.MultiVectorParams()
    vectors = [mvr.query_vectors(snap, Query(text=t), params)[1] for t in texts]
    for n in sizes:
        per_vector, union, t_hnsw, t_exact = [], [], [], []
        for q in vectors:
            t0 = time.perf_counter()
            _, found = hnsw.search(q, n)
            t1 = time.perf_counter()
            scores = dot_rows(rows, q)
            exact = np.argpartition(-scores, n - 1, axis=0)[:n].T
            t2 = time.perf_counter()
            t_hnsw.append(t1 - t0)
            t_exact.append(t2 - t1)
            per_vector += [len(np.intersect1d(f[f >= 0], e)) / n for f, e in zip(found, exact)]
            got, want = np.unique(found[found >= 0]), np.unique(exact)
            union.append(len(np.intersect1d(got, want)) / len(want))
        print(f"N={n}: per-vector recall {np.mean(per_vector):.4f} (min {np.min(per_vector):.4f}), union recall "
              f"{np.mean(union):.4f}; one batched HNSW search {np.median(t_hnsw) * 1000:.1f} ms, exact one-pass "
              f"scan {np.median(t_exact) * 1000:.1f} ms (medians, {len(vectors[0])}-{max(map(len, vectors))} "
              "query vectors)")
    # End to end: the retriever's stage on the HNSW graph (the setting a 1M index gets from ann="auto").
    refs = [[h.id for h in index.search(text=t, k=10, mode="exhaustive", candidates=0)] for t in texts]
    snap.settings["ann"] = "hnsw"  # this process's snapshot only; the catalog is not changed
    for n in sizes:
        agree = []
        for t, ref in zip(texts, refs):
            got = [h.id for h in index.search(text=t, k=10, mode="hierarchical", candidates=n)]
            agree.append(len(set(ref) & set(got)) / max(1, len(ref)))
        print(f"hierarchical:candidates={n} on HNSW: top-10 agreement with exhaustive {np.mean(agree):.3f}")
    index.close()


if __name__ == "__main__":
    main(sys.argv[1:])
