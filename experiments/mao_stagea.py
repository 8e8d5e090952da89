"""MaO Stage A on needles: train the crop-vector adapter on Flickr8k-train composites, score needles with and without it.

The needles object index is the cached bench index (``finegrain bench needles
--mode objects`` builds it: default ObjectConfig, regions, tight crops). Its
stored crop vectors are the raw vectors the adapter takes, so each variant
re-scores the same crops: adapter on every crop and on the query, then the
p = 5 generalised mean per image (``objects``) or the best crop
(``objects-max``), exactly as an index built with the adapter would store them.

Usage (from the repo root; the composite cache is built on the first run,
about 0.4 CPU s per composite with one thread):

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m experiments.mao_stagea [--out W.safetensors] [--rank R] [--temperature T]
        [--epochs E] [--n-train N] [--seeds 0,1,2] [--json RESULT.json]

or, to score adapters already trained by ``finegrain train-objects`` (no training, no composite cache):

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m experiments.mao_stagea --adapter A.safetensors [--adapter B.safetensors]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from finegrain.bench.needles import load_needles, needles_map
from finegrain.index import Index
from finegrain.objects.adapter import read_adapter
from finegrain.objects.descriptor import fuse
from finegrain.retrieval import Query
from finegrain.retrieval.objects import embed_object_query
from finegrain.train.stagea import CacheConfig, StageAConfig, apply_adapter, build_cache, save_adapter, train_stagea

torch.set_num_threads(1)  # shared 2-core machine


def needles_rankings(index: Index, data, weights: dict | None, pool_p: float) -> dict[str, list[list[str]]]:
    """Rankings of ``objects`` and ``objects-max`` from the index's stored crop vectors, optionally adapted."""
    rows = index.fields["objects"]
    vecs, owners = np.asarray(rows.vectors, np.float32), np.asarray(rows.owners)
    queries = np.stack([embed_object_query(index.snapshot, Query(image=q)) for q in data.queries])
    if weights is not None:
        vecs, queries = apply_adapter(weights, vecs), apply_adapter(weights, queries)
    ids = np.unique(owners)
    names = [Path(index.records[int(i)].path).name for i in ids]
    desc = np.stack([fuse(vecs[owners == i], pool_p) for i in ids])
    sims = vecs @ queries.T
    best = np.stack([sims[owners == i].max(0) for i in ids])
    out = {}
    for mode, scores in (("objects", desc @ queries.T), ("objects-max", best)):
        out[mode] = [[names[j] for j in np.argsort(-scores[:, q], kind="stable")] for q in range(len(queries))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flickr8k", default="/work/shared/data/flickr8k")
    ap.add_argument("--needles", default="/work/shared/data/needles")
    ap.add_argument("--index", default=str(Path.home() / ".cache/finegrain/bench/needles-effnet-minilm-objects-regions-c0-r0"))
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache/finegrain/stagea-flickr8k"))
    ap.add_argument("--n-train", type=int, default=2500)
    ap.add_argument("--n-val", type=int, default=400)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds; needles is scored for each and their mean")
    ap.add_argument("--out", default=None, help="write the first seed's adapter here (.safetensors)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--adapter", action="append", default=[],
                    help="score this trained adapter on needles instead of training (repeatable)")
    args = ap.parse_args()

    if not (Path(args.index) / "finegrain.sqlite").exists():
        raise SystemExit(f"no needles object index at {args.index}: run "
                         "`finegrain bench needles --data ../shared/data/needles --mode objects` first")
    if args.adapter:
        score_adapters(args)
        return
    t0 = time.time()
    cache = build_cache(args.flickr8k, args.cache_dir, CacheConfig(n_train=args.n_train, n_val=args.n_val))
    index = Index.open(args.index)
    data = load_needles(args.needles)
    result = {"composites": {"train": len(cache["train"]["queries"]), "val": len(cache["val"]["queries"]),
                             "train_best_iou_gt_0.5": float((np.asarray(cache["train"]["best_iou"]) > 0.5).mean())},
              "runs": [], "needles": {}}
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = ["baseline"] + [f"seed{s}" for s in seeds]
    for label in labels:
        weights = None
        if label != "baseline":
            seed = int(label[4:])
            cfg = StageAConfig(rank=args.rank, temperature=args.temperature, epochs=args.epochs, lr=args.lr, seed=seed)
            t1 = time.time()
            model, info = train_stagea(cache, cfg)
            weights = model.weights()
            best = info["history"][info["best_epoch"]]
            result["runs"].append({"seed": seed, "train_seconds": round(time.time() - t1, 1), **info})
            print(f"seed {seed}: best epoch {info['best_epoch']}, val objects MRR {best['objects_mrr']:.3f} "
                  f"(identity {info['history'][0]['objects_mrr']:.3f}), objects-max MRR {best['objects_max_mrr']:.3f} "
                  f"(identity {info['history'][0]['objects_max_mrr']:.3f})")
            if args.out and seed == seeds[0]:
                save_adapter(args.out, weights, {"recipe": info["config"], "best_epoch": info["best_epoch"],
                                                 "cache": vars(CacheConfig(n_train=args.n_train, n_val=args.n_val))})
        for mode, rankings in needles_rankings(index, data, weights, StageAConfig().pool_p).items():
            m = needles_map(rankings, data)
            result["needles"][f"{mode} {label}"] = m
            print(f"needles {mode:12s} {label:9s} mAP {m['map']:.3f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in m["map_by_area"].items()))
    for mode in ("objects", "objects-max"):
        runs = [result["needles"][f"{mode} {lab}"] for lab in labels[1:]]
        mean = {"map": float(np.mean([r["map"] for r in runs])),
                "map_by_area": {k: float(np.mean([r["map_by_area"][k] for r in runs])) for k in runs[0]["map_by_area"]}}
        result["needles"][f"{mode} stagea-mean"] = mean
        print(f"needles {mode:12s} {'mean':9s} mAP {mean['map']:.3f}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in mean["map_by_area"].items()) + f"  (over seeds {args.seeds})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"total {time.time() - t0:.0f}s")


def score_adapters(args) -> None:
    """Needles mAP of the stored crops as they are and through each adapter (what an index built with it stores)."""
    index = Index.open(args.index)
    data = load_needles(args.needles)
    result = {}
    for label, path in [("none", None)] + [(Path(a).name, a) for a in args.adapter]:
        weights = read_adapter(path)[0] if path else None
        for mode, rankings in needles_rankings(index, data, weights, StageAConfig().pool_p).items():
            m = needles_map(rankings, data)
            result[f"{mode} {label}"] = m
            print(f"needles {mode:12s} {label:32s} mAP {m['map']:.3f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in m["map_by_area"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
