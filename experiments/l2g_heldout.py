"""Held-out tuning of the L2G search settings: landmark-class retrieval among the database images.

The official rparis6k-mini benchmark has only 6 queries, so settings chosen on
them are chosen on the test. This protocol tunes on other queries: every
database image of the ground truth's ``imlist`` (or every ``--every``-th) is a
query against the whole bench index (database + distractors, the image itself
removed from its ranking), and the database images of the same landmark (the
second ``_``-separated part of the file name, as ``finegrain bench compress``'s
``class_map``) are relevant; distractors never are. The query's local
descriptors and instance descriptor are the ones stored in the index (no
re-extraction); ``--query-features`` keeps the strongest n, since the official
queries are box crops with far fewer descriptors than a whole image.

It reads the cached bench index that ``finegrain bench revisitop`` built with
the same data and ``--local*`` settings (run that first), so the paths must be
given exactly as there (the cache name hashes them).

Usage (from the repository root):
  python -m experiments.l2g_heldout --distractors ../shared/data/flickr8k/images \\
      --distractor-list ../shared/data/flickr8k/splits/dev.txt --w 0.19,0.35,0.5,0.7 \\
      --exact-rerank 0,200 --knn 512 --every 2 --json heldout.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from finegrain.bench.revisitop import revisitop_index  # noqa: E402
from finegrain.datasets import load_revisitop  # noqa: E402
from finegrain.eval.metrics import compute_map  # noqa: E402
from finegrain.local.store import LocalConfig  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def heldout_queries(searcher, position_of_row: np.ndarray, owners: np.ndarray, labels: list[str], every: int = 1):
    """``(searcher positions of the query images, relevance lists)``: labelled database images as queries.

    ``position_of_row[r]`` is the benchmark position of the index's global row
    ``r`` (owner ``owners[r]``); labelled images are benchmark positions below
    ``len(labels)``. Relevance is given as searcher positions of the other
    images of the same landmark.
    """
    bench_pos = np.full(len(searcher.ids), -1, np.int64)
    bench_pos[np.searchsorted(searcher.ids, owners)] = position_of_row
    labelled = np.flatnonzero((bench_pos >= 0) & (bench_pos < len(labels)))
    lab = np.array([labels[bench_pos[p]] for p in labelled])
    queries = labelled[::every]
    relevant = [labelled[(lab == labels[bench_pos[p]]) & (labelled != p)] for p in queries]
    return queries, relevant


def evaluate(searcher, queries: np.ndarray, relevant: list[np.ndarray], mode: str, query_features: int,
             **options) -> dict:
    """Class mAP (percent) of one setting and the median ranking time (ms, first stage + re-ranking)."""
    columns, ms = [], []
    for p in queries:
        q = searcher.db.image(int(p))[:query_features]
        gq = searcher.global_matrix(options.get("global_field", "instance"))[p]
        _, order, timings = searcher.rank_timed(mode, q, gq, exclude=int(p), **options)
        ms.append(timings.get("rank_ms", 0.0))
        columns.append(order)
    ranks = np.stack(columns, axis=1)
    m, _, _, _ = compute_map(ranks, [{"ok": r} for r in relevant])
    return {"class_map": 100.0 * m, "rank_ms_p50": float(np.median(ms))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/rparis6k-mini")
    ap.add_argument("--distractors")
    ap.add_argument("--distractor-list")
    ap.add_argument("--local-scales", default="1.0,0.707,0.5")
    ap.add_argument("--local-features", type=int, default=1000)
    ap.add_argument("--local-image-size", type=int, default=512)
    ap.add_argument("--modes", default="global,global+local,local,l2g",
                    help="modes to evaluate; the grid applies to local (knn, R) and l2g (knn, R, w)")
    ap.add_argument("--w", type=_floats, default=[0.19, 0.35, 0.5, 0.7])
    ap.add_argument("--exact-rerank", type=_ints, default=[0, 200])
    ap.add_argument("--knn", type=_ints, default=[512])
    ap.add_argument("--every", type=int, default=1, help="use every n-th database image as a query")
    ap.add_argument("--query-features", type=int, default=150, help="strongest local descriptors per query")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args(argv)

    bench = load_revisitop(args.data, None, args.distractors, args.distractor_list)
    cfg = LocalConfig("cnn", {"scales": _floats(args.local_scales), "max_features": args.local_features,
                              "image_size": args.local_image_size})
    cache = Path.home() / ".cache" / "finegrain" / "bench"
    index, _, position_of_row = revisitop_index(bench, "effnet-minilm", cache, False, cfg)
    searcher = index.local_searcher
    queries, relevant = heldout_queries(searcher, position_of_row, index.global_rows.owners, bench.landmarks,
                                        args.every)
    print(f"{len(queries)} held-out queries, {searcher.db.n_images} images", file=sys.stderr)
    searcher.graph()  # query-independent, built once
    rows = []
    for mode in args.modes.split(","):
        if mode in ("global", "global+local"):
            grid = [{}]
        elif mode == "local":
            grid = [{"knn": k, "exact_rerank": r} for k, r in itertools.product(args.knn, args.exact_rerank)]
        else:
            grid = [{"knn": k, "exact_rerank": r, "w": w}
                    for k, r, w in itertools.product(args.knn, args.exact_rerank, args.w)]
        for opts in grid:
            t0 = time.perf_counter()
            res = evaluate(searcher, queries, relevant, mode, args.query_features, **opts)
            row = {"mode": mode, **opts, **res, "queries": len(queries), "query_features": args.query_features,
                   "distractors": len(bench.distractor_paths), "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
