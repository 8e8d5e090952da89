"""Multi-object descriptors (MaO Stage A at inference): crop each proposal, encode, average.

For one image with proposals 0..N-1 (0 = whole image):

* each proposal is cropped as a square centred on its box, side = the box's
  longer side plus ``pad`` on each side, at least ``min_crop`` pixels, and
  resized to ``crop_size``;
* each crop is encoded: ``raw`` = the image tower's feature map GeM-pooled
  (p = 3) and L2-normalised; ``joint`` = the encoder's full image embedding;
* the image's *multi-object descriptor* fuses its crop vectors into one:
  the paper averages them; finegrain takes their generalised mean with
  exponent ``pool_p`` (8 by default, 1 = the average), L2-normalised (mode
  ``objects``); the crop vectors are kept too (``objects-max``).

The same encoding turns an image query (a crop of the object sought) into a
vector of the same space, see :func:`embed_query`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from PIL import Image

from ..encoders.base import l2_normalize
from .config import ObjectConfig
from .proposals import Proposals, propose

GEM_P = 3.0
#: Side of the per-crop object masks kept for the refinement (pooled onto the feature grid later).
MASK_RES = 32
#: Images are decoded at least this large (shorter side) when objects are indexed: small
#: objects need the pixels a 224 px decode would throw away.
OBJECT_DECODE_SIDE = 1024


@dataclass
class ObjectInputs:
    """One image prepared for object encoding (made in a decode worker)."""

    proposals: Proposals
    pixels: np.ndarray  # (N, 3, S, S) prepared crops, row 0 the whole image
    masks: np.ndarray  # (N, MASK_RES, MASK_RES) float32 object mask inside each crop


@dataclass
class ObjectVectors:
    """One image's encoded objects."""

    vectors: np.ndarray  # (N, D) L2-normalised crop vectors, row 0 the whole image
    boxes: np.ndarray  # (N, 4) normalised boxes x0 y0 x1 y1
    scores: np.ndarray  # (N,) proposal scores
    mean: np.ndarray  # (D,) the multi-object descriptor
    refined: np.ndarray | None = None  # (D,) Stage B descriptor, when refinement is on


def crop_windows(boxes: np.ndarray, pad: float, min_crop: int) -> np.ndarray:
    """Square crop windows (N, 4) float: centred on each box, side = longer side * (1 + 2 pad), >= ``min_crop``."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * (1 + 2 * pad)
    side = np.maximum(np.maximum(side, float(min_crop)), 1.0)
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def prepare_objects(image: Image.Image, encoder, config: ObjectConfig, proposals: Proposals | None = None
                    ) -> ObjectInputs:
    """Proposals (unless given), crops and masks of one image, ready for :func:`encode_objects`."""
    image = image.convert("RGB")
    props = proposals if proposals is not None else propose(image, config)
    width, height = image.size
    windows = crop_windows(props.boxes[1:], config.pad, config.min_crop)
    crops = [encoder.prepare_image(image, config.crop_size)]
    masks = [np.ones((MASK_RES, MASK_RES), np.float32)]
    for i, win in enumerate(windows, start=1):
        box = cast(tuple[int, int, int, int], tuple(int(round(v)) for v in win))
        crops.append(encoder.prepare_image(image.crop(box), config.crop_size))
        masks.append(_mask_in_window(props, i, win))
    return ObjectInputs(props, np.stack(crops), np.stack(masks))


def _mask_in_window(props: Proposals, i: int, win: np.ndarray) -> np.ndarray:
    """Object ``i``'s mask resampled into crop window ``win`` (MASK_RES x MASK_RES, 0 outside the image)."""
    x0, y0, x1, y1 = (float(v) for v in win)
    # Pixel centres of the mask grid, in image coordinates.
    xs = x0 + (np.arange(MASK_RES) + 0.5) * (x1 - x0) / MASK_RES
    ys = y0 + (np.arange(MASK_RES) + 0.5) * (y1 - y0) / MASK_RES
    if props.masks is not None:
        side = props.masks.shape[-1]
        inside_x = (xs >= 0) & (xs < props.width)
        inside_y = (ys >= 0) & (ys < props.height)
        mx = np.clip((xs * side / props.width).astype(np.int64), 0, side - 1)
        my = np.clip((ys * side / props.height).astype(np.int64), 0, side - 1)
        m = props.masks[i][my[:, None], mx[None, :]] & inside_y[:, None] & inside_x[None, :]
        return m.astype(np.float32)
    bx0, by0, bx1, by1 = props.boxes[i]
    inx = (xs >= bx0) & (xs < bx1)
    iny = (ys >= by0) & (ys < by1)
    return (iny[:, None] & inx[None, :]).astype(np.float32)


