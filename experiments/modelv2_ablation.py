"""Ablation, seeds and learning curve of the ``effnet-minilm-v2`` recipe (docs/benchmarks.md, "The bundled model, v2").

Every run trains with :func:`finegrain.train.aligner_v2.train_aligner_v2`: the
epoch is chosen on the validation slice (the last 500 Flickr8k train images
in split-file order, never trained on); dev is evaluated once, with the
chosen weights, and never used to choose anything. Each run appends one JSON
line to ``--out`` (runs already there are skipped, so the script resumes):
its config, the chosen epoch, validation and dev metrics in ``global`` mode,
and the multi-vector ``exhaustive`` score (the product's formula, w = 0.5,
mean over the caption and its rule-based sub-queries of the best SLIC
segment at any level) on the validation slice and on dev, computed from the
cached 224 px maps (7 x 7 grid; the product indexes segments at 320 px, see
experiments/modelv2_dev_modes.py for that).

    python -m experiments.modelv2_ablation --data ../shared/data/flickr8k --cache /work/cache/modelv2/cache \
        --out /work/cache/modelv2/runs.jsonl --weights /work/cache/modelv2/runs RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from finegrain.encoders.effnet_minilm_v2 import apply_text_state, load_v2
from finegrain.encoders.minilm import load_minilm
from finegrain.eval.metrics import recall_at_k
from finegrain.train.aligner_v2 import Ragged, TextTop, TrainConfigV2, encode_texts, open_rows, train_aligner_v2

BASE = {"text_adapter": "frozen", "text_layers": 0, "views": 0, "phrase_dropout": 0.0, "hard_negative": 0.0,
        "region": 0.0, "epochs": 10, "batch_size": 128}
TEXT = {"text_adapter": "lora", "text_layers": 1, "lr_text": 5e-4}
AUG = {"views": 1, "phrase_dropout": 0.3}
RUNS: dict[str, dict] = {
    "frozen": BASE,
    "lora1": {**BASE, **TEXT},
    "delta1": {**BASE, "text_adapter": "delta", "text_layers": 1, "lr_text": 1e-4},
    "lora2": {**BASE, **TEXT, "text_layers": 2},
    "aug": {**BASE, **TEXT, **AUG},
    "hardneg": {**BASE, **TEXT, **AUG, "hard_negative": 0.5},
    "region": {**BASE, **TEXT, **AUG, "hard_negative": 0.5, "region": 0.5},
}


def run_config(name: str, overrides: dict[str, dict]) -> TrainConfigV2:
    """A run name: a RUNS key, optionally suffixed ``@seed=N``, ``@n=N`` (train images) or ``@key=value``."""
    base, *mods = name.split("@")
    cfg = dict(overrides.get(base) or RUNS[base])
    for mod in mods:
        key, _, value = mod.partition("=")
        key = {"n": "train_images"}.get(key, key)
        cfg[key] = type(asdict(TrainConfigV2())[key])(value)
    return TrainConfigV2(**cfg)


def multivector_recall(img: np.ndarray, seg: np.ndarray, seg_owner: np.ndarray, queries: np.ndarray,
                       query_caption: np.ndarray, target: np.ndarray, w: float = 0.5) -> dict:
    """``global`` and ``exhaustive`` text->image recall; row 0 of each caption's queries is the caption itself."""
    first = np.flatnonzero(np.r_[True, np.diff(query_caption) != 0])
    glob = queries[first] @ img.T  # (captions, images)
    order = np.argsort(seg_owner, kind="stable")
    seg, owner = seg[order], seg_owner[order]
    starts = np.flatnonzero(np.r_[True, np.diff(owner) != 0])
    best = np.full((len(queries), len(img)), -2.0, np.float32)
    for at in range(0, len(queries), 512):
        s = queries[at:at + 512] @ seg.T
        best[at:at + 512, owner[starts]] = np.maximum.reduceat(s, starts, axis=1)
    counts = np.bincount(query_caption)
    seg_score = np.add.reduceat(best, first, axis=0) / counts[:, None]
    out = {}
    for mode, score in (("global", glob), ("exhaustive", w * glob + (1 - w) * seg_score)):
        rank = (score > score[np.arange(len(target)), target][:, None]).sum(1)
        out.update({f"{mode}_t2i_r{k}": 100 * recall_at_k(rank, k) for k in (1, 5, 10)})
    return out


