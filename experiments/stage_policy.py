"""Which candidate stage feeds ``hierarchical`` best at 1M images: per-vector union or one fused vector.

Usage::

    python -m experiments.stage_policy INDEX DATA SPLIT N_QUERIES REFS.json [SIZES] [CONFIGS]

The multi-vector score is ``w <q_0, g_d> + (1 - w) mean_j seg_j(d)``. The stage in the product (``union``)
takes each query vector's top n global hits and scores their union. ``fused`` takes the top n of one
vector, ``u = w q_0 + (1 - w) mean_j q_j``: the same score with each best segment replaced by the whole
image's global vector, a linear proxy one ANN search answers. ``fused+union/8`` adds each vector's own
top n/8 to the fused top n.

Per policy and size n: recall of the reference top 10 (``exhaustive`` over every image, cached in
REFS.json keyed by query text, since it reads every segment row), the stage's ms, and, per scheduler
configuration (``T/alpha/tau``, comma-separated in CONFIGS, ``;``-separated), ``hierarchical``'s top-10
agreement with the reference and the ms of stage + scoring. Queries: SPLIT's Flickr8k captions, seed 0.
Prints one JSON object per line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from finegrain.bench.scale import flickr8k_queries
from finegrain.index import Index
from finegrain.retrieval import Query
from finegrain.retrieval import multivector as mvr
from finegrain.search import multivector as mv


def stage(snap, q: np.ndarray, policy: str, n: int, w: float) -> np.ndarray:
    """Ascending positions of the policy's candidates."""
    if policy in mvr.STAGES:
        return mvr.candidate_positions(snap, q, n, None, policy, w)
    assert policy == "fused+union/8"
    pos = np.concatenate([mvr.candidate_positions(snap, q, n, None, "fused", w),
                          mvr.candidate_positions(snap, q, max(1, n // 8))])
    return np.unique(pos)


def main(argv: list[str]) -> None:
    path, data, split, n_queries, refs_path = argv[0], argv[1], argv[2], int(argv[3]), Path(argv[4])
    sizes = [int(v) for v in argv[5].split(",")] if len(argv) > 5 else [250, 500, 1000, 2000, 4000]
    configs = [tuple(float(x) for x in c.split("/")) for c in argv[6].split(";")] if len(argv) > 6 else \
        [(0.5, 0.8, 0.9), (0.5, 0.8, 1.01), (0.3, 0.8, 1.01)]
    texts = flickr8k_queries(data, split, n_queries, 0)
    index = Index.open(path)
    snap = index.snapshot
    params = mvr.MultiVectorParams.from_options({}, {**snap.search_settings.get("multivector", {})},
                                                mode="hierarchical")
    base = params.config()
    table, glob = mvr.segment_table(snap), snap.global_rows.vectors
    vectors = [mvr.query_vectors(snap, Query(text=t), params)[1] for t in texts]
    refs = json.loads(refs_path.read_text()) if refs_path.exists() else {}
    for i, (t, q) in enumerate(zip(texts, vectors)):
        if t not in refs:
            t0 = time.perf_counter()
            _, pos, _ = mv.search("exhaustive", table, glob, q, 10, base)
            refs[t] = snap.ids[pos].tolist()
            refs_path.write_text(json.dumps(refs))
            print(f"# reference {i + 1}/{len(texts)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    ref_pos = [set(snap.positions(np.asarray(refs[t])).tolist()) for t in texts]
    stage(snap, vectors[0], "union", sizes[0], base.weight_global)  # loads the ANN structure before any timing
    for policy in ("union", "fused", "fused+union/8"):
        for n in sizes:
            found, t_stage, sets = [], [], []
            for q, ref in zip(vectors, ref_pos):
                t0 = time.perf_counter()
                cand = stage(snap, q, policy, n, base.weight_global)
                t_stage.append(time.perf_counter() - t0)
                sets.append(cand)
                found.append(len(ref & set(cand.tolist())) / len(ref))
            row = {"policy": policy, "n": n, "split": split, "queries": len(texts),
                   "stage_recall10": round(float(np.mean(found)), 4),
                   "stage_images_mean": round(float(np.mean([len(s) for s in sets])), 1),
                   "stage_ms_p50": round(float(np.median(t_stage)) * 1000, 2)}
            for T, alpha, tau in configs:
                cfg = mv.MultiVectorConfig(**{**base.to_dict(), "T": T, "alpha": alpha, "tau": tau})
                agree, t_all = [], []
                for q, ref, cand, ts in zip(vectors, ref_pos, sets, t_stage):
                    t0 = time.perf_counter()
                    _, pos, _ = mv.search("hierarchical", table, glob, q, 10, cfg, cand)
                    t_all.append(ts + time.perf_counter() - t0)
                    agree.append(len(ref & set(pos.tolist())) / len(ref))
                row[f"T{T}/a{alpha}/tau{tau}"] = {"agreement10": round(float(np.mean(agree)), 4),
                                                  "ms_p50": round(float(np.median(t_all)) * 1000, 2)}
            print(json.dumps(row), flush=True)
    index.close()


if __name__ == "__main__":
    main(sys.argv[1:])
