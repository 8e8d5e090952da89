"""Fit time of PCA, AE-SVC and (SS)2D on 10,000 real-valued embeddings (the "under 2 minutes" goal).

The rows are the 1,238 ``effnet-minilm`` global embeddings of the Revisited-
Paris-mini + Flickr8k-dev bench index (the one ``finegrain bench compress``
uses), resampled to 10,000 with small Gaussian noise and re-normalised:
training time depends on the step count and layer sizes, not on which rows
(AE-SVC's default ``n_steps="auto"`` takes 50 epochs: 1,954 steps for 10,000 rows).
Default parameters (one torch thread while training). Wrap in
``flock /tmp/finegrain-bench.lock`` on a shared machine.

Usage::

    python -m experiments.compress_fit_time [--data ../shared/data] [--rows 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from finegrain.bench.revisitop import revisitop_index
from finegrain.compress import AESVC, PCA, SS2D
from finegrain.datasets import load_revisitop

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "finegrain" / "bench")
    args = parser.parse_args()
    flickr = args.data / "flickr8k"
    bench = load_revisitop(args.data / "rparis6k-mini", None, flickr / "images", flickr / "splits" / "dev.txt")
    index, _, _ = revisitop_index(bench, "effnet-minilm", args.cache_dir, show_progress=True)
    base = np.asarray(index.global_rows.vectors, dtype=np.float32)
    rng = np.random.default_rng(0)
    X = base[rng.integers(0, len(base), args.rows)] + 0.02 * rng.normal(size=(args.rows, base.shape[1])).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    out: dict = {"rows": len(X), "distinct_source_rows": len(base)}
    for name, make in [("pca 128", lambda: PCA(128)), ("aesvc 128", lambda: AESVC(128)),
                       ("ss2d 256, input teacher", lambda: SS2D(256, teacher=None)),
                       ("ss2d 256, aesvc teacher (teacher fit included)", lambda: SS2D(256))]:
        t0 = time.perf_counter()
        make().fit(X)
        out[name] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
