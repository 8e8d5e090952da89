"""Report a tuned candidate stage on held-out captions: top-10 agreement with exhaustive, NDCG@10, per size.

Produced the "Candidate stage chosen on train, reported on dev" table of docs/benchmarks.md ("Scale"):

    python -m experiments.candidates_dev_report INDEX ../shared/data/flickr8k [N_CAPTIONS]

INDEX: the dev index into which ``finegrain tune --tune-on <train index> --candidates-only`` saved its choice.
Every size of the tune grid below the index's image count is measured (the saved one marked), with the
index's saved scheduler settings, on the first caption of N dev images (its own image relevant).
Nothing here chooses: the choice was made on train.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from finegrain import Index
from finegrain.datasets import load_flickr8k
from finegrain.decompose.query import RulesDecomposer, decompose_query
from finegrain.eval.metrics import ndcg_at_k
from finegrain.retrieval.multivector import candidate_positions
from finegrain.search import multivector as mv
from finegrain.tune import CANDIDATE_GRID


def main() -> None:
    index = Index.open(sys.argv[1])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    ds = load_flickr8k(sys.argv[2], "dev")
    id_of = {Path(r.path).name: r.id for r in index.records.values()}
    picked = list(range(0, len(ds.captions), 5))[:n]  # the first caption of each image: every image once
    captions, targets = [ds.captions[i] for i in picked], [id_of[ds.images[ds.caption_image[i]]] for i in picked]
    embedded = [index.encoder.encode_texts(decompose_query(c, RulesDecomposer())) for c in captions]
    saved = index.search_config_dict()
    config = mv.MultiVectorConfig.from_dict(saved.get("multivector", {}))
    snap, table, glob, owners = index.snapshot, index.segment_table, index.global_rows.vectors, index.global_rows.owners
    reference = [set(mv.search("exhaustive", table, glob, q, 10, config)[1].tolist()) for q in embedded]
    rows = []
    for size in (0, *(c for c in CANDIDATE_GRID if c < len(index))):
        agree, ranks, ops, t0 = [], [], 0, time.perf_counter()
        for q, ref, target in zip(embedded, reference, targets):
            stage = candidate_positions(snap, q, size) if size else None
            _, pos, stats = mv.search("hierarchical", table, glob, q, 10, config, stage)
            agree.append(len(ref & set(pos.tolist())) / 10)
            ids = owners[pos].tolist()
            ranks.append(ids.index(target) if target in ids else np.inf)
            ops += stats.sim_ops
        rows.append({"candidates": size, "saved": size == saved.get("candidates", 0), "agreement10": round(
            float(np.mean(agree)), 4), "ndcg10": round(float(ndcg_at_k(np.array(ranks), 10)), 4),
            "sim_ops": round(ops / len(picked)),
            "ms_per_query": round((time.perf_counter() - t0) * 1000 / len(picked), 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"index": sys.argv[1], "captions": len(picked), "config": config.to_dict(),
                      "saved_candidates": saved.get("candidates"), "tuned": saved.get("tuned", {}).get("candidates")}))


if __name__ == "__main__":
    main()
