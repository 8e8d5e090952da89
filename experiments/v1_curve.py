"""Learning curve of the bundled model's recipes: dev text->image R@1 against training images (issue 19).

Every point is chosen on the validation slice (the last 500 Flickr8k train
images in split-file order, never trained on) and reported on dev (1,000
images, 5,000 captions), which chose nothing. v1 points are the JSON sidecars
written by ``finegrain train-aligner --recipe v1 --train-images N --val-images
500`` into ``--runs`` (``v1-n<N>.json``); v2 points are the ``lora1@n=N`` rows
of experiments/modelv2_ablation.py's JSONL (``--v2``).

    # the frozen towers' cache, once (timed apart from the runs)
    python -m experiments.v1_curve --data ../shared/data/flickr8k --cache /work/cache/curve/cache --build-cache
    # one run per N (docs/benchmarks.md gives the loop), then the table and the fit
    python -m experiments.v1_curve --runs /work/cache/curve/runs --v2 /work/cache/modelv2/runs.jsonl --goal 26

The fit is least squares of dev R@1 on log2(N), per recipe; the N at which
the line reaches ``--goal`` is an extrapolation, printed with the range that
the slope's standard error gives (when there are more than 2 points).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np


def v1_points(runs: Path) -> list[dict]:
    """One row per ``v1-n<N>.json`` of ``runs`` (the train-aligner sidecars), by N."""
    rows = []
    for path in sorted(runs.glob("v1-n*.json")):
        r = json.loads(path.read_text())
        if "val_metrics" not in r:  # dev chose its epoch: not a point of this curve
            continue
        rows.append({"recipe": "v1", "n": r["train_images"], "epoch": r["best_epoch"], "val": r["val_metrics"],
                     "dev": r["dev_metrics"], "seconds": r["train_seconds"], "weights": path.stem})
    return sorted(rows, key=lambda r: r["n"])


def v2_points(path: Path) -> list[dict]:
    """The ``lora1@n=N`` rows (seed 0) of modelv2_ablation's JSONL."""
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["run"].split("@")[0] != "lora1" or "seed=" in r["run"]:
            continue
        rows.append({"recipe": "v2 (lora1)", "n": r["config"]["train_images"] or 5500, "epoch": r["best_epoch"],
                     "val": r["val"], "dev": r["dev"], "seconds": r["seconds"], "weights": r["run"]})
    return sorted(rows, key=lambda r: r["n"])


def fit(points: list[dict], goal: float) -> dict:
    """Least squares dev R@1 = a + b log2 N; the N where the line reaches ``goal`` (an extrapolation)."""
    x = np.log2([p["n"] for p in points])
    y = np.array([p["dev"]["t2i_r1"] for p in points])
    b, a = np.polyfit(x, y, 1)
    out: dict = {"points": len(points), "a": float(a), "per_doubling": float(b),
                 "n_goal": float(2 ** ((goal - a) / b)) if b > 0 else math.inf}
    if len(points) > 2:
        resid = y - (a + b * x)
        se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
        out["per_doubling_se"] = se
        out["residual_max"] = float(np.abs(resid).max())
        # Through the centroid, with the slope one standard error steeper / shallower.
        out["n_goal_range"] = [float(2 ** (x.mean() + (goal - y.mean()) / s)) if s > 0 else math.inf
                               for s in (b + se, b - se)]
    return out


def report(points: list[dict], goal: float) -> str:
    lines = ["| recipe | train images | chosen epoch | val t2i R@1 | dev t2i R@1 / R@5 / R@10 | dev i2t R@1 | wall s |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        v, d = p["val"], p["dev"]
        lines.append(f"| {p['recipe']} | {p['n']:,} | {p['epoch']} | {v['t2i_r1']:.1f} | {d['t2i_r1']:.1f} / "
                     f"{d['t2i_r5']:.1f} / {d['t2i_r10']:.1f} | {d['i2t_r1']:.1f} | {p['seconds']:.0f} |")
    lines.append("")
    for recipe in dict.fromkeys(p["recipe"] for p in points):
        mine = [p for p in points if p["recipe"] == recipe]
        if len({p["n"] for p in mine}) < 2:
            continue
        f = fit(mine, goal)
        text = (f"{recipe}: dev t2i R@1 = {f['a']:.2f} + {f['per_doubling']:.2f} log2(N) ({f['points']} points); "
                f"R@1 {goal:g} at N ~ {f['n_goal']:,.0f}")
        if "n_goal_range" in f:
            lo, hi = sorted(f["n_goal_range"])
            text += (f" (slope {f['per_doubling']:.2f} +- {f['per_doubling_se']:.2f} per doubling: {lo:,.0f} .. "
                     f"{hi:,.0f}; largest residual {f['residual_max']:.2f})")
        lines.append(text)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--build-cache", action="store_true", help="build v1's frozen-tower cache and stop")
    parser.add_argument("--runs", type=Path, help="folder of v1-n<N>.json sidecars")
    parser.add_argument("--v2", type=Path, help="modelv2_ablation JSONL (lora1@n=N rows)")
    parser.add_argument("--goal", type=float, default=26.0)
    parser.add_argument("--json", action="store_true", help="print the points and fits as JSON")
    args = parser.parse_args()
    if args.build_cache:
        from finegrain.train.aligner import build_cache

        if args.data is None or args.cache is None:
            parser.error("--build-cache needs --data and --cache")
        t0, load = time.time(), os.getloadavg()
        build_cache(args.data, args.cache, show_progress=False)
        print(f"cache ready in {time.time() - t0:.0f}s (load average at start {load[0]:.1f}, "
              f"at end {os.getloadavg()[0]:.1f})")
        return
    points = (v1_points(args.runs) if args.runs else []) + (v2_points(args.v2) if args.v2 else [])
    if args.json:
        fits = {r: fit([p for p in points if p["recipe"] == r], args.goal)
                for r in dict.fromkeys(p["recipe"] for p in points)
                if len({p["n"] for p in points if p["recipe"] == r}) > 1}
        print(json.dumps({"points": points, "fits": fits}, indent=2))
        return
    print(report(points, args.goal))


if __name__ == "__main__":
    main()
