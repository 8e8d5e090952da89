"""MaO fusion exponent and object cap, chosen on Stage-A validation composites (Flickr8k *train* images only).

Issue 17: `pool_p` (5) and `max_objects` (24) were picked on needles, the set that reports them. This scores
every (p, cap) on the validation composites of a `finegrain train-objects` cache (their crops are encoded
with the ObjectConfig of the run: regions, tight crops, crop 0 = the whole image), so the choice never
sees needles. Each query's one relevant item is its own composite among all validation composites.

Rule (fixed before the run): keep the shipped value unless another beats it by more than twice the paired
standard error of the per-query reciprocal-rank difference; among those, take the best MRR. The cap (and the
crop size) is one setting of the index shared by both object modes, so `objects-max` (the mode `auto` uses
for object queries) chooses it; `pool_p` only changes the fused descriptor, so `objects` chooses it at that cap.

The crop size is scored the same way with ``--crop-sizes 96,160 --data FLICKR8K``: the same validation
composites (same seed and images) re-encoded at each size into ``DIR-crop<SIZE>``, scored at the chosen p and cap
against the default size of the run (128 when the defaults were chosen; 192 since). The proposal order is
compared by experiments/mao_order_val.py.

Usage (the cache is what `finegrain train-objects --cache-dir DIR` builds):

    PYTHONPATH=src python -m experiments.mao_defaults_val DIR [--crop-sizes 96,160 --data FLICKR8K] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from finegrain.objects.config import ObjectConfig
from finegrain.train.stagea import CacheConfig, build_cache, load_split, padded, reciprocal_ranks

P_GRID = (1.0, 2.0, 3.0, 5.0, 8.0)
CAP_GRID = (4, 8, 12, 16, 24)
SHIPPED = {"p": 5.0, "cap": 24}


def choose(rows: list[dict], mode: str, base: dict) -> dict:
    """``base`` unless a row beats it by more than 2 paired SE in ``mode`` (then the best such row)."""
    better = []
    for r in rows:
        d = r["rr"][mode] - base["rr"][mode]
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
        r.setdefault("gain", {})[mode] = (float(d.mean()), float(se))
        if d.mean() > 2 * se:
            better.append(r)
    return max(better, key=lambda r: r["rr"][mode].mean()) if better else base


def crop_sizes(args, split: dict, chosen: dict) -> list[dict]:
    """Validation MRR of each mode at each crop size (that mode's chosen p and cap), paired against 128."""
    sizes = [int(c) for c in args.crop_sizes.split(",") if c]
    if not sizes:
        return []
    if not args.data:
        raise SystemExit("--crop-sizes needs --data (the Flickr8k folder the composites come from)")
    key = json.loads(open(f"{args.cache_dir}/val.json").read())
    config = CacheConfig(**{**key["cache"], "n_train": 1})  # the same validation composites; one training one
    splits = {ObjectConfig().crop_size: split}
    for size in sizes:
        splits[size] = build_cache(args.data, f"{args.cache_dir}-crop{size}", config,
                                   ObjectConfig(crop_size=size), show_progress=False)["val"]
    out = []
    base_size = ObjectConfig().crop_size  # the cache's own size: the pairing's reference
    for mode, r in chosen.items():
        rr = {size: reciprocal_ranks(None, *padded(sp, r["cap"] + 1), r["p"])[mode] for size, sp in splits.items()}
        for size in sorted(rr):
            d = rr[size] - rr[base_size]
            row = {"mode": mode, "crop_size": size, "p": r["p"], "cap": r["cap"], "mrr": float(rr[size].mean()),
                   "gain": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
            out.append(row)
            print(f"{mode:11s} crop {size:3d}: MRR {row['mrr']:.4f} (vs {base_size}: {row['gain']:+.4f}, "
                  f"SE {row['se']:.4f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache_dir")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--crop-sizes", default="", help="other crop sizes to score (comma-separated)")
    ap.add_argument("--data", help="Flickr8k folder (for --crop-sizes)")
    args = ap.parse_args()
    split = load_split(args.cache_dir, "val")
    print(f"{len(split['offsets']) - 1} validation composites, {len(split['crops'])} crops")
    rows = []
    for cap in CAP_GRID:
        crops, mask, queries = padded(split, cap + 1)  # crop 0 is the whole image; cap objects after it
        for p in P_GRID:
            rr = reciprocal_ranks(None, crops, mask, queries, p)
            rows.append({"p": p, "cap": cap, "rr": rr})
            print(f"cap {cap:2d} p {p:3.0f}  objects MRR {rr['objects'].mean():.4f}  "
                  f"objects-max MRR {rr['objects_max'].mean():.4f}", flush=True)
    shipped = next(r for r in rows if r["p"] == SHIPPED["p"] and r["cap"] == SHIPPED["cap"])
    cap = choose([r for r in rows if r["p"] == SHIPPED["p"]], "objects_max", shipped)["cap"]
    at_cap = [r for r in rows if r["cap"] == cap]
    best = choose(at_cap, "objects", next(r for r in at_cap if r["p"] == SHIPPED["p"]))
    for mode in ("objects_max", "objects"):
        g = best.get("gain", {}).get(mode)
        print(f"chosen: cap {cap} (by objects-max), p {best['p']:.0f} (by objects); {mode} MRR "
              f"{best['rr'][mode].mean():.4f}" + (f", gain {g[0]:+.4f} (SE {g[1]:.4f})" if g else ""))
    chosen = {mode: best for mode in ("objects", "objects_max")}
    crop_rows = crop_sizes(args, split, chosen)
    if args.json_out:
        table = [{"p": r["p"], "cap": r["cap"], **{f"{m}_mrr": float(r["rr"][m].mean()) for m in r["rr"]},
                  **{f"{m}_gain_vs_shipped": r["gain"][m] for m in r.get("gain", {})}} for r in rows]
        with open(args.json_out, "w") as f:
            json.dump({"rows": table, "chosen": {m: {"p": r["p"], "cap": r["cap"]} for m, r in chosen.items()},
                       "crop_sizes": crop_rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
