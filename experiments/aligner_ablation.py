"""Ablation of the ``effnet-minilm`` aligner recipe on Flickr8k, with the image tower frozen.

What this measures
------------------
Dev-split text->image recall (R@1/5/10, 5000 captions against 1000 images)
of alignment heads trained with symmetric InfoNCE on the Flickr8k train split,
one row per recipe ingredient:

* ``linear, avg pool, no flip``  linear heads on average-pooled image maps and
  mean-pooled MiniLM tokens, original images only;
* ``+ flip augmentation``        each step picks the original or the mirrored
  view of every image at random;
* ``GeM p=3 instead of avg``     generalised-mean pooling with a fixed p=3;
* ``+ MLP heads (1024)``         residual MLP beside the linear heads;
* ``+ text attention pooling``   a learned attention-weighted token mean
  concatenated to the plain mean.

The image tower is frozen in *all* of these rows: the whole EfficientNet-Lite0
(including its last block and head conv, ``ImageTop``) runs once, its
1280 x 7 x 7 maps are pooled (average and GeM p=3) and only the heads and the
temperature are trained. That makes a row take well under a minute on CPU, but
it is not the shipped recipe. The shipped recipe (fine-tuned image top +
learnable GeM + text attention pooling + flip) is trained by
``finegrain train-aligner``; its dev numbers are in
``src/finegrain/encoders/weights/effnet-minilm.json``.

The heads are the product's own modules (``ProjectionHead``, ``TextPool``,
``GeM``, ``ImageTop``); the frozen towers come from the on-disk cache of
:func:`finegrain.train.aligner.build_cache` (built on first use).

Usage::

    python -m experiments.aligner_ablation --data ../shared/data/flickr8k [--cache-dir DIR] [--epochs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from finegrain.encoders.effnet_minilm import Aligner, GeM, ProjectionHead, TextPool, load_efficientnet_lite0
from finegrain.eval.metrics import recall_at_k
from finegrain.train.aligner import build_cache

DEFAULT_CACHE = Path.home() / ".cache" / "finegrain" / "aligner-flickr8k"
TEXT_WIDTH = 384
IMAGE_WIDTH = 1280
TOP_BATCH = 250
EVAL_BATCH = 500

err = Console(stderr=True)


@dataclass(frozen=True)
class VariantConfig:
    """One row of the ablation: what the heads see and how they are trained."""

    name: str
    pool: str = "avg"  # "avg" or "gem" (GeM with fixed p=3)
    hidden: int = 0  # 0: linear heads; >0: residual MLP width
    text_attention: bool = False
    flip: bool = True  # random original / mirrored view per image and step
    dim: int = 512
    dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    seed: int = 0


VARIANTS: list[dict] = [
    dict(name="linear, avg pool, no flip", pool="avg", hidden=0, text_attention=False, flip=False),
    dict(name="+ flip augmentation", pool="avg", hidden=0, text_attention=False, flip=True),
    dict(name="GeM p=3 instead of avg", pool="gem", hidden=0, text_attention=False, flip=True),
    dict(name="+ MLP heads (1024)", pool="avg", hidden=1024, text_attention=False, flip=True),
    dict(name="+ text attention pooling", pool="avg", hidden=0, text_attention=True, flip=True),
]


@dataclass
class Data:
    """Frozen-tower inputs of the heads, all in memory."""

    images: dict[str, dict[str, torch.Tensor]]  # pool -> "train_orig"/"train_flip"/"dev_orig" -> (N, 1280) fp32
    train_tokens: torch.Tensor  # (C, T, 384) fp16
    train_mask: torch.Tensor  # (C, T) int64
    dev_tokens: torch.Tensor
    dev_mask: torch.Tensor
    train_caption_image: np.ndarray  # (C,) image index of each caption
    dev_caption_image: np.ndarray


# --------------------------------------------------------------------------- frozen features
def pooled_image_features(cache: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Run the frozen ImageTop once per cached view and pool its maps by average and by GeM p=3."""
    top = Aligner(load_efficientnet_lite0()).image_top.eval().to(memory_format=torch.channels_last)
    gem = GeM(p=3.0).requires_grad_(False)
    out: dict[str, dict[str, torch.Tensor]] = {"avg": {}, "gem": {}}
    for key in ("train_orig", "train_flip", "dev_orig"):
        trunk = cache[key]
        avg, gm = [], []
        with torch.inference_mode():
            for start in range(0, len(trunk), TOP_BATCH):
                x = torch.from_numpy(np.asarray(trunk[start:start + TOP_BATCH], np.float32))
                fmap = top(x.contiguous(memory_format=torch.channels_last)).contiguous()
                avg.append(fmap.mean(dim=(-2, -1)))
                gm.append(gem(fmap))
        out["avg"][key], out["gem"][key] = torch.cat(avg), torch.cat(gm)
    return out


def load_data(data_dir: Path, cache_dir: Path) -> Data:
    """Build or load the tower cache and derive the pooled image features."""
    cache = build_cache(data_dir, cache_dir, show_progress=False)
    caption_image = cache["manifest"]["caption_image"]
    return Data(
        images=pooled_image_features(cache),
        train_tokens=torch.from_numpy(np.array(cache["train_tokens"])),
        train_mask=torch.from_numpy(np.asarray(cache["train_mask"], np.int64)),
        dev_tokens=torch.from_numpy(np.array(cache["dev_tokens"])),
        dev_mask=torch.from_numpy(np.asarray(cache["dev_mask"], np.int64)),
        train_caption_image=np.asarray(caption_image["train"]),
        dev_caption_image=np.asarray(caption_image["dev"]),
    )


