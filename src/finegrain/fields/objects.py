"""The ``objects`` fields: per-object crop vectors and the fused multi-object descriptor (MaO, docs/mao.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np

from ..objects.config import ObjectConfig
from ..objects.descriptor import (
    OBJECT_DECODE_SIDE,
    ObjectInputs,
    ObjectVectors,
    encode_objects,
    prepare_objects,
)
from ..store.vectors import FieldRows
from .base import Decoded, FieldExtractor, register


class ObjectsField(FieldExtractor):
    """``objects`` (per crop, with ``box`` and ``score``), ``objects_mean``; ``objects_refined`` with refinement."""

    key = "objects"
    label = "objects"

    def __init__(self, config: ObjectConfig, root: Path | None = None):
        self.config = config
        self.root = root  # where an adapter's copy lives (ObjectConfig.adapter)

    @classmethod
    def from_config(cls, config: Any, root: Path) -> ObjectsField:
        if isinstance(config, str):
            return cls(ObjectConfig(proposals=config), root)
        return cls(config if isinstance(config, ObjectConfig) else ObjectConfig.from_dict(config), root)

    def config_dict(self) -> dict:
        return self.config.to_dict()

    @property
    def fields(self) -> tuple[str, ...]:
        return ("objects", "objects_mean") + (("objects_refined",) if self.config.refine else ())

    def decode_side(self, encoder) -> int | None:
        return OBJECT_DECODE_SIDE  # small objects need the pixels a 224 px decode would throw away

    def prepare(self, decoded: Decoded, encoder) -> ObjectInputs:
        return prepare_objects(decoded.image, encoder, self.config)

    def encode(self, encoder, payloads: list[ObjectInputs]) -> list[ObjectVectors]:
        adapter = None
        if self.config.adapter is not None:  # read (and checked) from the index's own copy
            from ..objects.adapter import index_adapter

            if self.root is None:
                raise ValueError("an objects field with an adapter needs its index folder")
            adapter = index_adapter(self.root, self.config.adapter)
        return encode_objects(encoder, payloads, self.config, adapter)

    def rows(self, results: list[ObjectVectors], owners: np.ndarray) -> dict[str, FieldRows]:
        if not results:
            return {}
        owners = np.asarray(owners, np.int64)
        out = {
            "objects": FieldRows(
                np.concatenate([o.vectors for o in results]),
                np.concatenate([np.full(len(o.vectors), i, np.int64) for o, i in zip(results, owners, strict=True)]),
                {"box": np.concatenate([o.boxes for o in results]).astype(np.float32),
                 "score": np.concatenate([o.scores for o in results]).astype(np.float32)},
            ),
            "objects_mean": FieldRows(np.stack([o.mean for o in results]), owners),
        }
        if self.config.refine:
            out["objects_refined"] = FieldRows(np.stack([cast(np.ndarray, o.refined) for o in results]), owners)
        return out


register(ObjectsField)
