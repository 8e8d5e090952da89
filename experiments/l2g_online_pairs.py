"""``l2g`` with pairs measured at query time (``pairs="online"``) against the stored neighbour graph, on the
two-fold landmark protocol (docs/l2g.md, "Pairs without the graph"; docs/benchmarks.md).

Runs :func:`finegrain.bench.revisitop_folds.run_revisitop_folds` with a grid of the shipped setting (the paper
variant, w 0.19, k 700, pairs from the graph) and the same setting with online pairs at several
``pair_neighbors`` / ``pair_features``. Online's knobs are chosen by class mAP on one fold among the online
settings only, and reported on the other fold beside the graph's row (which chooses nothing)::

    .venv/bin/python -m experiments.l2g_online_pairs --data ../shared/data/rparis6k-mini \\
        --distractors ../shared/data/flickr8k/images --distractor-list ../shared/data/flickr8k/splits/dev.txt \\
        --cache-dir CACHE --json online.json
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--distractors")
    ap.add_argument("--distractor-list")
    ap.add_argument("--cache-dir")
    ap.add_argument("--neighbors", default="4,8,16", help="pair_neighbors values")
    ap.add_argument("--features", default="64,256", help="pair_features values")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()

    from finegrain.bench.folds import choose
    from finegrain.bench.revisitop_folds import SHIPPED, run_revisitop_folds, setting_name
    from finegrain.local.store import LocalConfig

    base = {"variant": "paper", "w": 0.19, "shortlist": 700}
    online = [{**base, "pairs": "online", "pair_neighbors": m, "pair_features": f}
              for m in (int(v) for v in args.neighbors.split(",")) for f in (int(v) for v in args.features.split(","))]
    local = LocalConfig("cnn", {"scales": [1.0, 0.707, 0.5], "max_features": 1000, "image_size": 512})
    report = run_revisitop_folds(args.data, distractors=args.distractors, distractor_list=args.distractor_list,
                                 cache_dir=args.cache_dir, local=local, grid=[base, *online],
                                 log=lambda message: print(message, file=sys.stderr, flush=True))
    assert setting_name(base) == SHIPPED
    by = {(c["setting"], c["fold"]): c for c in report["candidates"]}
    names = [setting_name(o) for o in online]
    folds = [f["fold"] for f in report["folds"]]
    rows = []
    for choose_on, report_on in zip(folds, folds[1:] + folds[:1]):
        chosen = choose({name: by[(name, choose_on)]["class_map"] for name in names})
        for label, name in (("graph (shipped)", SHIPPED), (f"online (chosen on {choose_on})", chosen)):
            c = by[(name, report_on)]
            rows.append({"reported_on": report_on, "row": label, "setting": name,
                         **{k: c.get(k) for k in ("class_map", "map_easy", "map_medium", "map_hard", "rank_ms_p50")}})
    print("| reported on | row | setting | class mAP | mAP E / M / H | ms |")
    print("|---|---|---|---:|---|---:|")
    for r in rows:
        emh = " / ".join(f"{r[k]:.1f}" for k in ("map_easy", "map_medium", "map_hard")) if r["map_medium"] is not None \
            else ""
        print(f"| {r['reported_on']} | {r['row']} | {r['setting']} | {r['class_map']:.2f} | {emh} | "
              f"{r['rank_ms_p50']:.0f} |")
    print("\nEvery candidate (class mAP per fold):")
    for name in [SHIPPED, *names]:
        print(f"- {name}: " + " / ".join(f"{by[(name, f)]['class_map']:.2f}" for f in folds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "report": report}, fh, indent=1)


if __name__ == "__main__":
    main()
