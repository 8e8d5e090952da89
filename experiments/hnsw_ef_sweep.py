"""Issue 15: recall@10 and latency of the global HNSW graph against efSearch, on a bench scale index.

    python -m experiments.hnsw_ef_sweep INDEX ../shared/data/flickr8k [QUERIES] [EF,EF,...] [--ivf] [--efc=N]

The queries are bench scale's (dev captions, seed 0), embedded once; each is searched alone (one at a time,
as the bench times search) at each efSearch; recall@10 is against brute-force inner products over the
stored rows. Prints one JSON line per efSearch. docs/benchmarks.md ("One million images") has the results.
"""

import json
import sys
import time

import faiss
import numpy as np

from finegrain.bench.scale import flickr8k_queries
from finegrain.index import Index
from finegrain.retrieval.dense import global_ann


def main() -> None:
    path, data = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    efs = [int(e) for e in (sys.argv[4] if len(sys.argv) > 4 else "64,128,256,512,1024,2048").split(",")]
    index = Index.open(path)
    q = np.stack([index.embed_query(text=t) for t in flickr8k_queries(data, "dev", n, 0)]).astype(np.float32)
    rows = index.snapshot.search_rows.vectors
    exact = np.zeros((len(q), 0), np.int64)
    best = np.full((len(q), 0), -np.inf, np.float32)
    for start in range(0, len(rows), 65_536):  # exact top 10, block by block
        s = q @ np.asarray(rows[start:start + 65_536], np.float32).T
        best = np.concatenate([best, s], 1)
        exact = np.concatenate([exact, np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)], 1)
        keep = np.argsort(-best, 1, kind="stable")[:, :10]
        best, exact = np.take_along_axis(best, keep, 1), np.take_along_axis(exact, keep, 1)
    ann = global_ann(index.snapshot)
    for ef in efs:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        ann.faiss.search(q[:1], 10, params=params)  # warm-up
        times, found = [], []
        for i in range(len(q)):
            t0 = time.perf_counter()
            _, got = ann.faiss.search(q[i:i + 1], 10, params=params)
            times.append((time.perf_counter() - t0) * 1000)
            found.append(len(set(got[0].tolist()) & set(exact[i].tolist())) / 10)
        print(json.dumps({"images": len(rows), "kind": ann.kind, "efSearch": ef,
                          "recall_at_10": float(np.mean(found)), "p50_ms": float(np.percentile(times, 50)),
                          "p95_ms": float(np.percentile(times, 95))}), flush=True)
    for arg in sys.argv:  # --efc=N: a graph built here with efConstruction N (the product's: 80), same sweep
        if arg.startswith("--efc="):
            efc = int(arg.partition("=")[2])
            t0 = time.perf_counter()
            graph = faiss.IndexHNSWFlat(q.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = efc
            graph.add(np.asarray(rows, np.float32))
            built = time.perf_counter() - t0
            for ef in efs:
                params = faiss.SearchParametersHNSW(efSearch=ef)
                times, found = [], []
                for i in range(len(q)):
                    t0 = time.perf_counter()
                    _, got = graph.search(q[i:i + 1], 10, params=params)
                    times.append((time.perf_counter() - t0) * 1000)
                    found.append(len(set(got[0].tolist()) & set(exact[i].tolist())) / 10)
                print(json.dumps({"images": len(rows), "kind": "hnsw", "efConstruction": efc, "efSearch": ef,
                                  "build_s": built, "recall_at_10": float(np.mean(found)),
                                  "p50_ms": float(np.percentile(times, 50)),
                                  "p95_ms": float(np.percentile(times, 95))}), flush=True)
    if "--ivf" in sys.argv:  # the same rows in FAISS IVF-Flat (what `ann="ivf"` builds), nprobe swept
        from finegrain.store.ann import VectorIndex

        t0 = time.perf_counter()
        ivf = VectorIndex(np.asarray(rows, np.float32), kind="ivf")
        built = time.perf_counter() - t0
        for nprobe in (8, 16, 32, 64, 128):
            ivf.faiss.nprobe = nprobe
            times, found = [], []
            for i in range(len(q)):
                t0 = time.perf_counter()
                _, got = ivf.faiss.search(q[i:i + 1], 10)
                times.append((time.perf_counter() - t0) * 1000)
                found.append(len(set(got[0].tolist()) & set(exact[i].tolist())) / 10)
            print(json.dumps({"images": len(rows), "kind": "ivf", "nlist": ivf.faiss.nlist, "nprobe": nprobe,
                              "build_s": built, "recall_at_10": float(np.mean(found)),
                              "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}),
                  flush=True)
    index.close()


if __name__ == "__main__":
    main()
