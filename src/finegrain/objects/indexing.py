"""The indexer's object stage: what one commit writes to the ``objects*`` fields."""

from __future__ import annotations

import numpy as np

from ..store.vectors import FieldRows
from .config import ObjectConfig
from .descriptor import ObjectInputs, ObjectVectors, encode_objects


class PendingObjects:
    """Encoded objects of the images of one pending commit, in the order images were added."""

    def __init__(self, config: ObjectConfig):
        self.config = config
        self.done: list[ObjectVectors] = []

    def encode(self, encoder, items: list[ObjectInputs]) -> None:
        """Encode (and refine, if configured) one batch of prepared images."""
        self.done.extend(encode_objects(encoder, items, self.config))

    def fields(self, ids: list[int]) -> dict[str, FieldRows]:
        """``objects`` (per crop, with box and score), ``objects_mean`` and maybe ``objects_refined`` rows."""
        if len(ids) != len(self.done):
            raise RuntimeError(f"{len(self.done)} encoded object sets for {len(ids)} images")
        if not ids:
            return {}
        owners = np.asarray(ids, np.int64)
        out = {
            "objects": FieldRows(
                np.concatenate([o.vectors for o in self.done]),
                np.concatenate([np.full(len(o.vectors), i, np.int64) for o, i in zip(self.done, ids)]),
                {"box": np.concatenate([o.boxes for o in self.done]).astype(np.float32),
                 "score": np.concatenate([o.scores for o in self.done]).astype(np.float32)},
            ),
            "objects_mean": FieldRows(np.stack([o.mean for o in self.done]), owners),
        }
        if self.config.refine:
            out["objects_refined"] = FieldRows(np.stack([o.refined for o in self.done]), owners)
        return out
