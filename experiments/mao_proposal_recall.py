"""Proposal recall on ../shared/data/needles: share of pasted landmarks one proposal covers at IoU > 0.5 / 0.7.

Usage: PYTHONPATH=src python -m experiments.mao_proposal_recall regions|yolox [MAX_OBJECTS=24] [THRESHOLD=0.2]
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finegrain.objects.config import ObjectConfig
from finegrain.objects.proposals import iou, propose

D = Path(__file__).resolve().parents[2] / "shared/data/needles"
if not D.exists():
    D = Path("/work/shared/data/needles")
cfg = ObjectConfig(proposals=sys.argv[1], max_objects=int(sys.argv[2]) if len(sys.argv) > 2 else 24,
                   threshold=float(sys.argv[3]) if len(sys.argv) > 3 else 0.2)
scenes = [s for s in json.loads((D / "gnd.json").read_text())["scenes"] if s["landmark"]]
best, counts, t0 = [], [], time.perf_counter()
for s in scenes:
    props = propose(Image.open(D / "scenes" / s["image"]).convert("RGB"), cfg)
    best.append(max([iou(s["box"], b) for b in props.boxes[1:]] + [0.0]))
    counts.append(len(props) - 1)
best = np.array(best)
print(f"{cfg.proposals} max_objects={cfg.max_objects} threshold={cfg.threshold}: IoU>0.5 {np.mean(best > 0.5):.2f}, "
      f"IoU>0.7 {np.mean(best > 0.7):.2f}, {np.mean(counts):.1f} objects/image, "
      f"{(time.perf_counter() - t0) / len(scenes):.3f} s/image (wall, shared machine)")
