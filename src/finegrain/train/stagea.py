"""MaO Stage A for finegrain: a small adapter on the raw crop vectors, trained with InfoNCE on composites.

The paper fine-tunes the backbone (LoRA) so that the averaged descriptor of
an image's object crops matches the embedding of the object sought. Here
the image tower stays frozen and only a small adapter on its raw crop
vectors (GeM p = 3, L2-normalised, 1280-d for effnet-minilm) is trained:

    a(v) = normalize(relu(exp(s) * v + U V^T v))

(per-channel scale ``s`` and a rank-``rank`` residual, initialised to the
identity: raw GeM values are non-negative, so relu(v) = v at the start).
The adapter is applied to every crop vector *and* to the query vector; the
image's descriptor is the generalised mean (``pool_p``) of the adapted crops.

Training data are synthetic composites built only from Flickr8k *train*
images (never dev images, which the ``needles`` scenes are made of): a
background photo squashed to 448 x 448 (as the needles scenes), with a box
cropped from ANOTHER train photo pasted at 1-4 % of the area (the needles
range). The positive pair is (the composite's multi-object descriptor, the
pasted crop encoded on its own as a query, from a slightly jittered box).
Proposals and crops come from the index's own pipeline
(:func:`~finegrain.objects.descriptor.prepare_objects` with the default
:class:`~finegrain.objects.ObjectConfig`), so training sees what indexing
sees. The tower is frozen, so the crop vectors are computed once and cached
on disk (fp16 .npy under ``cache_dir``); training runs over the cache in
seconds. Early stopping uses composites built from a held-out tail of the
train split (its images are never backgrounds or donors of the training
composites).

Result (docs/mao.md, "Stage A fine-tuning"; ``experiments/mao_stagea.py``): the
adapter doubles the held-out composites' ``objects`` MRR but does not help
on the ``needles`` benchmark (``objects`` within noise, ``objects-max``
lower). It is in the product as an opt-in (``finegrain train-objects``,
:mod:`finegrain.train.objects`; ``finegrain index --object-adapter``), not as
the default.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..datasets import load_flickr8k
from ..images import load_image
from ..objects.config import ObjectConfig
from ..objects.descriptor import encode_crops, prepare_objects
from ..objects.proposals import iou
from ..progress import progress_bar

SCENE_SIDE = 448
AREA_RANGE = (0.01, 0.04)


# --------------------------------------------------------------------------- composites
@dataclass
class Composite:
    """One synthetic scene: ``image`` with ``box`` (pixels x0 y0 x1 y1) pasted from ``query``'s source."""

    image: Image.Image
    box: tuple[int, int, int, int]
    query: Image.Image  # the pasted object as a query would show it (own resolution, jittered box)
    area_fraction: float


def make_composite(background: Image.Image, donor: Image.Image, rng: np.random.Generator,
                   side: int = SCENE_SIDE, area_range: tuple[float, float] = AREA_RANGE,
                   jitter: float = 0.1) -> Composite:
    """Paste a random box of ``donor`` into ``background`` (squashed to ``side`` x ``side``) at 1-4 % of the area.

    The donor box covers 10-50 % of the donor with an aspect ratio in
    [0.5, 2]; it is pasted with its aspect kept at a uniformly drawn area
    fraction in ``area_range``, at a uniform position. The query is the same
    donor region at the donor's resolution, its box shifted and scaled by up
    to ``jitter`` of its size (a query is never pixel-identical to the scene).
    """
    scene = background.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    donor = donor.convert("RGB")
    dw, dh = donor.size
    frac = rng.uniform(0.1, 0.5)
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
    bw = min(dw, max(8, int(round(np.sqrt(frac * dw * dh * aspect)))))
    bh = min(dh, max(8, int(round(np.sqrt(frac * dw * dh / aspect)))))
    bx, by = int(rng.integers(0, dw - bw + 1)), int(rng.integers(0, dh - bh + 1))
    obj = donor.crop((bx, by, bx + bw, by + bh))
    area = rng.uniform(*area_range)
    r = bw / bh
    pw = max(4, int(round(np.sqrt(area * side * side * r))))
    ph = max(4, int(round(np.sqrt(area * side * side / r))))
    pw, ph = min(pw, side), min(ph, side)
    px, py = int(rng.integers(0, side - pw + 1)), int(rng.integers(0, side - ph + 1))
    scene.paste(obj.resize((pw, ph), Image.Resampling.BICUBIC), (px, py))
    # Query: the same region, jittered (shift and scale up to `jitter` of its size), clipped to the donor.
    jx, jy = rng.uniform(-jitter, jitter, 2) * (bw, bh)
    js = 1.0 + rng.uniform(-jitter, jitter)
    cx, cy = bx + bw / 2 + jx, by + bh / 2 + jy
    qx0, qy0 = max(0, int(round(cx - bw * js / 2))), max(0, int(round(cy - bh * js / 2)))
    qx1, qy1 = min(dw, int(round(cx + bw * js / 2))), min(dh, int(round(cy + bh * js / 2)))
    if qx1 - qx0 < 4 or qy1 - qy0 < 4:
        qx0, qy0, qx1, qy1 = bx, by, bx + bw, by + bh
    query = donor.crop((qx0, qy0, qx1, qy1))
    return Composite(scene, (px, py, px + pw, py + ph), query, pw * ph / (side * side))


