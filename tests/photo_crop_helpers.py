"""Test collections cut from the sample photos (conftest's ``photos_dir``): crops of one photo are near duplicates."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from finegrain.local.store import LocalConfig


def crop_boxes(w: int, h: int, n: int = 2) -> list[tuple[int, int, int, int]]:
    """``n`` (2 or 3) overlapping crops of a ``w`` x ``h`` photo: its top-left and bottom-right three quarters, then
    its right seven eighths without the bottom eighth."""
    boxes = [(0, 0, 3 * w // 4, 3 * h // 4), (w // 4, h // 4, w, h), (w // 8, 0, w, 7 * h // 8)]
    assert 1 <= n <= len(boxes)
    return boxes[:n]


def save_two_crops(photos: Iterable[Path], folder: Path) -> None:
    """``<stem>_a.jpg`` and ``<stem>_b.jpg`` in ``folder``: two crops of each photo."""
    for p in photos:
        img = Image.open(p).convert("RGB")
        for suffix, box in zip("ab", crop_boxes(*img.size)):
            img.crop(box).save(folder / f"{p.stem}_{suffix}.jpg")


def small_cnn_local() -> LocalConfig:
    """cnn local features small enough for a test (192 px, two scales, 120 features, one thread)."""
    return LocalConfig("cnn", {"image_size": 192, "scales": [1.0, 0.707], "max_features": 120, "threads": 1},
                       fit_images=6)


def revisitop_folder(root: Path, photos_dir: Path, query: str = "q_{stem}", crops: int = 2) -> Path:
    """A revisitop-shaped folder at ``root`` (``jpg/``, ``gnd_tiny.json``), one landmark per sample photo.

    Database: ``crops`` crops of each photo (``tiny_<stem>_<j:06d>``; the last one "hard", the others "easy").
    Query: the whole photo, named ``query.format(stem=...)``, its box the middle three quarters.
    """
    (root / "jpg").mkdir(parents=True)
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict] = []
    for p in sorted(photos_dir.iterdir()):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        for j, box in enumerate(crop_boxes(w, h, crops)):
            name = f"tiny_{p.stem}_{j:06d}"
            img.crop(box).save(root / "jpg" / f"{name}.jpg")
            imlist.append(name)
        qimlist.append(query.format(stem=p.stem))
        img.save(root / "jpg" / f"{qimlist[-1]}.jpg")
        first = len(imlist) - crops
        gnd.append({"bbx": [w / 8, h / 8, 7 * w / 8, 7 * h / 8], "easy": list(range(first, len(imlist) - 1)),
                    "hard": [len(imlist) - 1], "junk": []})
    (root / "gnd_tiny.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return root
