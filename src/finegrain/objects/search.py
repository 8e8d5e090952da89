"""Scoring images by their objects: ``objects`` (averaged descriptor), ``objects-max``, ``objects-refined``.

Vector fields an object index stores (one chunk per commit, like ``global``):

* ``objects``: one row per object crop (row 0 of each image = the whole
  image), with attributes ``box`` (normalised x0 y0 x1 y1) and ``score``;
* ``objects_mean``: one row per image, the multi-object descriptor;
* ``objects_refined``: one row per image, the Stage B descriptor (only when
  the index was built with refinement).

Scores are exact inner products (numpy): one descriptor per image is as
cheap as the global field; ``objects-max`` reads every object row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..compress.storage import IDENTITY, Codec
from ..store.vectors import FieldRows

OBJECT_MODES = ("objects", "objects-max", "objects-refined")
#: Field read by each mode.
FIELDS = {"objects": "objects_mean", "objects-max": "objects", "objects-refined": "objects_refined"}


class ObjectTable:
    """Object rows grouped by image in the global field's row order, for per-image max."""

    def __init__(self, objects: FieldRows, image_order: np.ndarray, codec: Codec = IDENTITY):
        self.n_images = len(image_order)
        self.codec = codec  # a field stored compact (`finegrain compress --field objects`): project, dequantise
        sorter = np.argsort(image_order, kind="stable")
        pos = sorter[np.searchsorted(image_order, objects.owners, sorter=sorter)]
        order = np.argsort(pos, kind="stable")
        self.vectors = np.ascontiguousarray(objects.vectors[order])
        self.positions = pos[order]
        self.boxes = np.asarray(objects.attrs["box"])[order] if "box" in objects.attrs else None
        self.offsets = np.searchsorted(self.positions, np.arange(self.n_images + 1))

    def max_scores(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image (position order): best object score (-inf without objects) and that row's index."""
        sims = self.codec.scores(self.vectors, self.codec.project(query))[:, 0]
        best = np.full(self.n_images, -np.inf, np.float32)
        arg = np.full(self.n_images, -1, np.int64)
        counts = np.diff(self.offsets)
        nonempty = np.flatnonzero(counts > 0)
        if len(nonempty):
            starts = self.offsets[nonempty]
            best[nonempty] = np.maximum.reduceat(sims, starts)
            # Row of the maximum inside each image's run (for the explain overlay).
            is_max = sims == np.repeat(best[nonempty], counts[nonempty])
            first = np.flatnonzero(is_max)
            owner_of = np.repeat(np.arange(len(nonempty)), counts[nonempty])
            arg_nonempty = np.full(len(nonempty), -1, np.int64)
            arg_nonempty[owner_of[first][::-1]] = first[::-1]
            arg[nonempty] = arg_nonempty
        return best, arg

    def max_scores_at(self, query: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, int]:
        """:meth:`max_scores` of the images at ``positions`` only (the candidate stage), and the rows read."""
        positions = np.asarray(positions, np.int64)
        starts = self.offsets[positions]
        counts = self.offsets[positions + 1] - starts
        total = int(counts.sum())
        best = np.full(len(positions), -np.inf, np.float32)
        if total:
            first = np.cumsum(counts) - counts  # where each image's run starts in the gathered rows
            rows = np.repeat(starts - first, counts) + np.arange(total)
            sims = self.codec.scores(self.vectors[rows], self.codec.project(query))[:, 0]
            nonempty = counts > 0
            best[nonempty] = np.maximum.reduceat(sims, first[nonempty])
        return best, total

    def boxes_of(self, position: int) -> np.ndarray:
        """(n, 4) normalised boxes of the image at ``position`` (row 0 the whole image)."""
        if self.boxes is None:
            return np.zeros((0, 4), np.float32)
        return self.boxes[self.offsets[position]:self.offsets[position + 1]]


def field_scores(rows: FieldRows, image_order: np.ndarray, query: np.ndarray, codec: Codec = IDENTITY) -> np.ndarray:
    """Scores of a one-row-per-image field, in the global field's row order (-inf for missing images).

    ``codec``: the field's compact storage (query projected, rows dequantised in blocks)."""
    sorter = np.argsort(image_order, kind="stable")
    pos = sorter[np.searchsorted(image_order, rows.owners, sorter=sorter)]
    out = np.full(len(image_order), -np.inf, np.float32)
    out[pos] = codec.scores(rows.vectors, codec.project(query))[:, 0]
    return out


def top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and positions of the ``k`` best finite scores, best first."""
    finite = np.flatnonzero(np.isfinite(scores))
    k = min(k, len(finite))
    if k == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    sub = scores[finite]
    part = np.argpartition(-sub, k - 1)[:k] if k < len(sub) else np.arange(len(sub))
    order = part[np.argsort(-sub[part], kind="stable")]
    return sub[order].astype(np.float32), finite[order]


def explain_match(snapshot, image_id: int, query: np.ndarray) -> dict:
    """Which stored object of ``image_id`` matched the query vector (in the object space) best.

    ``snapshot`` is a :class:`~finegrain.store.snapshot.Snapshot`. Returns
    ``{"id", "score", "box", "objects"}``: the best object's score and box in
    pixels of the indexed image, and every object as ``{"box", "score"}``
    (row 0 is the whole image), best first.
    """
    rec = snapshot.records[int(image_id)]
    from ..compress import storage

    if not storage.has_rows(snapshot, "objects"):
        raise ValueError("this index stores no objects (finegrain index ... --objects regions)")
    rows, codec = storage.scoring(snapshot, "objects")
    mine = np.flatnonzero(rows.owners == int(image_id))
    sims = codec.scores(rows.vectors[mine], codec.project(query))[:, 0]
    boxes = np.asarray(rows.attrs["box"], np.float32)[mine]
    scale = np.array([rec.width or 0, rec.height or 0] * 2, np.float32)
    objs: list[dict[str, Any]] = [{"box": [int(round(float(v))) for v in b * scale], "score": float(s)}
                                  for b, s in zip(boxes, sims)]
    objs.sort(key=lambda o: -o["score"])
    best = objs[0] if objs else {"box": None, "score": float("-inf")}
    return {"id": int(image_id), "score": best["score"], "box": best["box"], "objects": objs}
