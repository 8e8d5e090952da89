"""Dump every mode's rankings on a small real index, to compare the search core before and after a refactor.

Usage: python -m experiments.core_rankings OUT.json [--index-dir DIR]
Run it with the code before a change and after it on the same index, then compare the two files
(``python -m experiments.core_rankings --compare BEFORE.json AFTER.json``).
Builds (once) a 160-image Flickr8k dev index with global + segments + objects + local (cnn) features,
then runs text queries (dev captions) and image queries (crops of dev images) in every mode it supports.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "flickr8k"


def hits_of(res):
    hits = res[0] if isinstance(res, tuple) else res
    return [[int(h.id), round(float(h.score), 5)] for h in hits]


def compare(before: Path, after: Path) -> None:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    for key in a:
        same = all([x[0] for x in qa] == [x[0] for x in qb] for qa, qb in zip(a[key], b[key]))
        diff = max((abs(x[1] - y[1]) for qa, qb in zip(a[key], b[key]) for x, y in zip(qa, qb)), default=0.0)
        print(f"{key:22s} queries {len(a[key]):3d}  same ids {same}  max score difference {diff:.1e}")


def main() -> None:
    if sys.argv[1] == "--compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    from finegrain.index import Index
    from finegrain.decompose.segments import SegmentConfig

    out = Path(sys.argv[1])
    idx_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/tmp/rankcheck-index")
    dev = (DATA / "splits" / "dev.txt").read_text().split()[:160]
    if not (idx_dir / "finegrain.sqlite").exists():
        idx = Index.create(idx_dir, segments=SegmentConfig(levels=(4, 9, 16)), objects="regions",
                           local={"extractor": "cnn", "params": {"image_size": 256}})
        idx.add([str(DATA / "images" / n) for n in dev], show_progress=True, commit_every=64)
        idx.close()
    idx = Index.open(idx_dir)
    caps = [l.split("\t") for l in (DATA / "captions.tsv").read_text().splitlines()[1:]]
    texts = [c[2] for c in caps if c[0] in set(dev[:20])][:20:2]
    images = [str(DATA / "images" / n) for n in dev[100:106]]
    result: dict = {}
    text_modes = ["global", "single", "exhaustive", "hierarchical"]
    image_modes = text_modes + ["objects", "objects-max", "global+local", "local", "l2g", "instance"]
    for mode in text_modes:
        result[f"text/{mode}"] = [hits_of(idx.search(text=t, k=20, mode=mode)) for t in texts]
    for mode in image_modes:
        rows = []
        for p in images:
            for bbox in (None, (20, 30, 180, 200)):
                if mode == "instance":
                    try:
                        r = idx.search(image=p, k=20, mode="instance", bbox=bbox)
                    except ValueError:
                        r = idx.search(image=p, k=20, mode="global", bbox=bbox, global_field="instance")
                else:
                    r = idx.search(image=p, k=20, mode=mode, bbox=bbox)
                rows.append(hits_of(r))
        result[f"image/{mode}"] = rows
    out.write_text(json.dumps(result))
    print("wrote", out, {k: len(v) for k, v in result.items()})


if __name__ == "__main__":
    main()
