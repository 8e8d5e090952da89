"""PCA vs AE-SVC vs (SS)2D by class mAP with all 7,000 Flickr8k images as distractors (fit on 7,238 rows).

Landmark and dev vectors come from the bench index (as in ``aesvc_ablation.py``),
the 6,000 train images are encoded once and cached. Default parameters, one
torch thread. Prints one JSON line.

Usage::

    python -m experiments.compress_all7k [--data ../shared/data] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from experiments.aesvc_ablation import DEFAULT_CACHE, DEFAULT_DATA, load_data  # noqa: E402

from finegrain.bench.compress import class_map  # noqa: E402
from finegrain.compress import AESVC, PCA, SS2D  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = load_data(args.data, "effnet-minilm", args.cache_dir, ["all7k"])
    D = np.concatenate([bench.landmarks, bench.distractors["all7k"]])
    labels, n = bench.labels, len(bench.labels)
    out: dict = {"database": len(D), "none": class_map(D, labels, n)}
    for d in (32, 64, 128):
        out[f"pca {d}"] = class_map(PCA(d).fit(D).transform(D), labels, n)
        out[f"aesvc {d}"] = [class_map(AESVC(d, random_state=s).fit(D).transform(D), labels, n) for s in args.seeds]
    for teacher in ("aesvc", None):
        s = SS2D(256, teacher=teacher).fit(D)
        out[f"ss2d teacher={teacher or 'input'}"] = {d: class_map(s.transform(D, dim=d), labels, n) for d in (16, 32, 64, 128, 256)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
