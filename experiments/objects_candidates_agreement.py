"""Top-10 agreement of ``objects-max`` with and without its candidate stage, on a real object index.

Produced the "objects-max candidate stage" table of docs/benchmarks.md ("Scale"):

    python -m experiments.objects_candidates_agreement INDEX ../shared/data/needles [N_CROPS]

INDEX: an index with objects (``finegrain index <needles scenes> --objects regions``). Queries: the
needles landmark queries, plus the pasted landmark box of up to N_CROPS indexed scenes (cropped from the
scene: "find this object elsewhere"). Reference: ``objects-max`` over every image (``candidates=0``).
Each query is embedded once; the stage and the object scoring are the retriever's own functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from finegrain import Index
from finegrain.objects import search as object_search
from finegrain.retrieval import Query
from finegrain.retrieval.object_candidates import candidate_positions
from finegrain.retrieval.objects import embed_object_query, object_table

SIZES = (10, 25, 50, 100, 200, 400)


def main() -> None:
    index = Index.open(sys.argv[1])
    data = Path(sys.argv[2])
    n_crops = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    gnd = json.loads((data / "gnd.json").read_text())
    indexed = {Path(r.path).name: r.path for r in index.records.values()}
    queries = [Query(image=data / "queries" / q["query"]) for q in gnd["queries"]]
    boxed = [s for s in gnd["scenes"] if s["landmark"] and s["image"] in indexed][:n_crops]
    queries += [Query(image=indexed[s["image"]], bbox=tuple(s["box"])) for s in boxed]
    snap, table = index.snapshot, object_table(index.snapshot)
    vectors = [embed_object_query(snap, q) for q in queries]
    full_ops = len(table.vectors)
    reference = [set(object_search.top(table.max_scores(v)[0], 10)[1].tolist()) for v in vectors]
    rows = []
    for size in (s for s in SIZES if s < len(index)):
        agree, ops, pools = [], [], []
        for v, ref in zip(vectors, reference):
            pool = candidate_positions(snap, v, size)
            scores, read = table.max_scores_at(v, pool)
            top = set(pool[object_search.top(scores, 10)[1]].tolist())
            agree.append(len(ref & top) / len(ref))
            ops.append(read)
            pools.append(len(pool))
        rows.append({"candidates": size, "agreement10": round(float(np.mean(agree)), 4),
                     "min_agreement10": round(float(np.min(agree)), 2),
                     "images_per_query": round(float(np.mean(pools)), 1),
                     "object_rows_per_query": round(np.mean(ops)),
                     "full_scan_rows": full_ops})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"index": sys.argv[1], "images": len(index), "queries": len(queries),
                      "landmark_queries": len(gnd["queries"]), "scene_crops": len(boxed)}))


if __name__ == "__main__":
    main()
