"""Before/after check of the field-extractor refactor: every field's rows, bit for bit, on the sample photos.

Build indexes with every field configuration (global + pooled segments + objects
with refinement + cnn local features fitted on some of the images; crop-mode
segments; objects alone) on scikit-image's sample photos plus one bad file,
with the code on PYTHONPATH, and dump every field's vectors, owners and
attributes, the paths and the failures to an .npz; then compare two dumps::

    PYTHONPATH=/path/to/old/src python -m experiments.fields_parity dump before.npz /tmp/fields-before
    PYTHONPATH=src              python -m experiments.fields_parity dump after.npz /tmp/fields-after
    python -m experiments.fields_parity compare before.npz after.npz

Run on 2026-12-02: main (e2bc31f) against the ``fields`` branch: 42 arrays, all
bit-identical (about 2 minutes per dump on 2 shared cores).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np


def dump(out: Path, work: Path) -> None:
    from PIL import Image
    from skimage import data

    from finegrain.decompose.segments import SegmentConfig
    from finegrain.index import Index
    from finegrain.local.store import LocalConfig
    from finegrain.objects.config import ObjectConfig

    shutil.rmtree(work, ignore_errors=True)
    (work / "photos").mkdir(parents=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        Image.fromarray(getattr(data, name)()).save(work / "photos" / f"{name}.jpg", quality=90)
    (work / "photos" / "bad.jpg").write_bytes(b"nope")
    configs = {
        "all_pool": {"segments": SegmentConfig(levels=(1, 4)),
                     "objects": ObjectConfig(max_objects=4, refine_iters=3),
                     "local": LocalConfig("cnn", {"image_size": 192, "scales": [1.0, 0.707], "max_features": 100},
                                          fit_images=4)},
        "crop": {"segments": SegmentConfig(levels=(2,), embed="crop")},
        "objects_only": {"objects": ObjectConfig(max_objects=3)},
    }
    arrays: dict[str, np.ndarray] = {}
    for name, kw in configs.items():
        idx = Index.create(work / name, **kw)
        rep = idx.add([work / "photos"], batch_size=4, commit_every=5)
        arrays[f"{name}/paths"] = np.array([Path(r.path).name for r in idx.records.values()])
        arrays[f"{name}/failed"] = np.array([f"{Path(p).name}|{r}" for p, r in rep.failed])
        for f, rows in idx.fields.items():
            arrays[f"{name}/{f}/vectors"] = np.asarray(rows.vectors)
            arrays[f"{name}/{f}/owners"] = np.asarray(rows.owners)
            for a, v in rows.attrs.items():
                arrays[f"{name}/{f}/{a}"] = np.asarray(v)
    np.savez(out, **arrays)
    print(f"{len(arrays)} arrays -> {out}")


def compare(a_path: Path, b_path: Path) -> int:
    a, b = np.load(a_path), np.load(b_path)
    bad = 0
    if sorted(a.files) != sorted(b.files):
        print("arrays differ:", sorted(set(a.files) ^ set(b.files)))
        bad += 1
    for k in sorted(set(a.files) & set(b.files)):
        x, y = a[k], b[k]
        if not (x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)):
            bad += 1
            print("DIFF", k, x.shape, y.shape, x.dtype, y.dtype)
    print(f"compared {len(a.files)} arrays: " + ("all bit-identical" if not bad else f"{bad} differ"))
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "dump":
        dump(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
