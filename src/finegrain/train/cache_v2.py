"""Frozen-part caches of the ``effnet-minilm-v2`` recipe (:mod:`finegrain.train.aligner_v2`).

The v2 recipe locks the whole image tower (EfficientNet-Lite0 with its
ImageNet weights, head conv included) and fine-tunes only MiniLM's top
layers, so everything below those is computed once:

- image feature maps (1280 x 7 x 7, float16) of each train image's views:
  ``v0`` the image itself, ``v1..vK`` random resized crops with random flips
  drawn from ``default_rng([seed, image, view])`` (deterministic); dev: ``v0``;
- SLIC segments (the product's :func:`segment_image`, default levels) of
  ``v0`` as soft masks on the 7 x 7 grid, for the region term;
- MiniLM token states after the first ``TEXT_SPLIT`` layers (float16, ragged:
  a flat (tokens, 384) array and per-text offsets) for the captions, each
  caption with one phrase removed (phrase dropout), and the captions'
  sub-queries (the product's rule-based decomposition, as searches use it).

A JSON manifest, written last, records the inputs and settings; a cache
whose manifest differs is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..datasets import CaptionSplit, load_flickr8k
from ..decompose.query import RulesDecomposer
from ..decompose.segments import SegmentConfig, segment_image
from ..encoders.effnet_minilm import TEXT_MAX_TOKENS, ImageTop, ImageTrunk, load_efficientnet_lite0, pixels_to_array
from ..encoders.minilm import MiniLM, load_minilm
from ..images import load_image
from ..progress import progress_bar

IMAGE_SIZE = 224
GRID = IMAGE_SIZE // 32
TEXT_SPLIT = 4  # MiniLM layers below this index are frozen and cached; the top 6 - TEXT_SPLIT may be trained
MAX_PARTS = 4
CACHE_VERSION = 1


class LockedImageTower(nn.Module):
    """EfficientNet-Lite0 up to its head conv, all ImageNet weights: pixels -> (B, 1280, S/32, S/32)."""

    def __init__(self, net=None):
        super().__init__()
        net = net if net is not None else load_efficientnet_lite0()
        self.trunk = ImageTrunk(net)
        self.top = ImageTop(net)
        self.eval()
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x.contiguous(memory_format=torch.channels_last))).contiguous()


def minilm_states(model: MiniLM, ids: torch.Tensor, mask: torch.Tensor, start: int = 0, stop: int | None = None,
                  x: torch.Tensor | None = None) -> torch.Tensor:
    """Token states after MiniLM's layers ``start..stop-1`` (from the embeddings when ``x`` is None)."""
    if x is None:
        positions = torch.arange(ids.shape[1])
        x = model.norm(model.words(ids) + model.positions(positions)[None] + model.token_types.weight[0])
    keep = mask.bool()[:, None, None, :]
    for layer in list(model.layers)[start:stop]:
        x = layer(x, keep)
    return x


