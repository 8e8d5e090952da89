"""Train the alignment heads of ``effnet-minilm`` (LiT-style, towers frozen).

Recipe: symmetric InfoNCE with a learnable temperature on the Flickr8k train
split, early stopping on the dev split's text->image recall (the shipped
weights), or, with ``val_images`` > 0, on the last ``val_images`` train images
(split file order, never trained on; dev is then only reported, the selection
protocol of :mod:`finegrain.train.aligner_v2`). What is trained:
the image tower's last block and head conv (``ImageTop``), GeM pooling,
attention pooling over the frozen text tokens, and two projection heads.

The frozen parts are run once and cached on disk (``cache_dir``):
trunk feature maps (192 x 7 x 7, fp16) for the original and the mirrored
image, and the final token states of MiniLM (fp16). A re-run with a warm
cache takes minutes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import load_flickr8k
from ..encoders.effnet_minilm import (
    TEXT_MAX_TOKENS,
    Aligner,
    ImageTrunk,
    load_efficientnet_lite0,
    load_minilm,
    minilm_token_states,
    pixels_to_array,
)
from ..eval.metrics import recall_at_k
from ..images import load_image
from ..progress import progress_bar
from .schedule import scheduled_step

VIEWS = ("orig", "flip")
IMAGE_SIZE = 224


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_aligner` (defaults are the shipped recipe)."""

    dim: int = 512
    hidden: int = 0  # 0: linear heads (an MLP did not help on Flickr8k, see the model card)
    text_attention: bool = True  # attention pooling over text tokens beside the mean
    train_image_top: bool = True  # fine-tune EfficientNet's last block and head conv
    gem: bool = True  # learnable GeM pooling (False: fixed average pooling)
    augment: bool = True  # mirrored images as a second view
    dropout: float = 0.1
    epochs: int = 15
    patience: int = 6
    batch_size: int = 256
    lr_heads: float = 1e-3
    lr_top: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    # Selection: 0 validation images = dev chooses the epoch (how the shipped weights were made); N > 0 = the
    # last N train images choose it and dev is only reported. train_images = 0: every train image not validating.
    val_images: int = 0
    train_images: int = 0

    def __post_init__(self) -> None:
        if self.val_images < 0 or self.train_images < 0:
            raise ValueError("train_images and val_images must be >= 0")


