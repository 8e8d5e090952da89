"""``finegrain train-objects``: MaO Stage A adapters for the product (docs/mao.md, "Stage A fine-tuning").

Wraps :mod:`finegrain.train.stagea` (composites, frozen crop-vector cache,
adapter, InfoNCE training) for three sources of photos:

* ``flickr8k``: the Flickr8k *train* split, its last ``holdout`` images kept
  for the validation composites (dev images are never read);
* ``images``: the user's own photos (a folder, walked recursively);
* ``index``: the photos an existing index holds (its encoder and object
  settings are used, so the adapter fits that index).

For the user's photos the images are ordered by path, and the last
``holdout`` of them (default 10 %, at least 2) are only ever backgrounds and
donors of validation composites; the training composites use the others.
The epoch kept is the one with the best validation MRR of ``select``
(``objects-max`` by default: the mode ``auto`` picks for object queries);
epoch 0 is the identity, so a run that never beats it writes the identity.
The result is the adapter (safetensors, float32, training summary in its
metadata) and a JSON sidecar with the same summary.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..images import is_image_path
from ..objects.adapter import file_digest
from ..objects.config import ObjectConfig
from . import stagea

#: The protocol's rule for using an adapter by default (docs/mao.md): on the validation composites
#: (training images only), objects-max MRR (the mode auto uses) up by at least MIN_GAIN and by more than
#: twice its paired standard error, and objects MRR not lower.
MIN_GAIN = 0.01
MIN_IMAGES = 4  # two photos for each side: a composite's background and donor are different photos
SELECT = {"objects": "objects", "objects-max": "objects_max"}


@dataclass
class TrainObjectsConfig:
    """What ``finegrain train-objects`` runs."""

    n_train: int = 2000
    n_val: int = 300
    holdout: int = 0  # held-out images for validation; 0: 600 for Flickr8k, else 10 % (at least 2)
    rank: int = 16
    epochs: int = 30
    patience: int = 6
    lr: float = 1e-3
    batch_size: int = 128
    select: str = "objects-max"
    seed: int = 0
    encoder: str = "effnet-minilm"

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_val < 2:
            raise ValueError("--composites must be >= 1 and --val-composites >= 2")
        if not 0 <= self.rank <= 1024:
            raise ValueError("--rank must be between 0 and 1024")
        if not 1 <= self.epochs <= 1000:
            raise ValueError("--epochs must be between 1 and 1000")
        if self.holdout < 0:
            raise ValueError("--holdout must be >= 0")
        if not 0 < self.lr <= 1:
            raise ValueError("--lr must be in (0, 1]")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be >= 2")
        if self.select not in SELECT:
            raise ValueError(f"--select must be one of {', '.join(SELECT)}, not {self.select!r}")


def folder_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))


def index_images(index_path: Path) -> tuple[list[Path], str, ObjectConfig]:
    """The live images of an index that still exist on disk, its encoder, and its object settings (sans adapter)."""
    from ..index import Index

    if not (index_path / "finegrain.sqlite").exists():
        raise FileNotFoundError(f"no index at {index_path}")
    idx = Index.open(index_path)
    snap = idx.snapshot
    paths = sorted(Path(r.path) for r in snap.records.values() if Path(r.path).is_file())
    cfg = snap.object_config or ObjectConfig()
    cfg = ObjectConfig.from_dict({**cfg.to_dict(), "adapter": None})
    return paths, snap.encoder_name, cfg


def split_pool(paths: list[Path], holdout: int, where: str) -> tuple[list[Path], list[Path]]:
    """(training images, held-out validation images): the last ``holdout`` (default 10 %, >= 2) are held out."""
    if len(paths) < MIN_IMAGES:
        raise ValueError(f"too few images: {len(paths)} in {where}; train-objects needs at least {MIN_IMAGES} "
                         "(two for training composites, two held out for validation)")
    n = holdout or max(2, len(paths) // 10)
    if not 2 <= n <= len(paths) - 2:
        raise ValueError(f"--holdout must leave at least 2 images on each side: between 2 and {len(paths) - 2}")
    return paths[:-n], paths[-n:]


def validation_wins(paired: dict) -> bool:
    """The default rule (see :data:`MIN_GAIN`) on :func:`paired_gain`'s unrounded output."""
    best = paired["objects_max"]
    return bool(best["gain"] >= MIN_GAIN and best["gain"] > 2 * best["se"] and paired["objects"]["gain"] >= 0)


