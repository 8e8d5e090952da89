"""Shared fixtures: real sample photos (scikit-image), the shared data folder, a tiny Flickr-style set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared evaluation data not found at {DATA}")


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Six real photographs bundled with scikit-image, saved as JPEG/PNG."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        arr = getattr(data, name)()
        Image.fromarray(arr).save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="session")
def tiny_flickr(tmp_path_factory) -> Path:
    """A Flickr8k-shaped folder (images/, captions.tsv, splits/) built from crops of sample photos."""
    from skimage import data

    root = tmp_path_factory.mktemp("tinyflickr")
    (root / "images").mkdir()
    (root / "splits").mkdir()
    rng = np.random.default_rng(0)
    subjects = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat",
                "rocket": "a rocket", "coins": "some coins", "camera": "a man with a camera"}
    names, lines = [], ["image\tcaption_id\tcaption"]
    for subject, phrase in subjects.items():
        arr = getattr(data, subject)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        h, w = arr.shape[:2]
        for j in range(4):
            y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
            crop = Image.fromarray(arr[y:y + 3 * h // 4, x:x + 3 * w // 4]).resize((224, 224))
            name = f"{subject}_{j}.jpg"
            crop.save(root / "images" / name, quality=85)
            names.append(name)
            for c in range(5):
                lines.append(f"{name}\t{c}\t{phrase} picture number {c}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    train = [n for n in names if not n.endswith("_3.jpg")]
    dev = [n for n in names if n.endswith("_3.jpg")]
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "dev.txt").write_text("\n".join(dev) + "\n")
    return root