def evaluate_modes(weights: Path, cache: Path, data: Path, split: str) -> dict:
    """Global and exhaustive recall of trained v2 weights on ``split`` ("val" or "dev") from the cached features."""
    from finegrain.datasets import load_flickr8k

    aligner, text_state, config = load_v2(weights)
    _, model = load_minilm()
    apply_text_state(model, text_state)
    top = TextTop(model).eval()
    source = "train" if split == "val" else split
    ds = load_flickr8k(data, source)
    n_images = len(ds.images)
    images = np.arange(n_images - config["recipe"]["val_images"], n_images) if split == "val" else np.arange(n_images)
    caption_image = np.asarray(ds.caption_image)
    captions = np.flatnonzero(np.isin(caption_image, images))
    maps = open_rows(cache, f"{source}-v0", TrainConfigV2(train_images=1)) if split == "val" else \
        np.load(cache / f"{source}-v0.npy", mmap_mode="r")  # val: the tail rows, written first
    segs = Ragged(cache, f"{source}-seg")
    caps, parts = Ragged(cache, f"{source}-cap"), Ragged(cache, f"{source}-part")
    part_offsets = np.load(cache / f"{source}-caption-parts.npy")
    with torch.no_grad():
        fm = torch.from_numpy(np.asarray(maps[images], np.float32))
        img = F.normalize(aligner.image_embed(fm), dim=-1).numpy()
        seg_list, owner = [], []
        for n, i in enumerate(images):
            m = segs.gather(np.array([i])).view(-1, *fm.shape[2:])
            pooled = aligner.image_pool.pool_regions(fm[n], m)
            seg_list.append(F.normalize(aligner.image_head(pooled), dim=-1).numpy())
            owner.append(np.full(len(m), n))
        cap_emb = np.concatenate([F.normalize(encode_texts(top, aligner, caps, captions[a:a + 500]), dim=-1).numpy()
                                  for a in range(0, len(captions), 500)])
        part_items = [np.arange(part_offsets[c], part_offsets[c + 1]) for c in captions]
        flat = np.concatenate(part_items)
        part_emb = np.concatenate([F.normalize(encode_texts(top, aligner, parts, flat[a:a + 1000]), dim=-1).numpy()
                                   for a in range(0, len(flat), 1000)])
    queries, query_caption, at = [], [], 0
    for c, items in enumerate(part_items):
        queries.append(cap_emb[c:c + 1])
        queries.append(part_emb[at:at + len(items)])
        query_caption += [c] * (1 + len(items))
        at += len(items)
    position = {int(i): n for n, i in enumerate(images)}
    target = np.array([position[int(caption_image[c])] for c in captions])
    return multivector_recall(img, np.concatenate(seg_list), np.concatenate(owner), np.concatenate(queries),
                              np.asarray(query_caption), target)


def table(path: Path) -> str:
    """The runs of a JSONL file as a markdown table (validation chose; dev only reported)."""
    rows = ["| run | train images | chosen epoch | val t2i R@1 | val exh. R@1 | dev t2i R@1 / R@5 / R@10 | dev i2t R@1 "
            "| dev exh. R@1 / R@10 | exh. - global R@1 | s |", "|" + "---|" * 10]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        v, d, m = r["val"], r["dev"], r["modes"]
        rows.append(f"| {r['run']} | {r['config']['train_images'] or 5500} | {r['best_epoch']} | {v['t2i_r1']:.1f} | "
                    f"{m['val']['exhaustive_t2i_r1']:.1f} | "
                    f"{d['t2i_r1']:.1f} / {d['t2i_r5']:.1f} / {d['t2i_r10']:.1f} | "
                    f"{d['i2t_r1']:.1f} | {m['dev']['exhaustive_t2i_r1']:.1f} / {m['dev']['exhaustive_t2i_r10']:.1f} | "
                    f"{m['dev']['exhaustive_t2i_r1'] - m['dev']['global_t2i_r1']:+.1f} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="JSON file of extra named configs (chosen on validation)")
    parser.add_argument("--table", action="store_true", help="print --out as a markdown table and stop")
    parser.add_argument("runs", nargs="*")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    overrides = json.loads(args.config.read_text()) if args.config else {}
    done = set()
    if args.out.exists():
        done = {json.loads(line)["run"] for line in args.out.read_text().splitlines() if line.strip()}
    for name in args.runs:
        if name in done:
            continue
        config = run_config(name, overrides)
        t0 = time.time()
        weights = args.weights / f"{name}.safetensors"
        if weights.with_suffix(".json").exists():  # trained already (its evaluation failed or was interrupted)
            result = json.loads(weights.with_suffix(".json").read_text())
            t0 -= result["train_seconds"]
        else:
            result = train_aligner_v2(args.data, weights, args.cache, config, show_progress=False, build=False,
                                      log=lambda m, name=name: print(f"[{name}] {m}", flush=True))
        modes = {"val": evaluate_modes(weights, args.cache, args.data, "val"),
                 "dev": evaluate_modes(weights, args.cache, args.data, "dev")}
        row = {"run": name, "config": asdict(config), "best_epoch": result["best_epoch"],
               "val": result["val_metrics"], "dev": result["dev_metrics"], "modes": modes,
               "seconds": round(time.time() - t0, 1), "history": result["history"]}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"[{name}] chosen epoch {row['best_epoch']}: val t2i R@1 {row['val']['t2i_r1']:.2f}, "
              f"val exhaustive R@1 {modes['val']['exhaustive_t2i_r1']:.2f} | dev t2i R@1/5/10 "
              f"{row['dev']['t2i_r1']:.2f}/{row['dev']['t2i_r5']:.2f}/{row['dev']['t2i_r10']:.2f} "
              f"i2t R@1 {row['dev']['i2t_r1']:.2f}, dev exhaustive R@1 {modes['dev']['exhaustive_t2i_r1']:.2f} "
              f"({row['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
