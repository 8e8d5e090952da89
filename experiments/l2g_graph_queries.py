"""What each database image queries with when the ``l2g`` neighbour graph is built, on the two-fold landmark
protocol (docs/l2g.md, "What the neighbour lists query with"; docs/benchmarks.md).

One list costs one approximate Chamfer search; its cost grows with the number of query descriptors (970 per
image at the default). Candidates: every descriptor (``all``, the default before), only the image's
representatives (the rows the searcher indexes after the near-duplicate reduction, about a fifth), and the
strongest n of either. Each runs :func:`finegrain.bench.revisitop_folds.run_revisitop_folds` with the shipped
``l2g`` setting (paper variant, w 0.19, k 700) only, over a searcher whose graph is built that way.

The rule, fixed before the run: on the fold that chooses, the cheapest candidate (fewest query descriptors per
image, measured) whose class mAP is within ``--tolerance`` points of ``all`` on that fold; it is reported on
the other fold beside ``all``, then the folds swap::

    .venv/bin/python -m experiments.l2g_graph_queries --data ../shared/data/rparis6k-mini \\
        --distractors ../shared/data/flickr8k/images --distractor-list ../shared/data/flickr8k/splits/dev.txt \\
        --cache-dir CACHE --json graph_queries.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _candidates(text: str) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for item in text.split(","):
        kind, _, n = item.strip().partition(":")
        out.append((kind, int(n) if n else None))
    return out


def _local_config():
    """The bench index's local features (the docs' landmark runs: three scales, 1,000 features, 512 px)."""
    from finegrain.local.store import LocalConfig

    return LocalConfig("cnn", {"scales": [1.0, 0.707, 0.5], "max_features": 1000, "image_size": 512})


def _name(kind: str, n: int | None) -> str:
    return kind + (f":{n}" if n else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--distractors")
    ap.add_argument("--distractor-list")
    ap.add_argument("--cache-dir")
    ap.add_argument("--candidates", default="all,representatives,all:150,representatives:64",
                    help="graph_queries[:graph_features], comma-separated; 'all' must be among them")
    ap.add_argument("--tolerance", type=float, default=0.5, help="class mAP points below 'all' still accepted")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()

    from finegrain.bench.revisitop_folds import run_revisitop_folds, setting_name

    shipped = {"variant": "paper", "w": 0.19, "shortlist": 700}
    local = _local_config()
    runs = {}
    for kind, n in _candidates(args.candidates):
        report = run_revisitop_folds(args.data, distractors=args.distractors, distractor_list=args.distractor_list,
                                     cache_dir=args.cache_dir, local=local, grid=[shipped], show_progress=False,
                                     searcher_options={"graph_queries": kind, "graph_features": n},
                                     log=lambda message: print(message, file=sys.stderr, flush=True))
        by_fold = {c["fold"]: c for c in report["candidates"] if c["setting"] == setting_name(shipped)}
        runs[_name(kind, n)] = {"graph_s": report["graph_s"], "per_image": _query_size(args, kind, n),
                                "folds": by_fold, "baselines": {c["setting"]: c for c in report["candidates"]
                                                                if c["setting"] != setting_name(shipped)}}
        print(json.dumps({"graph": _name(kind, n), "graph_s": report["graph_s"],
                          **{f: round(v["class_map"], 2) for f, v in by_fold.items()}}), flush=True)
    folds = sorted(next(iter(runs.values()))["folds"])
    rows = []
    for choose_on, report_on in zip(folds, folds[1:] + folds[:1]):
        ref = runs["all"]["folds"][choose_on]["class_map"]
        ok = [name for name, r in runs.items() if r["folds"][choose_on]["class_map"] >= ref - args.tolerance]
        chosen = min(ok, key=lambda name: runs[name]["per_image"])
        for label, name in (("all (reference)", "all"), (f"chosen on {choose_on}", chosen)):
            c = runs[name]["folds"][report_on]
            rows.append({"reported_on": report_on, "row": label, "graph": name, "graph_s": runs[name]["graph_s"],
                         "query_descriptors_per_image": runs[name]["per_image"],
                         **{k: c.get(k) for k in ("class_map", "map_easy", "map_medium", "map_hard")}})
    print("| reported on | row | graph queries | descriptors per list | graph build s | class mAP | Medium mAP |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        medium = "" if r["map_medium"] is None else f"{r['map_medium']:.2f}"
        print(f"| {r['reported_on']} | {r['row']} | {r['graph']} | {r['query_descriptors_per_image']:.0f} | "
              f"{r['graph_s']:.0f} | {r['class_map']:.2f} | {medium} |")
    print("\nEvery candidate (class mAP / Medium mAP per fold):")
    for name, r in runs.items():
        print(f"- {name} ({r['per_image']:.0f} descriptors a list, graph {r['graph_s']:.0f} s): "
              + "; ".join(f"{f} {r['folds'][f]['class_map']:.2f} / {r['folds'][f].get('map_medium', float('nan')):.2f}"
                          for f in folds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "runs": runs, "tolerance": args.tolerance}, fh, indent=1)


def _query_size(args, kind: str, n: int | None) -> float:
    """Mean query descriptors per neighbour list over the bench index (what the graph's cost grows with)."""
    from pathlib import Path

    from finegrain.bench.revisitop import revisitop_index
    from finegrain.datasets import load_revisitop

    bench = load_revisitop(args.data, None, args.distractors, args.distractor_list)
    local = _local_config()
    cache = Path(args.cache_dir or Path.home() / ".cache" / "finegrain" / "bench")
    index, _, _ = revisitop_index(bench, "effnet-minilm", cache, False, local)
    approx = index.local_searcher.approx()
    counts = (approx.db.counts if kind == "all"
              else np.bincount(approx.row_image, minlength=approx.db.n_images))
    return float(np.mean(np.minimum(counts, n) if n else counts))


if __name__ == "__main__":
    main()
