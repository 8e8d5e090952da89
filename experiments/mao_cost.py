"""CPU cost per image of each MaO indexing stage, in process CPU seconds (robust to a shared machine).

One torch thread, so CPU seconds ~ wall seconds on an idle core. Stages:
proposals (Felzenszwalb regions or YOLOX), crop preparation, crop encoding
(raw GeM at 128 px, all crops of N images batched 64 at a time as the
indexer does), the global vector (224 px), and Stage B refinement (80 steps).

Usage: PYTHONPATH=src OMP_NUM_THREADS=1 python -m experiments.mao_cost [N=40] [regions|yolox]
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from finegrain import encoders
from finegrain.images import load_image
from finegrain.objects.config import ObjectConfig
from finegrain.objects.descriptor import encode_crops, fuse, prepare_objects
from finegrain.objects.proposals import propose
from finegrain.objects.refine import refine_descriptor

torch.set_num_threads(1)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 40
cfg = ObjectConfig(proposals=sys.argv[2] if len(sys.argv) > 2 else "regions")
scenes = sorted((Path(__file__).resolve().parents[2] / "shared/data/needles/scenes").glob("*.jpg"))
if not scenes:
    scenes = sorted(Path("/work/shared/data/needles/scenes").glob("*.jpg"))
scenes = scenes[:N]
enc = encoders.create("effnet-minilm")
cpu = time.process_time
t = {"decode": 0.0, "proposals": 0.0, "crops": 0.0, "encode_crops": 0.0, "global": 0.0, "refine80": 0.0}
items, crops = [], 0
for p in scenes:
    t0 = cpu(); img = load_image(p); t1 = cpu(); props = propose(img, cfg); t2 = cpu()
    it = prepare_objects(img, enc, cfg, props); t3 = cpu()
    g = enc.prepare_image(img)[None]; t4 = cpu(); enc.encode_pixels(g); t5 = cpu()
    t["decode"] += t1 - t0; t["proposals"] += t2 - t1; t["crops"] += t3 - t2; t["global"] += t5 - t3
    items.append(it); crops += len(it.pixels)
pix = np.concatenate([it.pixels for it in items])
t0 = cpu(); v, maps = encode_crops(enc, pix, keep_maps=True); t["encode_crops"] = cpu() - t0
fm = torch.cat(maps); start = 0
rcfg = ObjectConfig(refine_iters=80)
for it in items:
    n = len(it.pixels); vv = v[start:start + n]
    t0 = cpu(); refine_descriptor(fuse(vv, 5.0), vv, fm[start:start + n], it.masks, rcfg); t["refine80"] += cpu() - t0
    start += n
per = {k: round(val / N, 4) for k, val in t.items()}
base = sum(v for k, v in per.items() if k != "refine80")
print(f"{cfg.proposals}: {N} images, {crops / N:.1f} crops/image; CPU s/image: {per}")
print(f"without refinement {base:.3f} CPU s/image = {1 / base:.2f} images/s per core; with refinement {base + per['refine80']:.3f}")