def paired_gain(model, split: dict, config: stagea.StageAConfig) -> dict:
    """Per mode: mean gain in reciprocal rank (adapter - identity) over the validation composites, and its SE."""
    x, m, q = stagea.padded(split, config.max_crops)
    out = {}
    ranks = {label: stagea.reciprocal_ranks(mdl, x, m, q, config.pool_p)
             for label, mdl in (("identity", None), ("adapter", model))}
    for mode in ("objects", "objects_max"):
        d = ranks["adapter"][mode] - ranks["identity"][mode]
        out[mode] = {"gain": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    return out


def _plain(value):
    """JSON-safe: floats rounded, NaN (epoch 0 has no loss) as null."""
    if isinstance(value, float):
        return round(value, 4) if np.isfinite(value) else None
    return value


def _pool_key(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def train_objects(out: Path, config: TrainObjectsConfig, cache_dir: Path, data: Path | None = None,
                  images: Path | None = None, index: Path | None = None, show_progress: bool = True,
                  log=print) -> dict:
    """Build (or reuse) the composite cache, train, write ``out`` (+ ``.json``); returns the summary."""
    if sum(x is not None for x in (data, images, index)) != 1:
        raise ValueError("give exactly one of --data (Flickr8k), --images (a folder) or --index (an index)")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out.name!r}")
    objects = ObjectConfig()
    encoder = config.encoder
    cache = stagea.CacheConfig(n_train=config.n_train, n_val=config.n_val, holdout=config.holdout or 600,
                               seed=config.seed, encoder=encoder)
    if data is not None:
        if not (data / "splits" / "train.txt").is_file():
            raise FileNotFoundError(f"{data} is not a Flickr8k folder (no splits/train.txt)")
        source = {"kind": "flickr8k-train", "path": str(data)}
        train_imgs, val_imgs = stagea.split_images(data, cache.holdout)
        arrays = stagea.build_cache(data, cache_dir, cache, objects, show_progress, log)
    else:
        if images is not None:
            pool, where = folder_images(images), str(images)
            source = {"kind": "images", "path": str(images)}
        else:
            assert index is not None
            pool, encoder, objects = index_images(index)
            where = f"the index at {index}"
            source = {"kind": "index", "path": str(index)}
            cache.encoder = encoder
        train_imgs, val_imgs = split_pool(pool, config.holdout, where)
        cache.holdout = len(val_imgs)
        key = {"cache": asdict(cache), "objects": stagea.crop_settings(objects), "side": stagea.SCENE_SIDE,
               "area": list(stagea.AREA_RANGE), "images": _pool_key(pool), "holdout": len(val_imgs), "version": 1}
        arrays = stagea.build_cache_from(train_imgs, val_imgs, cache_dir, key, cache, objects, show_progress, log)
    sa = stagea.StageAConfig(rank=config.rank, pool_p=objects.pool_p, epochs=config.epochs,
                             patience=config.patience, batch_size=config.batch_size, lr=config.lr,
                             max_crops=objects.max_objects + 1, seed=config.seed, select=SELECT[config.select])
    model, info = stagea.train_stagea(arrays, sa, log=log)
    history = info["history"]
    before, after = history[0], history[info["best_epoch"]]

    paired = paired_gain(model, arrays["val"], sa)

    def metrics(h: dict) -> dict:
        return {k: round(float(h[k]), 4) for k in ("objects_mrr", "objects_r1", "objects_max_mrr", "objects_max_r1")}

    summary = {
        "source": source, "encoder": encoder, "objects": objects.to_dict(), "train": asdict(config),
        "composites": {"train": int(len(arrays["train"]["queries"])), "val": int(len(arrays["val"]["queries"]))},
        "train_images": len(train_imgs), "val_images": [str(p) for p in val_imgs],
        "select": config.select, "epochs_run": len(history) - 1, "chosen_epoch": info["best_epoch"],
        "identity": info["best_epoch"] == 0,
        "val_before": metrics(before), "val_after": metrics(after),
        "val_gain": {mode: {k: round(v, 4) for k, v in g.items()} for mode, g in paired.items()},
        "validation_wins": validation_wins(paired),
        "history": [{k: _plain(v) for k, v in h.items()} for h in history],
    }
    meta = {k: summary[k] for k in ("source", "encoder", "objects", "train", "composites", "select",
                                    "chosen_epoch", "val_before", "val_after")}
    meta["dim"] = int(model.log_scale.shape[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    stagea.save_adapter(tmp, model.weights(), meta)
    os.replace(tmp, out)
    summary["out"] = str(out)
    summary["sha256"] = file_digest(out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary

