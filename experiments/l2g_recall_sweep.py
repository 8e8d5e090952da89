"""Recall of the approximate Chamfer search against exact Chamfer, per near-duplicate threshold and knn.

For the 6 rparis6k-mini queries (cropped to their box, descriptors extracted
as ``finegrain bench revisitop`` does) against the cached bench index
(database + distractors; run ``finegrain bench revisitop ... --local cnn`` with
the same paths first: the cache name hashes them), it reports for each
``dedup`` (None: every descriptor indexed) and ``knn``:

* ``recall``: recall@100 of the approximate scores alone against the exact
  Chamfer top 100 over the whole database;
* ``verified_R``: recall@100 after the approximate top R is re-scored with
  the exact Chamfer (what the search returns with ``exact_rerank=R``);
* ``approx_ms`` / ``verify_ms_R``: median time per query of the approximate
  scoring and of the exact re-score (one thread; time it under
  ``flock /tmp/finegrain-bench.lock`` on a shared machine).

Usage (from the repository root):
  OMP_NUM_THREADS=1 python -m experiments.l2g_recall_sweep --distractors ../shared/data/flickr8k/images \\
      --distractor-list ../shared/data/flickr8k/splits/dev.txt --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from finegrain.bench.revisitop import revisitop_index  # noqa: E402
from finegrain.datasets import load_revisitop  # noqa: E402
from finegrain.local import chamfer as ch  # noqa: E402
from finegrain.local.store import LocalConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/rparis6k-mini")
    ap.add_argument("--distractors")
    ap.add_argument("--distractor-list")
    ap.add_argument("--dedup", default="none,0.9,0.8,0.7,0.6,0.5", help="comma-separated; 'none' = all descriptors")
    ap.add_argument("--knn", default="512,1024,2048")
    ap.add_argument("--rerank", default="100,200,300", help="exact re-score sizes R")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    bench = load_revisitop(args.data, None, args.distractors, args.distractor_list)
    cfg = LocalConfig("cnn", {"scales": [1.0, 0.707, 0.5], "max_features": 1000, "image_size": 512})
    index, _, _ = revisitop_index(bench, "effnet-minilm", Path.home() / ".cache" / "finegrain" / "bench", False, cfg)
    searcher = index.local_searcher
    db = searcher.db
    queries = [np.asarray(searcher.store.extract_query(p, b)[0].descriptors, np.float32)
               for p, b in zip(bench.query_paths, bench.query_boxes)]
    exact = [ch.chamfer_scores(q, db) for q in queries]
    Rs = [int(v) for v in args.rerank.split(",")]
    rows = []
    for dd in args.dedup.split(","):
        dedup = None if dd.strip().lower() == "none" else float(dd)
        t0 = time.perf_counter()
        approx = ch.ApproxChamfer(db, knn=512, nprobe=args.nprobe, threads=1, dedup=dedup)
        build_s = time.perf_counter() - t0
        for knn in (int(v) for v in args.knn.split(",")):
            approx.knn = knn
            row = {"dedup": dedup, "knn": knn, "indexed": len(approx.rows), "descriptors": db.n_rows,
                   "build_s": build_s}
            rec, ms, ver, vms = [], [], {R: [] for R in Rs}, {R: [] for R in Rs}
            for q, e in zip(queries, exact):
                t = time.perf_counter()
                scores, reached = approx.score_all(q)
                ms.append((time.perf_counter() - t) * 1e3)
                cand = np.flatnonzero(reached)
                cand = cand[np.argsort(-scores[cand], kind="stable")]
                rec.append(ch.recall_at_k(cand[:100], e, 100))
                for R in Rs:
                    t = time.perf_counter()
                    head = cand[:R]
                    s = ch.chamfer_scores(q, db, head)
                    vms[R].append((time.perf_counter() - t) * 1e3)
                    ver[R].append(ch.recall_at_k(head[np.argsort(-s, kind="stable")], e, 100))
            row.update({"recall": float(np.mean(rec)), "approx_ms": float(np.median(ms))})
            for R in Rs:
                row[f"verified_{R}"] = float(np.mean(ver[R]))
                row[f"verify_ms_{R}"] = float(np.median(vms[R]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