# --------------------------------------------------------------------------- cache
@dataclass
class CacheConfig:
    """What the frozen-feature cache holds (part of its validity key)."""

    n_train: int = 2000  # training composites
    n_val: int = 300  # validation composites, from the held-out train images
    holdout: int = 600  # last train-split images kept for validation composites only
    seed: int = 0
    encoder: str = "effnet-minilm"


def split_images(data: Path, holdout: int) -> tuple[list[Path], list[Path]]:
    """Flickr8k *train* image paths: (training part, held-out tail). Dev images are never read."""
    paths = load_flickr8k(data, "train").image_paths()
    if holdout <= 0 or holdout >= len(paths):
        raise ValueError(f"holdout must be between 1 and {len(paths) - 1}")
    return list(paths[:-holdout]), list(paths[-holdout:])


def build_cache(data: str | Path, cache_dir: str | Path, config: CacheConfig | None = None,
                objects: ObjectConfig | None = None, show_progress: bool = True, log=print) -> dict:
    """Encode the composites' crops and queries once (fp16 .npy, memory-mapped on return)."""
    config = config or CacheConfig()
    objects = objects or ObjectConfig()
    if objects.space != "raw":
        raise ValueError("Stage A adapts raw crop vectors (ObjectConfig(space='raw'))")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    train_imgs, val_imgs = split_images(Path(data), config.holdout)
    key = {"cache": asdict(config), "objects": crop_settings(objects), "side": SCENE_SIDE, "area": list(AREA_RANGE),
           "train_images": len(train_imgs), "first_val_image": val_imgs[0].name, "version": 1}
    return build_cache_from(train_imgs, val_imgs, cache_dir, key, config, objects, show_progress, log)


#: ObjectConfig fields that do not change the cached crop vectors (only how they are fused or refined later).
NOT_IN_CROPS = ("pool_p", "refine_iters", "refine_objects", "refine_variant", "alpha", "lr", "adapter")


def crop_settings(objects: ObjectConfig) -> dict:
    """The object settings the cached crop vectors depend on (the cache's validity key)."""
    return {k: v for k, v in objects.to_dict().items() if k not in NOT_IN_CROPS}


def build_cache_from(train_imgs: list[Path], val_imgs: list[Path], cache_dir: Path, key: dict, config: CacheConfig,
                     objects: ObjectConfig, show_progress: bool = True, log=print) -> dict:
    """:func:`build_cache` over given image lists: validation composites only from ``val_imgs``.

    ``key`` identifies the images and settings; a split whose stored key
    differs is rebuilt.
    """
    from .. import encoders

    cache_dir.mkdir(parents=True, exist_ok=True)
    enc = None
    for split, pool, n, seed in (("val", val_imgs, config.n_val, config.seed + 1),
                                 ("train", train_imgs, config.n_train, config.seed)):
        if _valid(cache_dir / f"{split}.json", key):
            continue
        enc = enc or encoders.create(config.encoder)
        t0 = time.time()
        _encode_split(enc, pool, n, np.random.default_rng(seed), objects, cache_dir, split, show_progress)
        (cache_dir / f"{split}.json").write_text(json.dumps(key))
        log(f"stage A cache: {n} {split} composites in {time.time() - t0:.0f}s")
    return {split: load_split(cache_dir, split) for split in ("train", "val")}


def _valid(path: Path, key: dict) -> bool:
    return path.exists() and json.loads(path.read_text()) == key


def _encode_split(enc, pool: list[Path], n: int, rng: np.random.Generator, objects: ObjectConfig,
                  cache_dir: Path, split: str, show_progress: bool) -> None:
    crops, offsets, queries, boxes, areas, hits = [], [0], [], [], [], []
    with progress_bar(n, f"stage A composites ({split})", show_progress) as bar:
        for _ in range(n):
            bg, donor = rng.choice(len(pool), 2, replace=False)  # the object always comes from another photo
            comp = make_composite(load_image(pool[bg]), load_image(pool[donor]), rng)
            inputs = prepare_objects(comp.image, enc, objects)
            pixels = np.concatenate([inputs.pixels, enc.prepare_image(comp.query, objects.crop_size)[None]])
            vecs = encode_crops(enc, pixels, "raw")[0]
            crops.append(vecs[:-1].astype(np.float16))
            queries.append(vecs[-1].astype(np.float16))
            offsets.append(offsets[-1] + len(vecs) - 1)
            boxes.append(comp.box)
            areas.append(comp.area_fraction)
            # diagnostic: can the pipeline see the object at all (best proposal IoU with the pasted box)
            hits.append(max((iou(b, comp.box) for b in inputs.proposals.boxes[1:]), default=0.0))
            bar.advance()
    arrays: dict[str, np.ndarray] = {"crops": np.concatenate(crops), "offsets": np.asarray(offsets, np.int64),
              "queries": np.stack(queries), "boxes": np.asarray(boxes, np.float32),
              "areas": np.asarray(areas, np.float32), "best_iou": np.asarray(hits, np.float32)}
    for name, arr in arrays.items():
        np.save(cache_dir / f"{split}-{name}.npy", arr)


