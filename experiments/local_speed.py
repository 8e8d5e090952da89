"""CPU seconds per image of ``Index.add`` with ``--local cnn`` (issue 17's settings), for docs/l2g.md.

Fits the whitening on the images of ``--fit`` in a first ``add``, then times
(``time.process_time``, all threads) the ``add`` of ``--images`` into the same
fresh index. Run it with two source trees back to back to compare code
versions::

    PYTHONPATH=OLD/src .venv/bin/python -m experiments.local_speed --fit FIT --images IMGS --threads 1
    PYTHONPATH=NEW/src .venv/bin/python -m experiments.local_speed --fit FIT --images IMGS --threads 1

``--profile`` prints cProfile tables (cumulative and own time) of the timed ``add``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", required=True, help="folder of images the whitening is fitted on (first add)")
    ap.add_argument("--images", required=True, help="folder of images whose add is timed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the extractor's threads too)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from finegrain import Index
    from finegrain.local.store import LocalConfig

    n = sum(1 for p in Path(args.images).iterdir() if p.is_file())
    cfg = LocalConfig("cnn", {"scales": [1.0, 0.707, 0.5], "max_features": 1000, "image_size": 512,
                              "threads": args.threads}, fit_images=128)
    root = Path(tempfile.mkdtemp(prefix="local-speed-"))
    try:
        index = Index.create(root / "idx", local=cfg)
        index.add([args.fit])  # fits the whitening and loads the models
        prof = cProfile.Profile() if args.profile else None
        c0, w0 = time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        report = index.add([args.images])
        if prof:
            prof.disable()
        c1, w1 = time.process_time(), time.perf_counter()
        if prof:
            stats = pstats.Stats(prof)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
        print(f"{report.indexed} images: {(c1 - c0) / n:.3f} CPU s/image, {(w1 - w0) / n:.3f} wall s/image, "
              f"torch threads {torch.get_num_threads()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
