"""The ``segments`` field: SLIC segments at several granularities, one embedding each (HiMIR)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from ..decompose.segments import SegmentConfig, Segments, embed_segments, segment_image
from ..store.vectors import FieldRows
from .base import Decoded, FieldExtractor, register

FIELD = "segments"


@dataclass
class SegmentInputs:
    """One image's segments, with what embedding them needs (by ``SegmentConfig.embed``)."""

    segments: Segments
    pixels: np.ndarray | None = None  # pool: the image prepared at the segment resolution
    image: Image.Image | None = None  # crop: the decoded image, to crop segments from


class SegmentsField(FieldExtractor):
    """``segments`` rows with attributes ``level``, ``box`` and ``area`` (see :mod:`finegrain.decompose.segments`)."""

    key = "segments"
    label = "segments"

    def __init__(self, config: SegmentConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: Any, root: Path) -> SegmentsField:
        return cls(config if isinstance(config, SegmentConfig) else SegmentConfig.from_dict(config))

    def config_dict(self) -> dict:
        return self.config.to_dict()

    @property
    def fields(self) -> tuple[str, ...]:
        return (FIELD,)

    def prepare(self, decoded: Decoded, encoder) -> SegmentInputs:
        segs = segment_image(decoded.image, self.config)
        if self.config.embed == "pool":
            return SegmentInputs(segs, pixels=encoder.prepare_image(decoded.image, self.config.resolution))
        return SegmentInputs(segs, image=decoded.image)

    def encode(self, encoder, payloads: list[SegmentInputs]) -> list[tuple[Segments, np.ndarray]]:
        if not payloads:
            return []
        if self.config.embed == "pool":
            embs = encoder.encode_regions(np.stack([cast(np.ndarray, p.pixels) for p in payloads]),
                                          [p.segments.masks for p in payloads])
            return [(p.segments, e) for p, e in zip(payloads, embs, strict=True)]
        return [(p.segments, embed_segments(encoder, cast(Image.Image, p.image), p.segments, self.config))
                for p in payloads]

    def rows(self, results: list[tuple[Segments, np.ndarray]], owners: np.ndarray) -> dict[str, FieldRows]:
        if not results:
            return {}
        segs = [s for s, _ in results]
        return {FIELD: FieldRows(
            np.concatenate([e for _, e in results]),
            np.concatenate([np.full(len(s), i, np.int64) for s, i in zip(segs, owners, strict=True)]),
            {"level": np.concatenate([s.level for s in segs]),
             "box": np.concatenate([s.box for s in segs]),
             "area": np.concatenate([s.area for s in segs])},
        )}


register(SegmentsField)