def gem(fmap: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, h, w) -> (B, C) generalised mean over the spatial grid."""
    return fmap.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def encode_crops(encoder, pixels: np.ndarray, space: str = "raw", batch_size: int = 64,
                 keep_maps: bool = False) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Encode prepared crops (B, 3, S, S): (B, D) L2-normalised vectors, plus the feature maps if asked."""
    vecs, maps = [], []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size]))
            if space == "raw":
                fmap = encoder.feature_map_batch(batch).float()
                vecs.append(gem(fmap).numpy())
                if keep_maps:
                    maps.append(fmap)
            else:
                vecs.append(encoder.embed_image_batch(batch).float().numpy())
    out = l2_normalize(np.concatenate(vecs)) if vecs else np.zeros((0, 0), np.float32)
    return out, maps


def encode_objects(encoder, items: list[ObjectInputs], config: ObjectConfig,
                   adapter: dict[str, np.ndarray] | None = None) -> list[ObjectVectors]:
    """Encode the crops of several images in shared batches; refine each descriptor if configured.

    With ``adapter`` (Stage A weights, :mod:`finegrain.objects.adapter`) every
    crop vector is adapted before the fusion, as the adapter was trained.
    """
    if not items:
        return []
    counts = [len(it.pixels) for it in items]
    vectors, maps = encode_crops(encoder, np.concatenate([it.pixels for it in items]), config.space,
                                 keep_maps=config.refine)
    if adapter is not None:
        from .adapter import apply_adapter

        vectors = apply_adapter(adapter, vectors)
    fmaps = torch.cat(maps) if maps else None
    out, start = [], 0
    for it, n in zip(items, counts):
        v = vectors[start:start + n]
        mean = fuse(v, config.pool_p if config.space == "raw" else 1.0)
        refined = None
        if config.refine:
            from .refine import refine_descriptor

            assert fmaps is not None  # config.refine kept the feature maps of every crop
            refined = refine_descriptor(mean, v, fmaps[start:start + n], it.masks, config)
        out.append(ObjectVectors(v, it.proposals.normalized_boxes(), it.proposals.scores, mean, refined))
        start += n
    return out


def fuse(vectors: np.ndarray, p: float = 1.0) -> np.ndarray:
    """One L2-normalised descriptor from (N, D) crop vectors: generalised mean with exponent ``p`` (1: average)."""
    v = np.asarray(vectors, np.float64)
    if p == 1.0:
        pooled = v.mean(axis=0)
    else:
        pooled = np.power(np.power(np.clip(v, 0.0, None), p).mean(axis=0), 1.0 / p)
    return l2_normalize(pooled[None])[0]


def embed_query(encoder, image: Image.Image, config: ObjectConfig,
                adapter: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The (D,) vector of an image query (the object sought, already cropped) in the objects' space."""
    pixels = encoder.prepare_image(image.convert("RGB"), config.crop_size)[None]
    vector = encode_crops(encoder, pixels, config.space)[0][0]
    if adapter is not None:
        from .adapter import apply_adapter

        vector = apply_adapter(adapter, vector)
    return vector
