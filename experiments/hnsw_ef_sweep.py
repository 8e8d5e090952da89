"""Issue 15: recall@10 and latency of the global HNSW graph against efSearch, on a bench scale index.

    python -m experiments.hnsw_ef_sweep INDEX ../shared/data/flickr8k [QUERIES] [EF,EF,...] [--ivf] [--efc=N]
        [--split=train[,dev]] [--nprobe=8,16,...] [--no-hnsw]

The queries are bench scale's (dev captions, seed 0; ``--split=train`` draws them from the train captions, to
choose a breadth on queries that do not report it; ``--split=train,dev`` sweeps both against one build of
each structure), embedded once; each is searched alone (one at a time,
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
from finegrain.store.ann import exact_top_rows


def sweep(search, q: np.ndarray, exact: np.ndarray, settings: list[int], name: str = "efSearch", **row) -> None:
    """Each query alone through ``search(query, setting)`` at each setting; one JSON line per setting."""
    search(q[:1], settings[0])  # warm-up
    for setting in settings:
        times, found = [], []
        for i in range(len(q)):
            t0 = time.perf_counter()
            got = search(q[i:i + 1], setting)
            times.append((time.perf_counter() - t0) * 1000)
            found.append(len(set(got[0].tolist()) & set(exact[i].tolist())) / 10)
        print(json.dumps({**row, name: setting, "recall_at_10": float(np.mean(found)),
                          "p50_ms": float(np.percentile(times, 50)),
                          "p95_ms": float(np.percentile(times, 95))}), flush=True)


def hnsw_search(graph):
    return lambda x, ef: graph.search(x, 10, params=faiss.SearchParametersHNSW(efSearch=ef))[1]


def main() -> None:
    path, data = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    efs = [int(e) for e in (sys.argv[4] if len(sys.argv) > 4 else "64,128,256,512,1024,2048").split(",")]
    splits = next((a.partition("=")[2] for a in sys.argv if a.startswith("--split=")), "dev").split(",")
    probes = [int(p) for p in next((a.partition("=")[2] for a in sys.argv if a.startswith("--nprobe=")),
                                   "8,16,32,64,128").split(",")]
    index = Index.open(path)
    rows = index.snapshot.search_rows.vectors
    queries = {}
    for split in splits:  # each split's query vectors and their exact top 10
        q = np.stack([index.embed_query(text=t) for t in flickr8k_queries(data, split, n, 0)]).astype(np.float32)
        queries[split] = (q, exact_top_rows(rows, q, 10))
    if "--no-hnsw" not in sys.argv:
        ann = global_ann(index.snapshot)
        for split, (q, exact) in queries.items():
            sweep(hnsw_search(ann.faiss), q, exact, efs, images=len(rows), kind=ann.kind, split=split)
    for arg in sys.argv:  # --efc=N: a graph built here with efConstruction N (the product's: 80), same sweep
        if arg.startswith("--efc="):
            efc = int(arg.partition("=")[2])
            t0 = time.perf_counter()
            graph = faiss.IndexHNSWFlat(rows.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = efc
            graph.add(np.asarray(rows, np.float32))
            built = time.perf_counter() - t0
            for split, (q, exact) in queries.items():
                sweep(hnsw_search(graph), q, exact, efs, images=len(rows), kind="hnsw", efConstruction=efc,
                      build_s=built, split=split)
    if "--ivf" in sys.argv:  # the same rows in FAISS IVF-Flat (what `ann="ivf"` builds), nprobe swept
        from finegrain.store.ann import VectorIndex

        t0 = time.perf_counter()
        ivf = VectorIndex(np.asarray(rows, np.float32), kind="ivf")
        built = time.perf_counter() - t0
        for split, (q, exact) in queries.items():
            sweep(lambda x, nprobe: ivf.search(x, 10, breadth=nprobe)[1], q, exact, probes, "nprobe",
                  images=len(rows), kind="ivf", nlist=ivf.faiss.nlist, build_s=built, split=split)
    index.close()


if __name__ == "__main__":
    main()