def load_split(cache_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """One cached split: ``crops`` (sum N_i, D), ``offsets`` (n + 1), ``queries`` (n, D),
    ``boxes``, ``areas``, ``best_iou``."""
    cache_dir = Path(cache_dir)
    return {name: np.load(cache_dir / f"{split}-{name}.npy", mmap_mode="r")
            for name in ("crops", "offsets", "queries", "boxes", "areas", "best_iou")}


# --------------------------------------------------------------------------- adapter
class StageAAdapter(torch.nn.Module):
    """a(v) = normalize(relu(exp(s) * v + U V^T v)): identity at initialisation."""

    def __init__(self, dim: int, rank: int = 64):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.zeros(dim))
        self.down = torch.nn.Parameter(torch.randn(dim, rank) / np.sqrt(dim))
        self.up = torch.nn.Parameter(torch.zeros(rank, dim))  # zero: the residual starts at 0

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = v * self.log_scale.exp() + (v @ self.down) @ self.up
        return F.normalize(F.relu(out), dim=-1, eps=1e-8)

    def weights(self) -> dict[str, np.ndarray]:
        """The parameters as float32 numpy arrays (what :func:`apply_adapter` takes)."""
        return {"log_scale": self.log_scale.detach().numpy().astype(np.float32).copy(),
                "down": self.down.detach().numpy().astype(np.float32).copy(),
                "up": self.up.detach().numpy().astype(np.float32).copy()}


