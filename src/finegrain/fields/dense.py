"""The ``global`` field: one joint-space embedding per image (the encoder's image tower)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..store.vectors import FieldRows
from .base import Decoded, FieldExtractor, register

FIELD = "global"


class GlobalField(FieldExtractor):
    """``global``: the image embedding of the whole picture, at the encoder's input size."""

    key = "global"
    label = "global embedding"

    @classmethod
    def from_config(cls, config: Any, root: Path) -> GlobalField:
        return cls()

    def config_dict(self) -> None:
        return None

    @property
    def fields(self) -> tuple[str, ...]:
        return (FIELD,)

    def decode_side(self, encoder) -> int | None:
        return int(encoder.image_size)

    def prepare(self, decoded: Decoded, encoder) -> np.ndarray:
        return encoder.prepare_image(decoded.image)

    def encode(self, encoder, payloads: list[np.ndarray]) -> list[np.ndarray]:
        return list(encoder.encode_pixels(np.stack(payloads))) if payloads else []

    def rows(self, results: list[np.ndarray], owners: np.ndarray) -> dict[str, FieldRows]:
        return {FIELD: FieldRows(np.stack(results), np.asarray(owners, np.int64))} if results else {}


register(GlobalField, always=True)
