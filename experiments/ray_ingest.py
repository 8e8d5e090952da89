"""Ray ingestion overhead: index the same images with the local engine and with --engine ray.

Builds two fresh indexes of the first N images of a folder (or a list file),
times both runs, checks that the results are identical (ids, paths, vectors
within 1e-5) and prints a table and one JSON line.

Usage: python -m experiments.ray_ingest IMAGES_DIR [--list FILE] [--n 1000] [--segments 4,9,16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path)
    ap.add_argument("--list", type=Path, help="file names to use, one per line (e.g. flickr8k/splits/dev.txt)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--segments", default="", help="also store segments at these granularities")
    args = ap.parse_args()
    names = args.list.read_text().split() if args.list else sorted(p.name for p in args.images.iterdir())
    files = [args.images / n for n in names[:args.n]]
    seg = SegmentConfig(levels=tuple(int(v) for v in args.segments.split(","))) if args.segments else None

    work = Path(tempfile.mkdtemp(prefix="fg-ray-bench-"))
    try:
        Index.create(work / "warm").add(files[:8])  # load the model once before timing either engine
        seconds, indexes = {}, {}
        for engine in ("local", "ray"):
            index = Index.create(work / engine, segments=seg)
            t0 = time.perf_counter()
            report = index.add(files, engine=engine, show_progress=False)
            seconds[engine] = time.perf_counter() - t0
            indexes[engine] = index
            print(f"{engine:>5}: {report.indexed} images in {seconds[engine]:.1f} s "
                  f"({report.indexed / seconds[engine]:.1f} images/s), {len(report.failed)} failed", flush=True)
        a, b = indexes["local"], indexes["ray"]
        same_ids = {i: r.path for i, r in a.records.items()} == {i: r.path for i, r in b.records.items()}
        max_diff = max(float(np.abs(a.fields[f].vectors - b.fields[f].vectors).max()) for f in a.fields)
        result = {"images": len(a), "local_s": seconds["local"], "ray_s": seconds["ray"],
                  "ray_over_local": seconds["ray"] / seconds["local"], "same_ids": same_ids,
                  "max_vector_diff": max_diff, "segments": args.segments or None}
        print(f"ray/local time {result['ray_over_local']:.2f}x; same ids and paths: {same_ids}; "
              f"max |vector diff| {max_diff:.2e}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
