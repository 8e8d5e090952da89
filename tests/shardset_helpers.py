"""A small shard set and the one index holding the same images, with every field (for equality tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index
from finegrain.local.store import STATE_FILE, LocalConfig
from finegrain.objects.config import ObjectConfig
from finegrain.shards import ShardedIndex

SETTINGS = {"segments": SegmentConfig(levels=(1, 4)), "objects": ObjectConfig(max_objects=3),
            "local": LocalConfig("cnn", {"image_size": 160, "scales": [1.0], "max_features": 40, "threads": 1},
                                 fit_images=4)}

#: Modes whose merged ranking equals one index's (``l2g`` in two rounds: finegrain.local.sharded). Per mode, the
#: query kinds it takes.
EXACT_MODES = {"global": ("text", "image"), "single": ("text", "image"), "exhaustive": ("text", "image"),
               "hierarchical": ("text", "image"), "instance": ("image",), "global+local": ("image",),
               "local": ("image",), "l2g": ("image",), "objects": ("image",), "objects-max": ("image",)}


def build(root: Path, photos: list[Path], parts: int = 2, settings: dict | None = None) -> tuple[Index, list[Path]]:
    """One index over ``photos`` and ``parts`` shards (round robin) sharing its fitted local-feature state."""
    settings = SETTINGS if settings is None else settings
    whole = Index.create(root / "whole", **settings)
    whole.add(photos, show_progress=False)
    shards = []
    for n in range(parts):
        shard = root / f"part-{n}"
        Index.create(shard, **settings).close()
        if (root / "whole" / STATE_FILE).exists():
            # Shards must share learned state (like the encoder), else their local descriptors are not comparable.
            (shard / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "whole" / STATE_FILE, shard / STATE_FILE)
        with Index.open(shard) as index:
            index.add(photos[n::parts], show_progress=False)
        shards.append(shard)
    return whole, shards


def make_set(root: Path, shards: list[Path], name: str = "set") -> Path:
    ShardedIndex.create(root / name, shards).close()
    return root / name


def queries(photos: list[Path], kinds: tuple[str, ...]) -> list[dict]:
    out: list[dict] = []
    if "text" in kinds:
        out += [{"text": "a cat"}, {"text": "coins on a table"}]
    if "image" in kinds:
        out += [{"image": str(photos[1])}]
    return out


def same_hits(got, expected, mode: str = "") -> None:
    """A shard set's hits equal one index's: the same images in the same order, scores up to float noise."""
    assert [h.path for h in got] == [h.path for h in expected]
    if mode == "l2g":
        # float32 noise in the first stage's sums can move SMACOF's stopping point; the paper variant's fused
        # scores are small, so its noise is judged relative to them
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], rtol=1e-2, atol=5e-5)
    else:
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)