# --------------------------------------------------------------------------- cache
def build_cache(data: Path, cache_dir: Path, show_progress: bool = True) -> dict:
    """Run the frozen towers over train+dev once; return the cached arrays (memory-mapped)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits = {name: load_flickr8k(data, name) for name in ("train", "dev")}
    manifest = {
        "images": {k: s.images for k, s in splits.items()},
        "captions": {k: s.captions for k, s in splits.items()},
        "caption_image": {k: s.caption_image for k, s in splits.items()},
    }
    # Each tower's cache is valid for its own inputs and settings; a manifest written last marks it complete.
    image_key = {"images": manifest["images"], "views": list(VIEWS), "image_size": IMAGE_SIZE, "activation": "relu6"}
    text_key = {"captions": manifest["captions"], "max_tokens": 64}
    if not _valid(cache_dir / "images.json", image_key):
        with torch.no_grad():
            _cache_images(splits, cache_dir, show_progress)
        (cache_dir / "images.json").write_text(json.dumps(image_key))
    if not _valid(cache_dir / "texts.json", text_key):
        with torch.no_grad():
            _cache_texts(splits, cache_dir, show_progress)
        (cache_dir / "texts.json").write_text(json.dumps(text_key))
    out = {"manifest": manifest}
    for name in ("train", "dev"):
        for view in VIEWS:
            out[f"{name}_{view}"] = np.load(cache_dir / f"{name}-{view}.npy", mmap_mode="r")
        out[f"{name}_tokens"] = np.load(cache_dir / f"{name}-tokens.npy", mmap_mode="r")
        out[f"{name}_mask"] = np.load(cache_dir / f"{name}-mask.npy", mmap_mode="r")
    return out


def _valid(path: Path, key: dict) -> bool:
    return path.exists() and json.loads(path.read_text()) == key


def _cache_images(splits, cache_dir: Path, show_progress: bool) -> None:
    trunk = ImageTrunk(load_efficientnet_lite0()).eval()
    for name, split in splits.items():
        paths = split.image_paths()
        shape = (len(paths), 192, IMAGE_SIZE // 32, IMAGE_SIZE // 32)
        arrays = {v: np.lib.format.open_memmap(cache_dir / f"{name}-{v}.npy.tmp", mode="w+", dtype=np.float16,
                                               shape=shape) for v in VIEWS}
        with progress_bar(len(paths), f"tower features ({name})", show_progress) as bar:
            for start in range(0, len(paths), 64):
                batch = np.stack([pixels_to_array(load_image(p), IMAGE_SIZE) for p in paths[start:start + 64]])
                x = torch.from_numpy(batch)
                arrays["orig"][start:start + len(x)] = trunk(x).numpy().astype(np.float16)
                arrays["flip"][start:start + len(x)] = trunk(torch.flip(x, dims=[3])).numpy().astype(np.float16)
                bar.advance(len(x))
        for v, arr in arrays.items():
            arr.flush()
            del arr
            (cache_dir / f"{name}-{v}.npy.tmp").replace(cache_dir / f"{name}-{v}.npy")


def _cache_texts(splits, cache_dir: Path, show_progress: bool) -> None:
    tokenizer, model = load_minilm()
    for name, split in splits.items():
        texts = split.captions
        lengths = tokenizer(texts, TEXT_MAX_TOKENS)[1].sum(1).tolist()
        width = max(lengths)
        tokens = np.zeros((len(texts), width, 384), np.float16)
        mask = np.zeros((len(texts), width), np.uint8)
        order = np.argsort(lengths)
        with progress_bar(len(texts), f"text tower ({name})", show_progress) as bar:
            for start in range(0, len(texts), 256):
                idx = order[start:start + 256]
                states, m = minilm_token_states(tokenizer, model, [texts[i] for i in idx])
                tokens[idx, : states.shape[1]] = states.numpy().astype(np.float16)
                mask[idx, : m.shape[1]] = m.numpy().astype(np.uint8)
                bar.advance(len(idx))
        np.save(cache_dir / f"{name}-tokens.npy", tokens)
        np.save(cache_dir / f"{name}-mask.npy", mask)


# --------------------------------------------------------------------------- training
def evaluate(model: Aligner, cache: dict, split: str = "dev", images: np.ndarray | None = None) -> dict:
    """Text->image and image->text recall on a cached split (original view only).

    ``images``: only these rows of the split and their captions (the validation slice); default all.
    """
    model.eval()
    maps = cache[f"{split}_orig"]
    cap_all = np.asarray(cache["manifest"]["caption_image"][split])
    rows = np.arange(len(maps)) if images is None else np.asarray(images)
    captions = np.arange(len(cap_all)) if images is None else np.flatnonzero(np.isin(cap_all, rows))
    position = np.full(len(maps), -1)
    position[rows] = np.arange(len(rows))
    cap_img = position[cap_all[captions]]  # each caption's image, as a position in ``rows``
    tok, msk = cache[f"{split}_tokens"], cache[f"{split}_mask"]
    with torch.no_grad():
        img_t = torch.cat([
            model.image_embed(torch.from_numpy(np.asarray(maps[rows[i:i + 256]], np.float32)))
            for i in range(0, len(rows), 256)])
        txt_t = torch.cat([model.text_embed(torch.from_numpy(np.asarray(tok[captions[i:i + 512]], np.float32)),
                                            torch.from_numpy(np.asarray(msk[captions[i:i + 512]], np.int64)))
                           for i in range(0, len(captions), 512)])
    img, txt = F.normalize(img_t, dim=-1).numpy(), F.normalize(txt_t, dim=-1).numpy()
    sims = txt @ img.T
    t2i_rank = (sims > sims[np.arange(len(txt)), cap_img][:, None]).sum(1)  # 0-based rank of the true image
    i2t = img @ txt.T
    # image->text: rank of the best-ranked of its captions
    best = np.full(len(img), np.inf)
    for c, i in enumerate(cap_img):
        best[i] = min(best[i], (i2t[i] > i2t[i, c]).sum())
    out = {f"t2i_r{k}": 100 * recall_at_k(t2i_rank, k) for k in (1, 5, 10)}
    out.update({f"i2t_r{k}": 100 * recall_at_k(best, k) for k in (1, 5, 10)})
    return out


def selection_items(n_train: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Train rows to train on (the first ``train_images``) and the validation rows (the last ``val_images``; None:
    dev chooses). Raises ValueError with a one-line reason when the split is too small."""
    if config.val_images >= n_train:
        raise ValueError(f"val_images must be below the {n_train} train images")
    limit = n_train - config.val_images
    if config.train_images > limit:
        why = f"the other {config.val_images} validate" if config.val_images else "the size of the train split"
        raise ValueError(f"train_images must be at most {limit} ({why})")
    val = np.arange(limit, n_train) if config.val_images else None
    return np.arange(config.train_images or limit), val


def check_selection(data: str | Path, config: TrainConfig) -> None:
    """Refuse ``train_images`` / ``val_images`` the train split cannot hold, before any tower runs."""
    selection_items(len(load_flickr8k(Path(data), "train").images), config)


def train_aligner(data: str | Path, out: str | Path, cache_dir: str | Path, config: TrainConfig | None = None,
                  show_progress: bool = True, log=print) -> dict:
    """Train the heads and write ``out`` (.safetensors) plus ``out.json`` (config and metrics)."""
    from safetensors.torch import save_file

    config = config or TrainConfig()
    check_selection(data, config)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    t0 = time.time()
    cache = build_cache(Path(data), Path(cache_dir), show_progress)
    log(f"tower cache ready in {time.time() - t0:.0f}s")

    model = Aligner(load_efficientnet_lite0(), dim=config.dim, hidden=config.hidden,
                    text_attention=config.text_attention, dropout=config.dropout)
    if not config.train_image_top:
        model.image_top.requires_grad_(False)
    if not config.gem:
        model.image_pool.p.data.fill_(1.0)
        model.image_pool.p.requires_grad_(False)
    top_params = [p for p in model.image_top.parameters() if p.requires_grad]
    top_ids = {id(p) for p in top_params}
    head_params = [p for p in model.parameters() if id(p) not in top_ids and p.requires_grad]
    groups = [{"params": head_params, "lr": config.lr_heads}]
    if top_params:
        groups.append({"params": top_params, "lr": config.lr_top})
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]

    train_views = [torch.from_numpy(np.array(cache[f"train_{v}"])) for v in VIEWS]  # fp16, ~0.1 GB each
    tokens, mask = torch.from_numpy(np.array(cache["train_tokens"])), torch.from_numpy(np.array(cache["train_mask"]))
    cap_img = np.asarray(cache["manifest"]["caption_image"]["train"])
    captions_of = [np.flatnonzero(cap_img == i) for i in range(len(train_views[0]))]
    train_items, val_items = selection_items(len(captions_of), config)
    chooser = "dev" if val_items is None else "val"
    n_images = len(train_items)
    steps_per_epoch = max(1, n_images // config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    best, best_state, best_epoch, step, history = -1.0, None, -1, 0, []
    for epoch in range(config.epochs):
        model.train()
        _freeze_batchnorm(model)
        perm = rng.permutation(n_images)
        losses = []
        for b in range(steps_per_epoch):
            idx = train_items[perm[b * config.batch_size:(b + 1) * config.batch_size]]
            view = rng.integers(0, len(VIEWS) if config.augment else 1, size=len(idx))
            feats = torch.stack([train_views[v][i] for v, i in zip(view, idx)]).float()
            cap = np.array([rng.choice(captions_of[i]) for i in idx])
            img_emb = F.normalize(model.image_embed(feats), dim=-1)
            txt_emb = F.normalize(model.text_embed(tokens[cap].float(), mask[cap].long()), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img_emb @ txt_emb.T
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            losses.append(scheduled_step(opt, base_lrs, loss, step, config.warmup_steps, total_steps))
            step += 1
        metrics = evaluate(model, cache, "dev") if val_items is None else evaluate(model, cache, "train", val_items)
        score = metrics["t2i_r1"] + metrics["t2i_r5"] + metrics["t2i_r10"]
        prefix = "" if val_items is None else "val_"  # the shipped weights' history has dev's keys bare
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                        **{prefix + k: v for k, v in metrics.items()}})
        log(f"epoch {epoch + 1:2d} loss {np.mean(losses):.3f} {chooser} t2i R@1/5/10 "
            f"{metrics['t2i_r1']:.1f}/{metrics['t2i_r5']:.1f}/{metrics['t2i_r10']:.1f} "
            f"i2t R@1 {metrics['i2t_r1']:.1f} temp {1 / model.logit_scale.exp().item():.4f} ({time.time() - t0:.0f}s)")
        if score > best:
            best, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        elif epoch + 1 - best_epoch >= config.patience:
            log(f"early stop: no {chooser} improvement for {config.patience} epochs")
            break

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    assert best_state is not None  # the first epoch's score (>= 0) beats the initial -1
    # Stored as float16 (half the size); loaded back as float32.
    save_file({k: v.half() if v.is_floating_point() else v for k, v in best_state.items()}, str(out))
    model.load_state_dict(best_state)
    result = {
        "model": "effnet-minilm",
        "dim": config.dim,
        "hidden": config.hidden,
        "text_attention": config.text_attention,
        "recipe": asdict(config),
        "best_epoch": best_epoch,
        "train_images": n_images,
        "selection": "epoch with the best dev t2i R@1+R@5+R@10 (dev numbers are not held out)" if val_items is None
        else f"epoch with the best t2i R@1+R@5+R@10 on the last {config.val_images} train images (split file "
             "order, never trained on); dev never seen in training or selection",
        **({} if val_items is None else {"val_metrics": evaluate(model, cache, "train", val_items)}),
        "dev_metrics": evaluate(model, cache, "dev"),
        "history": history,
        "train_seconds": round(time.time() - t0, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    """Keep the pretrained BatchNorm statistics: small batches of one domain would skew them."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
