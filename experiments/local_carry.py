"""Appending to a large index with local features: the local structures extended, not built again
(docs/l2g.md, "After an append"; docs/benchmarks.md).

Takes a synthetic bench index whose ``local`` and ``l2g`` structures are built (``finegrain prepare --index
INDEX --mode l2g``), makes a copy of it that shares its immutable files (hard links; the catalog is copied),
appends ``--append`` synthetic images drawn from ``--source`` as ``finegrain bench scale`` draws them, then
times ``finegrain prepare --mode l2g`` on the copy (what the first search after the append pays) in its own
process, and the ``local`` and ``l2g`` searches of ``--queries`` Flickr8k dev images on the original and on
the copy, each mode in its own process::

    .venv/bin/python -m experiments.local_carry INDEX --source dev-local.fg --append 1000 --work WORK \\
        --data ../shared/data/flickr8k --json carry.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def _copy_sharing_files(src: Path, dst: Path) -> None:
    """``dst``: ``src`` with every file hard-linked except the catalog, which the writer changes in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    for f in dst.glob("finegrain.sqlite*"):
        f.unlink()
        shutil.copy2(src / f.name, f)


def _prepare(path: str) -> dict:
    import resource

    from finegrain import Index

    t0 = time.perf_counter()
    with Index.open(path) as index:
        ready = index.prepare(["l2g"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"prepare_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_mb), "ready": ready}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--source", required=True, help="the index the synthetic images were drawn from")
    ap.add_argument("--append", type=int, default=1000)
    ap.add_argument("--work", required=True, help="an empty folder on the same file system as INDEX")
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()

    from finegrain.bench.peers import in_child
    from finegrain.bench.scale import Source, append_synthetic, flickr8k_image_queries, measure_mode

    work = Path(args.work)
    copy = work / "appended.fg"
    if copy.exists():
        shutil.rmtree(copy)
    work.mkdir(parents=True, exist_ok=True)
    _copy_sharing_files(Path(args.index), copy)
    append_s = append_synthetic(copy, Source.from_index(args.source), args.append)
    result: dict = {"index": args.index, "appended": args.append, "append_s": round(append_s, 1)}
    result["prepare"] = in_child(_prepare, str(copy))
    print(json.dumps(result), flush=True)
    images = flickr8k_image_queries(args.data, "dev", args.queries)
    rows = []
    for name, path in (("before the append", args.index), ("after, carried", str(copy))):
        for mode in ("local", "l2g"):
            row, _ = in_child(measure_mode, path, mode, [], 10, images)
            rows.append({"index": name, **{k: row[k] for k in ("mode", "p50_ms", "p95_ms", "rss_mb")}})
            print(json.dumps(rows[-1]), flush=True)
    result["modes"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
