"""Object-index build speed: crop size x the indexer's mmap threshold for large blocks (user/system CPU, wall).

Each configuration indexes the same needles scenes into a fresh index in its own process
(``--objects regions``, the default settings otherwise) and prints wall seconds, user and system CPU seconds,
page faults and images/s. ``keep-heap``: ``finegrain.heap.map_large_blocks`` replaced by a no-op, i.e. glibc's
own mmap threshold.

Usage: PYTHONPATH=src python -m experiments.objects_index_speed N_SCENES [CROP ...]
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENES = Path("../shared/data/needles/scenes")


def one(n: int, crop: int, heap: str) -> dict:
    import finegrain.indexer as indexer
    from finegrain.index import Index
    from finegrain.objects.config import ObjectConfig

    if heap == "keep-heap":
        indexer.map_large_blocks = lambda *a, **k: False  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "scenes"
        src.mkdir()
        for p in sorted(SCENES.iterdir())[:n]:
            (src / p.name).symlink_to(p.resolve())
        index = Index.create(Path(tmp) / "i.fg", objects=ObjectConfig(crop_size=crop))
        index.encoder  # load the model before timing  # noqa: B018
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        index.add([src], show_progress=False)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {"crop": crop, "heap": heap, "images": n, "wall_s": round(t1 - t0, 1),
            "user_s": round(r1.ru_utime - r0.ru_utime, 1), "sys_s": round(r1.ru_stime - r0.ru_stime, 1),
            "minor_faults": r1.ru_minflt - r0.ru_minflt, "images_per_s": round(n / (t1 - t0), 2)}


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(json.dumps(one(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
    else:
        n = int(sys.argv[1])
        for crop in [int(c) for c in sys.argv[2:]] or [128, 192]:
            for heap in ("map-large", "keep-heap"):
                out = subprocess.run([sys.executable, "-m", "experiments.objects_index_speed", "--one", str(n),
                                      str(crop), heap], capture_output=True, text=True, check=True)
                print(out.stdout.strip().splitlines()[-1], flush=True)