def apply_adapter(weights: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    """Numpy inference of :class:`StageAAdapter` on (N, D) or (D,) vectors (same result as the module)."""
    v = np.asarray(vectors, np.float32)
    out = v * np.exp(weights["log_scale"]) + (v @ weights["down"]) @ weights["up"]
    out = np.maximum(out, 0.0)
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    return (out / np.maximum(norm, 1e-8)).astype(np.float32)


def save_adapter(path: str | Path, weights: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Write adapter weights as safetensors (float32), ``meta`` as JSON in the header."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}, str(path),
              metadata={"stagea": json.dumps(meta or {})})


def load_adapter(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read weights written by :func:`save_adapter`; returns (weights, meta)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("stagea", "{}"))
    missing = {"log_scale", "down", "up"} - set(weights)
    if missing:
        raise ValueError(f"{path} is not a Stage A adapter: missing {sorted(missing)}")
    return weights, meta


# --------------------------------------------------------------------------- training
@dataclass
class StageAConfig:
    """Hyper-parameters of :func:`train_stagea`."""

    rank: int = 64
    pool_p: float = ObjectConfig.pool_p  # the index's fusion exponent (its default unless told)
    temperature: float = 0.05
    epochs: int = 30
    patience: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_crops: int = 25  # whole image + ObjectConfig.max_objects
    seed: int = 0
    select: str = "objects"  # validation MRR that picks the epoch: "objects" or "objects_max"


def padded(split: dict[str, np.ndarray], max_crops: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, max_crops, D) crop vectors, (n, max_crops) mask and (n, D) queries as float32 tensors."""
    offsets = np.asarray(split["offsets"])
    crops = np.asarray(split["crops"], np.float32)
    n, dim = len(offsets) - 1, crops.shape[1]
    x = np.zeros((n, max_crops, dim), np.float32)
    m = np.zeros((n, max_crops), np.float32)
    for i in range(n):
        c = crops[offsets[i]:min(offsets[i + 1], offsets[i] + max_crops)]
        x[i, :len(c)] = c
        m[i, :len(c)] = 1.0
    return torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(np.asarray(split["queries"], np.float32))


def fuse_torch(crops: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Masked generalised mean over crops (B, N, D) -> (B, D), L2-normalised (as objects.descriptor.fuse)."""
    x = crops.clamp(min=1e-8)
    # Scaled by each channel's largest crop value, so the mean under the root is at least 1/N: a channel that is
    # ~0 in every crop would otherwise underflow to 0 (1e-8 ** 8 in float32) and give the root an infinite
    # gradient (training went NaN at p = 8). Same value as the unscaled formula.
    top = (x * mask[..., None]).amax(1, keepdim=True).clamp(min=1e-8)
    powered = (x / top).pow(p) * mask[..., None]
    pooled = top[:, 0] * (powered.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).pow(1.0 / p)
    return F.normalize(pooled, dim=-1, eps=1e-8)


def true_ranks(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's own item (the diagonal of ``scores``, queries x items) among all items.

    A non-finite true score ranks last: a diverged model must never look perfect (with ``s > diagonal`` alone
    a NaN diagonal counts nothing above it, rank 0).
    """
    d = scores.diagonal()
    rank = (scores > d[:, None]).sum(1)
    return torch.where(torch.isfinite(d), rank, torch.full_like(rank, scores.shape[1] - 1)).double()


def reciprocal_ranks(model: StageAAdapter | None, crops: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor,
                     p: float) -> dict[str, np.ndarray]:
    """Every query against every composite (one relevant each): each query's reciprocal rank of its own
    composite by the fused descriptor (``objects``) and by the best crop (``objects_max``)."""
    with torch.no_grad():
        c = crops if model is None else model(crops) * mask[..., None]
        q = queries if model is None else model(queries)
        fused = q @ fuse_torch(c, mask, p).T
        best = torch.einsum("qd,nkd->qnk", q, c).masked_fill(mask[None] == 0, -2).amax(-1)
        return {name: (1.0 / (true_ranks(s) + 1)).numpy() for name, s in (("objects", fused), ("objects_max", best))}


def retrieval_metrics(model: StageAAdapter | None, crops: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor,
                      p: float) -> dict:
    """MRR and R@1 of the fused and max scores (:func:`reciprocal_ranks`)."""
    out = {}
    for name, rr in reciprocal_ranks(model, crops, mask, queries, p).items():
        out[f"{name}_mrr"] = float(rr.mean())
        out[f"{name}_r1"] = float((rr == 1.0).mean())
    return out


def train_stagea(cache: dict, config: StageAConfig | None = None, log=print) -> tuple[StageAAdapter, dict]:
    """Train the adapter on cached ``train`` composites, early stopping on ``val`` objects MRR.

    Returns the best adapter (epoch 0 = the identity counts as a candidate,
    so a run that never beats it returns the identity) and the history.
    """
    config = config or StageAConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    xtr, mtr, qtr = padded(cache["train"], config.max_crops)
    xva, mva, qva = padded(cache["val"], config.max_crops)
    model = StageAAdapter(xtr.shape[-1], config.rank)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    base = retrieval_metrics(None, xva, mva, qva, config.pool_p)
    history = [{"epoch": 0, "loss": float("nan"), **base}]
    if config.select not in ("objects", "objects_max"):
        raise ValueError(f"select must be 'objects' or 'objects_max', not {config.select!r}")
    metric = f"{config.select}_mrr"
    best, best_epoch = base[metric], 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(f"epoch  0 (identity) val objects MRR {base['objects_mrr']:.3f} R@1 {base['objects_r1']:.3f} "
        f"objects-max MRR {base['objects_max_mrr']:.3f}")
    n = len(xtr)
    steps = max(1, n // config.batch_size)
    for epoch in range(1, config.epochs + 1):
        model.train()
        perm = rng.permutation(n)
        losses = []
        for b in range(steps):
            idx = torch.from_numpy(perm[b * config.batch_size:(b + 1) * config.batch_size])
            loss = info_nce(model, xtr[idx], mtr[idx], qtr[idx], config.pool_p, config.temperature)
            if not torch.isfinite(loss):  # diverged: keep the best epoch so far rather than a broken adapter
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if len(losses) < steps:
            log(f"epoch {epoch:2d}: the loss is not finite; stopping with epoch {best_epoch}")
            history.append({"epoch": epoch, "loss": float("nan"), "diverged": True})
            break
        model.eval()
        metrics = retrieval_metrics(model, xva, mva, qva, config.pool_p)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **metrics})
        log(f"epoch {epoch:2d} loss {np.mean(losses):.3f} val objects MRR {metrics['objects_mrr']:.3f} "
            f"R@1 {metrics['objects_r1']:.3f} objects-max MRR {metrics['objects_max_mrr']:.3f}")
        if metrics[metric] > best:
            best, best_epoch = metrics[metric], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= config.patience:
            log(f"early stop: no val improvement for {config.patience} epochs")
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"config": asdict(config), "best_epoch": best_epoch, "history": history}


def info_nce(model: StageAAdapter, crops: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor, p: float,
             temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between adapted queries and the fused adapted descriptors of their composites."""
    desc = fuse_torch(model(crops) * mask[..., None], mask, p)
    q = model(queries)
    logits = q @ desc.T / temperature
    target = torch.arange(len(q))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
