"""A random segmented index for tests that need vectors, not photos (candidate stages, tuning)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index
from finegrain.store.catalog import NewImage
from finegrain.store.vectors import FieldRows


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_segmented_index(path: Path, n: int, seed: int, levels: tuple[int, ...] = (4,)) -> Index:
    """``n`` images with random unit vectors: a global vector and 1 + 4 segments each (levels 0 and 1)."""
    idx = Index.create(path, segments=SegmentConfig(levels=levels))
    rng = np.random.default_rng(seed)
    d, per = idx.encoder.dim, 5
    images = [NewImage(f"/r/{i}.jpg", f"{i:064x}", 1, 1, 32, 32) for i in range(n)]
    segs = FieldRows(unit(rng.standard_normal((n * per, d))), np.repeat(np.arange(n), per),
                     {"level": np.tile(np.array([0, 1, 1, 1, 1]), n), "box": np.zeros((n * per, 4), np.float32),
                      "area": np.full(n * per, 0.25, np.float32)})
    with idx.writer() as w:
        w.commit(images, {"global": FieldRows(unit(rng.standard_normal((n, d))), np.arange(n)), "segments": segs},
                 [], [], [])
    idx.refresh()
    return idx