# --------------------------------------------------------------------------- heads
class Heads(nn.Module):
    """Trainable part of the frozen-tower variants: both heads, text pooling, temperature."""

    def __init__(self, config: VariantConfig):
        super().__init__()
        self.image_head = ProjectionHead(IMAGE_WIDTH, config.dim, config.hidden, config.dropout)
        self.text_pool = TextPool(TEXT_WIDTH, config.text_attention)
        self.text_head = ProjectionHead(self.text_pool.out_dim, config.dim, config.hidden, config.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
        self.max_logit_scale = config.max_logit_scale

    def image_embed(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(pooled), dim=-1)

    def text_embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_pool(tokens.float(), mask)), dim=-1)

    def loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of matching (image, caption) pairs."""
        logits = self.logit_scale.exp().clamp(max=self.max_logit_scale) * img @ txt.T
        target = torch.arange(len(img))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# --------------------------------------------------------------------------- training
def captions_by_image(caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Padded (n_images, max_captions) caption indices and the count per image."""
    n_images = int(caption_image.max()) + 1
    counts = np.bincount(caption_image, minlength=n_images)
    table = np.zeros((n_images, counts.max()), np.int64)
    order = np.argsort(caption_image, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for i in range(n_images):
        table[i, : counts[i]] = order[starts[i]:starts[i] + counts[i]]
    return table, counts


def sample_batch(idx: np.ndarray, data: Data, config: VariantConfig, captions: tuple[np.ndarray, np.ndarray],
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled image features (random view if flip is on) and one random caption per image."""
    feats = data.images[config.pool]
    image = feats["train_orig"][idx]
    if config.flip:
        use_flip = torch.from_numpy(rng.integers(0, 2, size=len(idx)).astype(bool))[:, None]
        image = torch.where(use_flip, feats["train_flip"][idx], image)
    table, counts = captions
    cap = table[idx, rng.integers(0, counts[idx])]
    return image, data.train_tokens[cap], data.train_mask[cap]


def evaluate(model: Heads, data: Data, pool: str) -> dict[str, float]:
    """Dev text->image recall@1/5/10 (original view); rank = images scoring strictly above the true one."""
    model.eval()
    with torch.no_grad():
        img = model.image_embed(data.images[pool]["dev_orig"])
        txt = torch.cat([model.text_embed(data.dev_tokens[i:i + EVAL_BATCH], data.dev_mask[i:i + EVAL_BATCH])
                         for i in range(0, len(data.dev_tokens), EVAL_BATCH)])
    sims = (txt @ img.T).numpy()
    true = sims[np.arange(len(sims)), data.dev_caption_image][:, None]
    ranks = (sims > true).sum(1)
    return {f"r{k}": 100 * recall_at_k(ranks, k) for k in (1, 5, 10)}


def train_epoch(model: Heads, opt: torch.optim.Optimizer, sched, data: Data, config: VariantConfig,
                captions: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> float:
    """One pass over the train images in random order (last partial batch dropped); mean loss."""
    model.train()
    n_images = len(captions[1])
    perm = rng.permutation(n_images)
    losses = []
    for b in range(n_images // config.batch_size):
        idx = perm[b * config.batch_size:(b + 1) * config.batch_size]
        image, tokens, mask = sample_batch(idx, data, config, captions, rng)
        loss = model.loss(model.image_embed(image), model.text_embed(tokens, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def run_variant(config: VariantConfig, data: Data) -> dict:
    """Train one variant's heads from seed; return its best dev epoch by R@1+R@5+R@10."""
    t0 = time.time()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = Heads(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    captions = captions_by_image(data.train_caption_image)
    total_steps = (len(captions[1]) // config.batch_size) * config.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    best: dict = {"score": -1.0}
    for epoch in range(1, config.epochs + 1):
        loss = train_epoch(model, opt, sched, data, config, captions, rng)
        metrics = evaluate(model, data, config.pool)
        score = metrics["r1"] + metrics["r5"] + metrics["r10"]
        err.log(f"{config.name}: epoch {epoch:2d} loss {loss:.3f} R@1/5/10 "
                f"{metrics['r1']:.1f}/{metrics['r5']:.1f}/{metrics['r10']:.1f}")
        if score > best["score"]:
            best = {"score": score, "best_epoch": epoch, **metrics}
    settings = {k: v for k, v in asdict(config).items() if k != "name"}
    return {"variant": config.name, "best_epoch": best["best_epoch"], "t2i_r1": round(best["r1"], 2),
            "t2i_r5": round(best["r5"], 2), "t2i_r10": round(best["r10"], 2),
            "seconds": round(time.time() - t0, 1), "settings": settings}


# --------------------------------------------------------------------------- output
def results_table(results: list[dict]) -> Table:
    table = Table(title="effnet-minilm ablation, frozen image tower (Flickr8k dev, text->image)",
                  title_justify="left")
    table.add_column("variant")
    for col in ("best epoch", "R@1", "R@5", "R@10", "seconds"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["variant"], str(r["best_epoch"]), f"{r['t2i_r1']:.1f}", f"{r['t2i_r5']:.1f}",
                      f"{r['t2i_r10']:.1f}", f"{r['seconds']:.0f}")
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k folder (captions.tsv, images/, splits/).")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="Tower cache (built if missing).")
    parser.add_argument("--epochs", type=int, default=20, help="Epochs per variant.")
    parser.add_argument("--json", action="store_true", help="Also print the results as a last JSON line.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    data = load_data(args.data, args.cache_dir)
    err.log(f"frozen features ready in {time.time() - t0:.0f}s")
    results = [run_variant(VariantConfig(**v, epochs=args.epochs), data) for v in VARIANTS]
    Console().print(results_table(results))
    if args.json:
        print(json.dumps({"results": results}))


if __name__ == "__main__":
    sys.exit(main())
