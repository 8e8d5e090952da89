"""Frozen-part caches of the ``effnet-minilm-v2`` recipe (:mod:`finegrain.train.aligner_v2`).

The v2 recipe locks the whole image tower (EfficientNet-Lite0 with its
ImageNet weights, head conv included) and fine-tunes only MiniLM's top
layers, so everything below those is computed once:

- image feature maps (1280 x 7 x 7, float16) of each train image's views:
  ``v0`` the image itself, ``v1..vK`` random resized crops with random flips
  drawn from ``default_rng([seed, image, view])`` (deterministic); dev: ``v0``;
- SLIC segments (the product's :func:`segment_image`, default levels) of
  ``v0`` as soft masks on the 7 x 7 grid, for dev and the validation slice
  (the last ``SEGMENTED_TRAIN_TAIL`` train images): multi-vector evaluation;
- MiniLM token states after the first ``TEXT_SPLIT`` layers (float16, ragged:
  a flat (tokens, 384) array and per-text offsets) for the captions and the
  captions' sub-queries (the product's rule-based decomposition, as searches
  use it), and per train caption the token span of one phrase (phrase dropout).

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
from ..encoders.minilm import MiniLM, MiniLMTokenizer, load_minilm
from ..images import load_image
from ..progress import progress_bar

IMAGE_SIZE = 224
GRID = IMAGE_SIZE // 32
TEXT_SPLIT = 4  # MiniLM layers below this index are frozen and cached; the top 6 - TEXT_SPLIT may be trained
MAX_PARTS = 4
SEGMENTED_TRAIN_TAIL = 500  # train images with SLIC segments: the validation slice (the region term trains on grids)
CACHE_VERSION = 1


class LockedImageTower(nn.Module):
    """EfficientNet-Lite0 up to its head conv, all ImageNet weights: pixels -> (B, 1280, S/32, S/32)."""

    def __init__(self, net=None):
        super().__init__()
        net = net if net is not None else load_efficientnet_lite0()
        self.trunk = ImageTrunk(net)
        self.top = ImageTop(net)
        self.eval()
        self.to(memory_format=torch.channels_last)

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


def phrase_span(tokenizer: MiniLMTokenizer, caption: str, parts: list[str],
                rng: np.random.Generator) -> tuple[int, int]:
    """Token positions [start, stop) of one of the caption's sub-query phrases ((0, 0): none found).

    Phrase dropout removes these tokens from the cached states the trained
    layers see (the frozen lower layers saw the whole caption): encoding every
    caption again without the phrase would cost as much as the whole text cache.
    """
    if not parts:
        return (0, 0)
    ids = tokenizer([caption], TEXT_MAX_TOKENS)[0][0].tolist()
    phrase = tokenizer([parts[int(rng.integers(len(parts)))]], TEXT_MAX_TOKENS)[0][0].tolist()[1:-1]  # no CLS/SEP
    for start in range(1, len(ids) - len(phrase)):
        if ids[start:start + len(phrase)] == phrase:
            if len(phrase) >= len(ids) - 2:  # the phrase is the whole caption: keep it
                return (0, 0)
            return (start, start + len(phrase))
    return (0, 0)


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
            "max_tokens": TEXT_MAX_TOKENS, "segments": SegmentConfig().to_dict(), "max_parts": MAX_PARTS,
            "segmented_train_tail": SEGMENTED_TRAIN_TAIL}


def build_cache_v2(data: str | Path, cache_dir: str | Path, views: int = 2, seed: int = 0,
                   show_progress: bool = True, log=print, only: str | None = None) -> Path:
    """Compute the caches under ``cache_dir`` (skipped when its manifest matches); return ``cache_dir``.

    Every array is written under a temporary name then renamed, and an existing
    one is kept, so an interrupted build resumes; ``only`` (``"texts"`` or
    ``"images"``, ``"images:V"`` for train view V alone, or ``"images:dev"``) builds
    a part, so processes can share the work, and a run without augmented views
    needs only ``texts``, ``images:dev`` and ``images:0``.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits = {name: load_flickr8k(data, name) for name in ("train", "dev")}
    manifest = json.loads(json.dumps(_manifest(splits, views, seed)))  # as JSON reads it back (lists, not tuples)
    done, started = cache_dir / "manifest.json", cache_dir / "settings.json"
    if done.exists() and json.loads(done.read_text()) == manifest:
        return cache_dir
    if not started.exists() or json.loads(started.read_text()) != manifest:  # other inputs: start afresh
        for old in cache_dir.iterdir():
            old.unlink()
        started.write_text(json.dumps(manifest))
    with torch.inference_mode():
        if only in (None, "texts"):
            _cache_texts(splits, cache_dir, seed, show_progress, log)
        if only is None or only.startswith("images"):
            passes = [("dev", 0)] + [("train", v) for v in range(1 + views)]
            part = only.partition(":")[2] if only else ""
            if part == "dev":
                passes = [("dev", 0)]
            elif part:  # "images:V": train view V alone (a second process can fill it meanwhile)
                passes = [("train", int(part))]
            _cache_images(splits, cache_dir, passes, seed, show_progress, log)
    if _complete(cache_dir, views):
        done.write_text(json.dumps(manifest))
    return cache_dir


def _complete(cache_dir: Path, views: int) -> bool:
    names = [f"{s}-{k}-offsets.npy" for s in ("train", "dev") for k in ("cap", "part", "seg")]
    names += ["train-drop-span.npy", "dev-v0.npy"] + [f"train-v{v}.npy" for v in range(1 + views)]
    return all((cache_dir / n).exists() for n in names)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path.with_suffix(".tmp"), "wb") as fh:
        np.save(fh, array)
    path.with_suffix(".tmp").replace(path)


def _save_ragged(cache_dir: Path, name: str, chunks: list[np.ndarray]) -> None:
    """A flat array and its offsets; the offsets file, written last, marks it complete."""
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    _save(cache_dir / f"{name}.npy", np.concatenate(chunks) if chunks else np.zeros((0, 384), np.float16))
    _save(cache_dir / f"{name}-offsets.npy", offsets)


def _have(cache_dir: Path, name: str) -> bool:
    return (cache_dir / f"{name}-offsets.npy").exists()


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
    texts: dict[tuple[str, str], list[str]] = {}
    for name, split in splits.items():
        parts = [decomposer.decompose(c) for c in split.captions]
        flat = [p for ps in parts for p in ps]
        part_offsets = np.zeros(len(parts) + 1, np.int64)
        part_offsets[1:] = np.cumsum([len(p) for p in parts])
        _save(cache_dir / f"{name}-caption-parts.npy", part_offsets)
        texts[name, "cap"], texts[name, "part"] = split.captions, flat
        if name == "train" and not (cache_dir / "train-drop-span.npy").exists():
            spans = np.array([phrase_span(tokenizer, c, p, np.random.default_rng([seed, 7, i]))
                              for i, (c, p) in enumerate(zip(split.captions, parts))], np.int32)
            _save(cache_dir / "train-drop-span.npy", spans)
    for kind in ("cap", "part"):  # captions first: runs without the region term need only them
        for name in splits:
            if not _have(cache_dir, f"{name}-{kind}"):
                items = texts[name, kind]
                _save_ragged(cache_dir, f"{name}-{kind}", _encode_texts(tokenizer, model, items, f"{kind} ({name})",
                                                                        show_progress))
                log(f"text cache {name}-{kind}: {len(items)} texts")


def _cache_images(splits: dict[str, CaptionSplit], cache_dir: Path, passes: list[tuple[str, int]], seed: int,
                  show_progress: bool, log) -> None:
    """One pass per (split, view): view 0 also computes the segments."""
    tower = LockedImageTower()
    config = SegmentConfig()
    for name, view in passes:
        target = cache_dir / f"{name}-v{view}.npy"
        if target.exists():
            continue
        paths = splits[name].image_paths()
        array = np.lib.format.open_memmap(target.with_suffix(".tmp"), mode="w+", dtype=np.float16,
                                          shape=(len(paths), 1280, GRID, GRID))
        # The tail (the validation slice) first, then the rest in order; a progress file says which rows are
        # written, so experiments can train on the first rows while the rest is computed.
        tail = max(0, len(paths) - SEGMENTED_TRAIN_TAIL) if name == "train" else len(paths)
        order = np.r_[np.arange(tail, len(paths)), np.arange(tail)]
        masks_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        progress = cache_dir / f"{name}-v{view}.progress"
        with progress_bar(len(paths), f"image tower ({name}, view {view})", show_progress) as bar:
            for at in range(0, len(paths), 32):
                rows = order[at:at + 32]
                images = [load_image(paths[r]) for r in rows]
                if view == 0:
                    for r, image in zip(rows, images):
                        if name == "dev" or r >= len(paths) - SEGMENTED_TRAIN_TAIL:
                            masks_of[int(r)] = grid_masks(image, config)
                        else:  # SLIC costs most of a tower forward: only the images that evaluate get it
                            masks_of[int(r)] = (np.zeros((0, GRID * GRID), np.float16), np.zeros(0, np.int16))
                else:
                    images = [random_resized_crop(im, np.random.default_rng([seed, int(r), view]))
                              for r, im in zip(rows, images)]
                x = torch.from_numpy(np.stack([pixels_to_array(im, IMAGE_SIZE) for im in images]))
                array[rows] = tower(x).numpy().astype(np.float16)
                bar.advance(len(images))
                done = at + len(rows)
                if (at // 32) % 10 == 9 or done == len(paths):
                    array.flush()
                    progress.write_text(json.dumps({"tail_from": int(tail), "tail_done": done >= len(paths) - tail,
                                                    "head_rows": int(max(0, done - (len(paths) - tail)))}))
                    log(f"  {name} view {view}: {done} / {len(paths)} images")
        seg_masks = [masks_of[r][0] for r in range(len(paths))] if view == 0 else []
        seg_levels = [masks_of[r][1] for r in range(len(paths))] if view == 0 else []
        array.flush()
        del array
        if view == 0:
            _save(cache_dir / f"{name}-seg-level.npy", np.concatenate(seg_levels))
            _save_ragged(cache_dir, f"{name}-seg", seg_masks)
        target.with_suffix(".tmp").replace(target)
        log(f"image cache {name} view {view}: {len(paths)} images")


def main() -> None:  # python -m finegrain.train.cache_v2 DATA CACHE_DIR [VIEWS [texts|images[:V|:dev]]]
    import sys
    import time

    t0 = time.time()
    build_cache_v2(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2, show_progress=False,
                   log=lambda m: print(f"[{time.time() - t0:6.0f}s] {m}", flush=True),
                   only=sys.argv[4] if len(sys.argv) > 4 else None)
    print(f"cache ready in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
