"""Images into segments at several granularities (HiMIR's "M" levels), with SLIC superpixels.

Each level asks SLIC for about ``n`` superpixels (SLIC returns roughly that
many, often fewer). A segment keeps its level, its bounding box (normalised
to [0, 1], enough to draw it) and its area fraction. For embedding, each
segment also has a soft mask on the image tower's feature-map grid: the
fraction of each grid cell the segment covers.

SLIC runs on a small copy of the image (``slic_size``, default 112 px): the
segments are coarse regions anyway, and at 224 px SLIC costs more than the
image tower itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
from PIL import Image

EMBED_MODES = ("pool", "crop")


@dataclass(frozen=True)
class SegmentConfig:
    """How an index decomposes images (stored with the index, fixed at creation).

    Parameters
    ----------
    levels:
        Requested superpixel counts, coarse to fine.
    embed:
        ``pool``: one forward pass at ``resolution``, the feature map pooled
        over each segment's mask (fast). ``crop``: each segment's bounding
        crop encoded by the image tower (slow, as in the paper).
    resolution:
        Input side for the pooled feature map (``pool`` mode); 320 gives a
        10 x 10 grid with EfficientNet-Lite0.
    slic_size:
        Side of the image copy SLIC runs on.
    compactness:
        SLIC compactness (higher: more regular, grid-like segments).
    """

    levels: tuple[int, ...] = (4, 9, 16, 25, 36)
    embed: str = "pool"
    resolution: int = 320
    slic_size: int = 112
    compactness: float = 20.0

    def __post_init__(self) -> None:
        if self.embed not in EMBED_MODES:
            raise ValueError(f"segment embedding must be one of {EMBED_MODES}, not {self.embed!r}")
        if not self.levels or any(int(n) < 1 for n in self.levels):
            raise ValueError("levels must be positive segment counts")
        object.__setattr__(self, "levels", tuple(int(n) for n in self.levels))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SegmentConfig:
        return cls(**{**d, "levels": tuple(d["levels"])})


@dataclass
class Segments:
    """All segments of one image, every level together (row i is one segment)."""

    level: np.ndarray  # (S,) int16, index into SegmentConfig.levels
    box: np.ndarray  # (S, 4) float32, x0 y0 x1 y1 in [0, 1]
    area: np.ndarray  # (S,) float32, fraction of the image
    masks: np.ndarray  # (S, slic_size, slic_size) bool, for pooling (not stored)

    def __len__(self) -> int:
        return len(self.level)

    def pixel_boxes(self, width: int, height: int) -> np.ndarray:
        """Boxes in pixel coordinates of a width x height image (at least 1 px wide and high)."""
        b = np.round(self.box * np.array([width, height, width, height], np.float32)).astype(np.int64)
        b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
        b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
        return b


def segment_image(image: Image.Image, config: SegmentConfig) -> Segments:
    """SLIC superpixels of ``image`` at every level of ``config``."""
    from skimage.segmentation import slic

    s = config.slic_size
    small = np.asarray(image.convert("RGB").resize((s, s), Image.Resampling.BILINEAR))
    levels, boxes, areas, masks = [], [], [], []
    for li, n in enumerate(config.levels):
        if n == 1:
            labels = np.zeros((s, s), np.int64)
        else:
            labels = slic(small, n_segments=n, compactness=config.compactness, start_label=0, max_num_iter=5)
        for k in range(int(labels.max()) + 1):
            mask = labels == k
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            levels.append(li)
            boxes.append((xs.min() / s, ys.min() / s, (xs.max() + 1) / s, (ys.max() + 1) / s))
            areas.append(mask.mean())
            masks.append(mask)
    return Segments(np.asarray(levels, np.int16), np.asarray(boxes, np.float32).reshape(-1, 4),
                    np.asarray(areas, np.float32), np.stack(masks))


def embed_segments(encoder, image: Image.Image, segments: Segments, config: SegmentConfig,
                   pixels: np.ndarray | None = None) -> np.ndarray:
    """(S, dim) L2-normalised embeddings of one image's segments, by ``config.embed``.

    ``pixels`` may carry the image already prepared at ``config.resolution``
    (pool mode), to avoid resizing twice.
    """
    if config.embed == "pool":
        if pixels is None:
            pixels = encoder.prepare_image(image, config.resolution)
        return encoder.encode_regions(pixels[None], [segments.masks])[0]
    crops = [encoder.prepare_image(image.crop(cast(tuple[int, int, int, int], tuple(int(v) for v in b))))
             for b in segments.pixel_boxes(*image.size)]
    return encoder.encode_pixels(np.stack(crops)) if crops else np.zeros((0, encoder.dim), np.float32)
