"""Learning curve of the bundled model's recipes: dev text->image R@1 against training images (issue 19).

Every point is chosen on the validation slice (the last 500 Flickr8k train
images in split-file order, never trained on) and reported on dev (1,000
images, 5,000 captions), which chose nothing. v1 points are the JSON sidecars
written by ``finegrain train-aligner --recipe v1 --train-images N --val-images
500`` into ``--runs`` (``v1-n<N>.json``); v2 points are the ``lora1@n=N`` rows
of experiments/modelv2_ablation.py's JSONL (``--v2``).

    # the frozen towers' cache, once (timed apart from the runs), in the order the points need it
    python -m experiments.v1_curve --data ../shared/data/flickr8k --cache /work/cache/curve --staged 1000 2000 4000 5500
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

VIEWS = ("orig", "flip")


def _keys(data: Path) -> tuple[dict, dict, dict]:
    """The splits and the manifests ``finegrain.train.aligner.build_cache`` checks (same inputs, same settings)."""
    from finegrain.datasets import load_flickr8k
    from finegrain.train.aligner import IMAGE_SIZE

    splits = {name: load_flickr8k(data, name) for name in ("train", "dev")}
    image_key = {"images": {k: s.images for k, s in splits.items()}, "views": list(VIEWS), "image_size": IMAGE_SIZE,
                 "activation": "relu6"}
    text_key = {"captions": {k: s.captions for k, s in splits.items()}, "max_tokens": 64}
    return splits, image_key, text_key


def build_staged(data: Path, root: Path, stages: list[int], val_images: int = 500, log=print) -> None:
    """v1's frozen-tower cache in the order the curve's points need it, with a cache folder per point.

    The arrays are the ones :func:`finegrain.train.aligner.build_cache` writes (same trunk, same pixels, float16),
    filled in priority order: the text tower, dev's original view, the validation slice's original view, then
    train images 0, 1, ... with both views. When the first N train images are done, ``root/stage-N`` is made:
    links to the arrays and the manifests that ``build_cache`` accepts, so ``finegrain train-aligner --cache-dir
    root/stage-N --train-images N --val-images 500`` starts while later rows are computed. Rows a run with
    those options never reads (train images N..5499, the flip view of dev and of the validation slice) may
    still be zeros there: the epoch loop reads the first N train rows and evaluation the original view only
    (tests/test_aligner_selection.py poisons unread rows to check it). Resumable (``root/full/progress.json``).
    """
    import torch

    from finegrain.encoders.effnet_minilm import (
        TEXT_MAX_TOKENS,
        ImageTrunk,
        load_efficientnet_lite0,
        load_minilm,
        minilm_token_states,
        pixels_to_array,
    )
    from finegrain.images import load_image
    from finegrain.train.aligner import IMAGE_SIZE

    splits, image_key, text_key = _keys(data)
    full = root / "full"
    full.mkdir(parents=True, exist_ok=True)
    progress_path = full / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"dev": 0, "tail": 0, "head": 0}

    def save_progress() -> None:
        progress_path.write_text(json.dumps(progress))

    t0 = time.time()
    torch.set_grad_enabled(False)
    tokenizer, model = load_minilm()
    for name, split in splits.items():  # the text tower: as aligner._cache_texts, per split
        if (full / f"{name}-mask.npy").exists():
            continue
        texts = split.captions
        lengths = tokenizer(texts, TEXT_MAX_TOKENS)[1].sum(1).tolist()
        tokens = np.zeros((len(texts), max(lengths), 384), np.float16)
        mask = np.zeros((len(texts), max(lengths)), np.uint8)
        order = np.argsort(lengths)
        for start in range(0, len(texts), 256):
            idx = order[start:start + 256]
            states, m = minilm_token_states(tokenizer, model, [texts[i] for i in idx])
            tokens[idx, : states.shape[1]] = states.numpy().astype(np.float16)
            mask[idx, : m.shape[1]] = m.numpy().astype(np.uint8)
        np.save(full / f"{name}-tokens.npy", tokens)
        np.save(full / f"{name}-mask.npy", mask)
        log(f"[{time.time() - t0:5.0f}s] text tower ({name}): {len(texts)} captions")

    arrays = {}
    for name, split in splits.items():
        shape = (len(split.images), 192, IMAGE_SIZE // 32, IMAGE_SIZE // 32)
        for view in VIEWS:
            path = full / f"{name}-{view}.npy"
            mode = "r+" if path.exists() else "w+"
            arrays[name, view] = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=shape)
    trunk = ImageTrunk(load_efficientnet_lite0()).eval()
    n_train = len(splits["train"].images)
    limit = n_train - val_images

    def run(name: str, rows: np.ndarray, flip: bool) -> None:
        paths = splits[name].image_paths()
        x = torch.from_numpy(np.stack([pixels_to_array(load_image(paths[r]), IMAGE_SIZE) for r in rows]))
        arrays[name, "orig"][rows] = trunk(x).numpy().astype(np.float16)
        if flip:
            arrays[name, "flip"][rows] = trunk(torch.flip(x, dims=[3])).numpy().astype(np.float16)

    def publish() -> None:
        for n in stages:
            stage = root / f"stage-{n}"
            if progress["head"] < n or progress["dev"] < len(splits["dev"].images) or \
                    progress["tail"] < val_images or (stage / "images.json").exists():
                continue
            stage.mkdir(exist_ok=True)
            for f in full.glob("*.npy"):
                (stage / f.name).unlink(missing_ok=True)
                (stage / f.name).symlink_to(f)
            (stage / "texts.json").write_text(json.dumps(text_key))
            (stage / "images.json").write_text(json.dumps(image_key))  # last: build_cache's "complete" mark
            log(f"[{time.time() - t0:5.0f}s] stage {n} ready: {stage}")

    plan = [("dev", progress["dev"], len(splits["dev"].images), 0, False),
            ("tail", progress["tail"], val_images, limit, False),
            ("head", progress["head"], max(stages), 0, True)]
    for key, done, total, offset, flip in plan:
        name = "dev" if key == "dev" else "train"
        for at in range(done, total, 64):
            rows = np.arange(at, min(at + 64, total))
            run(name, rows + offset, flip)
            for view in VIEWS:
                arrays[name, view].flush()
            progress[key] = int(rows[-1] + 1)
            save_progress()
            publish()
        log(f"[{time.time() - t0:5.0f}s] images {key}: {total} done")
    publish()


def v1_points(runs: Path) -> list[dict]:
    """One row per ``v1-n<N>.json`` of ``runs`` (the train-aligner sidecars), by N."""
    rows = []
    for path in sorted(runs.glob("v1-n*.json")):
        r = json.loads(path.read_text())
        if "val_metrics" not in r:  # dev chose its epoch: not a point of this curve
            continue
        epochs, batch = r["recipe"]["epochs"], r["recipe"]["batch_size"]
        rows.append({"recipe": "v1" if epochs == 15 else f"v1, {epochs} epochs", "n": r["train_images"],
                     "epoch": r["best_epoch"], "steps": max(1, r["train_images"] // batch) * r["best_epoch"],
                     "val": r["val_metrics"], "dev": r["dev_metrics"], "seconds": r["train_seconds"],
                     "weights": path.stem})
    return sorted(rows, key=lambda r: r["n"])


def v2_points(path: Path) -> list[dict]:
    """The ``lora1@n=N`` rows (seed 0) of modelv2_ablation's JSONL (wall s: training alone, from the weights'
    sidecar in ``runs/`` beside it when there, as docs/benchmarks.md's ablation table gives it)."""
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["run"].split("@")[0] != "lora1" or "seed=" in r["run"]:
            continue
        sidecar = path.parent / "runs" / f"{r['run']}.json"
        if sidecar.exists():
            r["seconds"] = json.loads(sidecar.read_text())["train_seconds"]
        n = r["config"]["train_images"] or 5500
        rows.append({"recipe": "v2 (lora1)", "n": n, "epoch": r["best_epoch"],
                     "steps": max(1, n // r["config"]["batch_size"]) * r["best_epoch"],
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
    lines = ["| recipe | train images | chosen epoch (steps) | val t2i R@1 | dev t2i R@1 / R@5 / R@10 | dev i2t R@1 "
             "| wall s |", "|---|---|---|---|---|---|---|"]
    for p in points:
        v, d = p["val"], p["dev"]
        lines.append(f"| {p['recipe']} | {p['n']:,} | {p['epoch']} ({p['steps']}) | {v['t2i_r1']:.1f} | "
                     f"{d['t2i_r1']:.1f} / {d['t2i_r5']:.1f} / {d['t2i_r10']:.1f} | {d['i2t_r1']:.1f} | "
                     f"{p['seconds']:.0f} |")
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
    parser.add_argument("--staged", type=int, nargs="*", help="build the cache in stages for these N and stop")
    parser.add_argument("--runs", type=Path, help="folder of v1-n<N>.json sidecars")
    parser.add_argument("--v2", type=Path, help="modelv2_ablation JSONL (lora1@n=N rows)")
    parser.add_argument("--goal", type=float, default=26.0)
    parser.add_argument("--json", action="store_true", help="print the points and fits as JSON")
    args = parser.parse_args()
    if args.staged:
        if args.data is None or args.cache is None:
            parser.error("--staged needs --data and --cache")
        build_staged(args.data, args.cache, sorted(args.staged),
                     log=lambda m: print(f"{m} (load {os.getloadavg()[0]:.1f})", flush=True))
        return
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
