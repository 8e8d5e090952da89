"""Where the time of the ``l2g`` neighbour graph goes, and the graph before and after a change (docs/benchmarks.md,
"Every field at 100,000 images": the ``l2g`` row).

Opens an index with local features, builds (or reads from its cache) the approximate Chamfer structure, then
for ``--sample`` database images (evenly spaced) times the two parts of one neighbour list: the FAISS search of
the image's query descriptors, and the aggregation of the matches into image scores; then
:func:`finegrain.local.chamfer.knn_graph` on the sample as the graph build runs it. ``--queries`` and
``--features`` pick what each image queries with (``LocalSearcher(graph_queries=, graph_features=)``);
``--save`` keeps the sample's lists and ``--against`` compares with saved ones (same ids in place, and the
share of the saved lists' images found)::

    .venv/bin/python -m experiments.l2g_graph_cost INDEX --sample 64 --save all.npz
    .venv/bin/python -m experiments.l2g_graph_cost INDEX --sample 64 --queries representatives --against all.npz
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--sample", type=int, default=256, help="database images timed")
    ap.add_argument("--save", help="write the sample's neighbour lists here (.npz)")
    ap.add_argument("--against", help="compare the sample's lists with these (.npz from --save)")
    ap.add_argument("--queries", default="all", help="what each image queries with: all or representatives")
    ap.add_argument("--features", type=int, help="only the strongest n of those")
    args = ap.parse_args()

    from finegrain import Index
    from finegrain.local.chamfer import graph_query_sets, knn_graph
    from finegrain.retrieval.local import local_searcher

    with Index.open(args.index) as index:
        searcher = local_searcher(index.snapshot)
        t0 = time.perf_counter()
        approx = searcher.approx()
        build_s = time.perf_counter() - t0
        db = approx.db
        n = db.n_images
        part = np.unique(np.linspace(0, n - 1, min(args.sample, n)).astype(np.int64))
        queries = graph_query_sets(approx, part, args.queries, args.features)
        search_ms, total_ms = [], []
        for q in queries:
            t0 = time.perf_counter()
            approx.neighbours(np.ascontiguousarray(q, np.float32))
            t1 = time.perf_counter()
            approx.score_all(q)
            t2 = time.perf_counter()
            search_ms.append((t1 - t0) * 1e3)
            total_ms.append((t2 - t1) * 1e3)
        row = {"images": n, "indexed_rows": len(approx.rows), "descriptors": db.n_rows,
               "sample": len(part), "queries": args.queries, "features": args.features,
               "query_descriptors_per_image": round(float(np.mean([len(q) for q in queries])), 1),
               "knn": approx.knn, "nprobe": approx.nprobe, "approx_build_s": round(build_s, 1),
               "faiss_search_ms_per_image": round(float(np.mean(search_ms)), 2),
               "score_all_ms_per_image": round(float(np.mean(total_ms)), 2)}
        row["aggregation_ms_per_image"] = round(row["score_all_ms_per_image"] - row["faiss_search_ms_per_image"], 2)
        t0 = time.perf_counter()
        ids, sims = knn_graph(approx, searcher.graph_m, part, args.features, args.queries)
        row["knn_graph_ms_per_image"] = round((time.perf_counter() - t0) * 1e3 / len(part), 2)
        row["projected_graph_min"] = round(row["knn_graph_ms_per_image"] * n / 60e3, 1)
        if args.save:
            np.savez(args.save, ids=ids, sims=sims)
        if args.against:
            with np.load(args.against) as z:
                row["same_ids"] = float(np.mean(z["ids"] == ids))
                # the share of the reference lists' images this list also holds (order aside)
                row["list_overlap"] = float(np.mean([len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(1, (a >= 0).sum())
                                                     for a, b in zip(z["ids"], ids)]))
                row["max_sim_difference"] = float(np.max(np.abs(z["sims"] - sims)))
        print(json.dumps(row))


if __name__ == "__main__":
    main()
