"""Which mode should ``auto`` pick for an image query on an index with segments or objects? (docs/queries.md)

Two small indexes with global + objects (regions) (+ segments 4, 9, 16 for the scenes),
and every query run in ``global``, ``hierarchical``, ``objects`` and
``objects-max``:

* ``scenes``: needles scenes (the 100 with a pasted landmark and the first
  ``--others`` without). Query sets: ``crop`` = the 6 landmark crops, whole
  (object-sized by nature); ``small-box`` = ``--per-landmark`` landmark
  scenes per landmark with ``bbox`` = the pasted box (1-4 % of the image),
  the scene itself left out of its ranking; ``whole-scene`` = the same
  scenes without a box. Relevant: the other scenes with that landmark.
* ``landmarks``: the first ``--db-images`` rparis6k-mini database images (global + objects, no segments).
  ``held-out`` = every ``--every``-th of them as a whole-image query (itself left out),
  the images of the same landmark relevant (the protocol of
  ``experiments/l2g_heldout.py``); with all 238 indexed, ``official-box`` = the
  6 official queries cropped to their box (revisitop Medium), reported only.
* ``text``: the first ``--train-images`` Flickr8k *train* images (global +
  segments 4, 9, 16, 25, 36, the bench's levels) and their captions:
  text->image R@1, R@10 and NDCG@10 in ``global``, ``single``,
  ``exhaustive``, ``hierarchical`` (a split no reported result uses).

mAP per (query set, mode), and the mean box area fraction of each set.
Indexes are cached under ``--cache-dir``.

Usage: python -m experiments.auto_policy scenes|landmarks|text [--cache-dir /tmp/auto-policy] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from finegrain.decompose.segments import SegmentConfig
from finegrain.eval.metrics import average_precision_revisitop, compute_map, revisitop_protocols
from finegrain.index import Index

MODES = ("global", "hierarchical", "objects", "objects-max")
DATA = Path(os.environ.get("FINEGRAIN_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def build(folder: Path, images: list[Path], segments: bool = True) -> Index:
    seg = SegmentConfig(levels=(4, 9, 16)) if segments else None
    index = Index.create(folder, segments=seg, objects="regions", exist_ok=True)
    index.add(images, remove_missing=False, show_progress=False)
    return index


def ap(ranked_names: list[str], relevant: set[str]) -> float:
    pos = np.array([i for i, n in enumerate(ranked_names) if n in relevant])
    return average_precision_revisitop(pos, len(relevant)) if len(relevant) else float("nan")


def run_set(index: Index, queries: list[tuple], mode: str) -> float:
    """Queries are (image path, bbox or None, relevant names, name left out); mAP (NaN: mode not available)."""
    if mode not in index.available_modes():
        return float("nan")
    aps = []
    for path, box, relevant, skip in queries:
        hits = index.search(image=path, bbox=box, k=len(index), mode=mode)
        names = [Path(h.path).name for h in hits if Path(h.path).name != skip]
        aps.append(ap(names, relevant))
    return float(np.mean(aps))


def scenes(args: argparse.Namespace) -> dict:
    root = DATA / "needles"
    gnd = json.loads((root / "gnd.json").read_text())
    with_mark = [s for s in gnd["scenes"] if s["landmark"]]
    without = [s for s in gnd["scenes"] if not s["landmark"]][: args.others]
    index = build(Path(args.cache_dir) / "scenes", [root / "scenes" / s["image"] for s in with_mark + without])
    by_mark: dict[str, list[dict]] = {}
    for s in with_mark:
        by_mark.setdefault(s["landmark"], []).append(s)
    crop = [(root / "queries" / q["query"], None, set(q["relevant"]), None) for q in gnd["queries"]]
    small, whole, fractions = [], [], []
    for _mark, group in sorted(by_mark.items()):
        for s in group[: args.per_landmark]:
            rel = {o["image"] for o in group if o["image"] != s["image"]}
            small.append((root / "scenes" / s["image"], s["box"], rel, s["image"]))
            whole.append((root / "scenes" / s["image"], None, rel, s["image"]))
            fractions.append(s["area_fraction"])
    sets = {"crop (whole object image)": (crop, 1.0), "small-box (pasted box)": (small, float(np.mean(fractions))),
            "whole-scene (no box)": (whole, 1.0)}
    return {name: {"queries": len(q), "box_fraction": frac, **{m: run_set(index, q, m) for m in MODES}}
            for name, (q, frac) in sets.items()}


def landmarks(args: argparse.Namespace) -> dict:
    root = DATA / "rparis6k-mini"
    gnd = json.loads((root / "gnd_rparis6k-mini.json").read_text())
    db = [root / "jpg" / f"{n}.jpg" for n in gnd["imlist"]]
    indexed = db[: args.db_images]  # the ground truth's order is mixed: the first n cover every landmark
    index = build(Path(args.cache_dir) / "landmarks", indexed, segments=False)  # image queries on segments: scenes
    mark = {p.name: p.name.split("_")[1] for p in indexed}
    held = [(p, None, {n for n, m in mark.items() if m == mark[p.name] and n != p.name}, p.name)
            for p in indexed[:: args.every]]
    out = {"held-out (database images, whole)": {"queries": len(held), "box_fraction": 1.0,
                                                 **{m: run_set(index, held, m) for m in MODES}}}
    if len(indexed) < len(db):  # the official queries' ground truth needs the whole database
        return out
    from PIL import Image

    position = {p.name: i for i, p in enumerate(db)}
    medium = revisitop_protocols(gnd["gnd"])["medium"]
    fractions, row = [], {}
    for mode in MODES:
        columns = []
        for name, g in zip(gnd["qimlist"], gnd["gnd"]):
            path = root / "jpg" / f"{name}.jpg"
            x0, y0, x1, y1 = g["bbx"]
            if mode == MODES[0]:
                w, h = Image.open(path).size
                fractions.append((x1 - x0) * (y1 - y0) / (w * h))
            if mode not in index.available_modes():
                break
            hits = index.search(image=path, bbox=g["bbx"], k=len(index), mode=mode)
            columns.append([position[Path(h.path).name] for h in hits])
        row[mode] = compute_map(np.array(columns).T, medium)[0] if columns else float("nan")
    out["official-box (6 queries, Medium, reported only)"] = {"queries": 6, "box_fraction": float(np.mean(fractions)),
                                                              **row}
    return out


def text(args: argparse.Namespace) -> dict:
    root = DATA / "flickr8k"
    train = (root / "splits" / "train.txt").read_text().split()[: args.train_images]
    wanted = set(train)
    captions = [line.split("\t") for line in (root / "captions.tsv").read_text().splitlines()[1:]]
    captions = [(img, cap) for img, _, cap in captions if img in wanted]
    index = Index.create(Path(args.cache_dir) / "text", segments=SegmentConfig(levels=(4, 9, 16, 25, 36)),
                         exist_ok=True)
    index.add([root / "images" / n for n in train], remove_missing=False, show_progress=False)
    out = {}
    for mode in ("global", "single", "exhaustive", "hierarchical"):
        ranks = []
        for img, cap in captions:
            hits = [Path(h.path).name for h in index.search(text=cap, k=10, mode=mode)]
            ranks.append(hits.index(img) if img in hits else 10)
        r = np.array(ranks)
        out[mode] = {"queries": len(r), "r1": 100 * float((r < 1).mean()), "r10": 100 * float((r < 10).mean()),
                     "ndcg10": float(np.mean(np.where(r < 10, 1 / np.log2(r + 2), 0.0)))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("scenes", "landmarks", "text"))
    p.add_argument("--train-images", type=int, default=200, help="text: Flickr8k train images indexed")
    p.add_argument("--cache-dir", default="/tmp/auto-policy")
    p.add_argument("--others", type=int, default=100, help="needles scenes without a landmark in the index")
    p.add_argument("--per-landmark", type=int, default=6, help="small-box / whole-scene queries per landmark")
    p.add_argument("--every", type=int, default=1, help="held-out: every n-th database image is a query")
    p.add_argument("--db-images", type=int, default=72, help="landmarks: the first n database images indexed "
                   "(238: all, and the official queries too)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.part == "text":
        result = text(args)
        print("| mode | captions | R@1 | R@10 | NDCG@10 |\n|---|---|---|---|---|")
        for mode, r in result.items():
            print(f"| {mode} | {r['queries']} | {r['r1']:.1f} | {r['r10']:.1f} | {r['ndcg10']:.3f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    result = scenes(args) if args.part == "scenes" else landmarks(args)
    print(f"| query set | queries | mean box area | {' | '.join(MODES)} |")
    print("|---|---|---|" + "---|" * len(MODES))
    for name, r in result.items():
        print(f"| {name} | {r['queries']} | {100 * r['box_fraction']:.1f} % | "
              + " | ".join(f"{r[m]:.3f}" for m in MODES) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