def random_resized_crop(image, rng: np.random.Generator, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
    """One random resized crop of a PIL image (torchvision's rule, 10 tries then the whole image), maybe flipped."""
    from PIL import Image

    w, h = image.size
    box = (0, 0, w, h)
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    out = image.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def drop_phrase(caption: str, parts: list[str], rng: np.random.Generator) -> str:
    """The caption with one of its sub-query phrases removed (the caption itself when that leaves nothing)."""
    if not parts:
        return caption
    part = parts[int(rng.integers(len(parts)))]
    at = caption.lower().find(part.lower())
    if at < 0:
        return caption
    rest = " ".join((caption[:at] + " " + caption[at + len(part):]).split())
    return rest if any(ch.isalnum() for ch in rest) else caption


def grid_masks(image, config: SegmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """SLIC segments of ``image`` as (S, GRID*GRID) float16 cell coverages, and their levels."""
    seg = segment_image(image, config)
    masks = torch.from_numpy(seg.masks.astype(np.float32))[:, None]
    grid = F.adaptive_avg_pool2d(masks, (GRID, GRID))[:, 0].reshape(len(seg), -1)
    return grid.numpy().astype(np.float16), seg.level.astype(np.int16)


def _manifest(splits: dict[str, CaptionSplit], views: int, seed: int) -> dict:
    return {"version": CACHE_VERSION, "images": {k: s.images for k, s in splits.items()},
            "captions": {k: s.captions for k, s in splits.items()},
            "views": views, "seed": seed, "image_size": IMAGE_SIZE, "text_split": TEXT_SPLIT,
            "max_tokens": TEXT_MAX_TOKENS, "segments": SegmentConfig().to_dict(), "max_parts": MAX_PARTS}


def build_cache_v2(data: str | Path, cache_dir: str | Path, views: int = 2, seed: int = 0,
                   show_progress: bool = True, log=print) -> Path:
    """Compute the caches under ``cache_dir`` (skipped when its manifest matches); return ``cache_dir``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits = {name: load_flickr8k(data, name) for name in ("train", "dev")}
    manifest = _manifest(splits, views, seed)
    done = cache_dir / "manifest.json"
    if done.exists() and json.loads(done.read_text()) == manifest:
        return cache_dir
    done.unlink(missing_ok=True)
    with torch.inference_mode():
        _cache_texts(splits, cache_dir, seed, show_progress, log)
        _cache_images(splits, cache_dir, views, seed, show_progress, log)
    done.write_text(json.dumps(manifest))
    return cache_dir


def _save_ragged(cache_dir: Path, name: str, chunks: list[np.ndarray]) -> None:
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    np.save(cache_dir / f"{name}.npy", np.concatenate(chunks) if chunks else np.zeros((0, 384), np.float16))
    np.save(cache_dir / f"{name}-offsets.npy", offsets)


def _encode_texts(tokenizer, model: MiniLM, texts: list[str], label: str, show_progress: bool) -> list[np.ndarray]:
    """Per text its real tokens' states after the frozen layers, float16."""
    out: list[np.ndarray] = [np.zeros((0, 384), np.float16)] * len(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")
    with progress_bar(len(texts), label, show_progress) as bar:
        for start in range(0, len(texts), 256):
            idx = order[start:start + 256]
            ids, mask = tokenizer([texts[i] for i in idx], TEXT_MAX_TOKENS)
            states = minilm_states(model, ids, mask, 0, TEXT_SPLIT).numpy().astype(np.float16)
            lengths = mask.sum(1).tolist()
            for row, i in enumerate(idx):
                out[i] = states[row, :lengths[row]]
            bar.advance(len(idx))
    return out


def _cache_texts(splits: dict[str, CaptionSplit], cache_dir: Path, seed: int, show_progress: bool, log) -> None:
    tokenizer, model = load_minilm()
    decomposer = RulesDecomposer(max_parts=MAX_PARTS)
    for name, split in splits.items():
        parts = [decomposer.decompose(c) for c in split.captions]
        flat = [p for ps in parts for p in ps]
        part_offsets = np.zeros(len(parts) + 1, np.int64)
        part_offsets[1:] = np.cumsum([len(p) for p in parts])
        np.save(cache_dir / f"{name}-caption-parts.npy", part_offsets)
        (cache_dir / f"{name}-parts.json").write_text(json.dumps(flat))
        _save_ragged(cache_dir, f"{name}-cap", _encode_texts(tokenizer, model, split.captions, f"captions ({name})",
                                                            show_progress))
        _save_ragged(cache_dir, f"{name}-part", _encode_texts(tokenizer, model, flat, f"phrases ({name})",
                                                             show_progress))
        if name == "train":
            dropped = [drop_phrase(c, p, np.random.default_rng([seed, 7, i]))
                       for i, (c, p) in enumerate(zip(split.captions, parts))]
            (cache_dir / "train-drop.json").write_text(json.dumps(dropped))
            _save_ragged(cache_dir, "train-drop", _encode_texts(tokenizer, model, dropped, "phrase dropout",
                                                                show_progress))
        log(f"text cache ({name}): {len(split.captions)} captions, {len(flat)} phrases")


def _cache_images(splits: dict[str, CaptionSplit], cache_dir: Path, views: int, seed: int, show_progress: bool,
                  log) -> None:
    tower = LockedImageTower()
    config = SegmentConfig()
    for name, split in splits.items():
        paths = split.image_paths()
        n_views = 1 + (views if name == "train" else 0)
        arrays = [np.lib.format.open_memmap(cache_dir / f"{name}-v{v}.npy.tmp", mode="w+", dtype=np.float16,
                                            shape=(len(paths), 1280, GRID, GRID)) for v in range(n_views)]
        seg_masks: list[np.ndarray] = []
        seg_levels: list[np.ndarray] = []
        with progress_bar(len(paths), f"image tower ({name}, {n_views} views)", show_progress) as bar:
            for start in range(0, len(paths), 32):
                images = [load_image(p) for p in paths[start:start + 32]]
                for i, image in enumerate(images):
                    grid, level = grid_masks(image, config)
                    seg_masks.append(grid)
                    seg_levels.append(level)
                for v in range(n_views):
                    views_v = [im if v == 0 else random_resized_crop(im, np.random.default_rng([seed, start + i, v]))
                               for i, im in enumerate(images)]
                    x = torch.from_numpy(np.stack([pixels_to_array(im, IMAGE_SIZE) for im in views_v]))
                    arrays[v][start:start + len(x)] = tower(x).numpy().astype(np.float16)
                bar.advance(len(images))
                if (start // 32) % 20 == 19:
                    log(f"  {name}: {start + len(images)} / {len(paths)} images")
        for v, arr in enumerate(arrays):
            arr.flush()
            del arr
            (cache_dir / f"{name}-v{v}.npy.tmp").replace(cache_dir / f"{name}-v{v}.npy")
        _save_ragged(cache_dir, f"{name}-seg", seg_masks)
        np.save(cache_dir / f"{name}-seg-level.npy", np.concatenate(seg_levels))
        log(f"image cache ({name}): {len(paths)} images, {n_views} views, {sum(len(m) for m in seg_masks)} segments")


def main() -> None:  # python -m finegrain.train.cache_v2 DATA CACHE_DIR [VIEWS]
    import sys
    import time

    t0 = time.time()
    build_cache_v2(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2, show_progress=False,
                   log=lambda m: print(f"[{time.time() - t0:6.0f}s] {m}", flush=True))
    print(f"cache ready in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
