"""Training recipe v2 of the bundled model (``effnet-minilm-v2``).

What changes from v1 (:mod:`finegrain.train.aligner`):

- **LiT's split**: the image tower is locked whole (ImageNet weights); MiniLM's
  top layers are trained, through LoRA or as a float16 delta
  (:func:`finegrain.encoders.effnet_minilm_v2.adapt_text_tower`).
- **Selection without leakage**: the last ``val_images`` images of the train
  split (split file order) are held out; the epoch is chosen on them. The dev
  split is evaluated once, at the end, with the chosen weights.
- **Augmentations** that suit a locked tower: cached random resized crops
  with flips (:mod:`finegrain.train.cache_v2`), phrase dropout (the tokens of
  one sub-query phrase removed before the trained layers).
- **Hard negatives**: VSE++'s max-violation hinge on the hardest in-batch
  negative, beside the symmetric InfoNCE.
- **Region term**: the product's multi-vector score (mean over the caption
  and its sub-queries of the best-matching region, pooled from the feature
  map with the same GeM and head that segments go through) trained with
  InfoNCE, so region vectors are aligned too. Training regions are grid boxes
  (2x2, 3x3, 4x4 cuts); evaluation uses the product's SLIC segments.

Frozen parts are cached (image maps, segments, MiniLM's lower layers);
MiniLM's trained layers run on packed tokens (no padding in the linear maps).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from ..datasets import load_flickr8k
from ..encoders.effnet_minilm_v2 import AlignerV2, adapt_text_tower, save_v2, text_tower_state
from ..encoders.minilm import MiniLM, load_minilm
from ..eval.metrics import recall_at_k
from .cache_v2 import TEXT_SPLIT, build_cache_v2
from .schedule import scheduled_step


@dataclass
class TrainConfigV2:
    """Hyper-parameters of :func:`train_aligner_v2`.

    Defaults: the shipped v2 recipe (run ``lora1`` of experiments/modelv2_ablation.py),
    except that it used the first 2,000 train images (``train_images=2000``).
    """

    dim: int = 512
    text_adapter: str = "lora"  # frozen | lora | delta
    text_layers: int = 1  # MiniLM's top layers trained (at most 6 - TEXT_SPLIT: the rest is cached)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    views: int = 0  # augmented views per train image (0: the image alone)
    phrase_dropout: float = 0.0  # probability of using the caption with one phrase removed
    hard_negative: float = 0.0  # weight of the max-violation hinge (0: off)
    margin: float = 0.2
    region: float = 0.0  # weight of the region (segments x phrases) InfoNCE (0: off)
    region_batch: int = 64  # pairs of the batch the region term looks at
    epochs: int = 10
    batch_size: int = 128
    lr_heads: float = 1e-3
    lr_text: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 30
    val_images: int = 500
    train_images: int = 0  # 0: every train image left after the validation slice (learning curves use fewer)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.text_layers <= 6 - TEXT_SPLIT:
            raise ValueError(f"text_layers must be 0..{6 - TEXT_SPLIT} (lower MiniLM layers are cached frozen)")
        if self.text_adapter not in ("frozen", "lora", "delta"):
            raise ValueError(f"text_adapter must be frozen, lora or delta, not {self.text_adapter!r}")


class Ragged:
    """Per-item rows of a flat array (tokens of texts, segments of images), loaded in memory."""

    def __init__(self, cache: Path, name: str):
        self.flat = torch.from_numpy(np.load(cache / f"{name}.npy"))
        self.offsets = np.load(cache / f"{name}-offsets.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self, items: np.ndarray, drop: np.ndarray | None = None) -> np.ndarray:
        n = self.offsets[items + 1] - self.offsets[items]
        return n if drop is None else n - (drop[:, 1] - drop[:, 0])

    def gather(self, items: np.ndarray, drop: np.ndarray | None = None) -> torch.Tensor:
        """Rows of ``items``, flat; ``drop[k] = (start, stop)`` leaves out rows start..stop-1 of item k."""
        rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in items]
        if drop is not None:
            rows = [np.delete(r, np.arange(a, b)) for r, (a, b) in zip(rows, drop)]
        return self.flat[torch.from_numpy(np.concatenate(rows))].float()


class TextTop(torch.nn.Module):
    """MiniLM's top layers over cached lower-layer states, on packed tokens (the linear maps see no padding)."""

    def __init__(self, model: MiniLM, start: int = TEXT_SPLIT):
        super().__init__()
        self.layers = torch.nn.ModuleList(list(model.layers)[start:])

    def forward(self, packed: torch.Tensor, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N tokens, 384) states of texts with ``lengths`` -> padded (B, T, 384) final states and mask."""
        b, t = len(lengths), int(lengths.max())
        mask = torch.from_numpy(np.arange(t)[None, :] < lengths[:, None])
        where = mask.reshape(-1).nonzero()[:, 0]
        keep = mask[:, None, None, :]
        x = packed
        layer: Any
        for layer in self.layers:
            heads, d = layer.heads, x.shape[1]

            def split(proj, x=x, heads=heads, d=d):
                out = x.new_zeros(b * t, d).index_copy(0, where, proj(x))
                return out.view(b, t, heads, d // heads).transpose(1, 2)

            att = F.scaled_dot_product_attention(split(layer.query), split(layer.key), split(layer.value),
                                                 attn_mask=keep)
            att = att.transpose(1, 2).reshape(b * t, d)[where]
            x = layer.attn_norm(x + layer.attn_out(att))
            x = layer.out_norm(x + layer.down(F.gelu(layer.up(x))))
        return x.new_zeros(b * t, x.shape[1]).index_copy(0, where, x).view(b, t, -1), mask.long()


def advance(cache: Path, name: str, model: MiniLM, start: int) -> Ragged:
    """Cached states of ``name`` moved up to MiniLM layer ``start`` by the frozen layers between (saved once)."""
    if start == TEXT_SPLIT:
        return Ragged(cache, name)
    states = advance(cache, name, model, start - 1)  # one layer at a time: each level is saved for other runs
    path = cache / f"{name}-L{start}.npy"
    if not path.exists():
        frozen = TextTop(model, start - 1)
        frozen.layers = frozen.layers[:1]
        out = torch.empty_like(states.flat)
        with torch.no_grad():
            for first in range(0, len(states), 512):
                items = np.arange(first, min(first + 512, len(states)))
                lengths = states.lengths(items)
                padded, mask = frozen(states.gather(items), lengths)
                out[states.offsets[first]:states.offsets[items[-1] + 1]] = padded[mask.bool()].half()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, out.numpy())
        tmp.replace(path)
    states.flat = torch.from_numpy(np.load(path))
    return states


def open_rows(cache: Path, name: str, config: TrainConfigV2) -> np.ndarray:
    """A cached view's maps (memory-mapped); one still being computed if the rows this run reads are written."""
    if (cache / f"{name}.npy").exists():
        return np.load(cache / f"{name}.npy", mmap_mode="r")
    progress = cache / f"{name}.progress"
    state = json.loads(progress.read_text()) if progress.exists() else {}
    if not state.get("tail_done") or state.get("head_rows", 0) < config.train_images or not config.train_images:
        raise FileNotFoundError(f"{name} is not cached (yet) for {config.train_images or 'all'} train images: {state}")
    return np.load(cache / f"{name}.tmp", mmap_mode="r")


class Data:
    """The cached arrays one run needs, and the train / validation / dev item lists."""

    def __init__(self, data: Path, cache: Path, config: TrainConfigV2, base: MiniLM):
        splits = {s: load_flickr8k(data, s) for s in ("train", "dev")}
        n_train = len(splits["train"].images)
        self.views = [open_rows(cache, f"train-v{v}", config) for v in range(1 + config.views)]
        self.dev_maps = np.load(cache / "dev-v0.npy", mmap_mode="r")
        start = 6 - config.text_layers  # states enter the trained layers here (frozen ones in between run once)
        self.cap = {s: advance(cache, f"{s}-cap", base, start) for s in ("train", "dev")}
        self.drop_span = np.load(cache / "train-drop-span.npy").astype(np.int64)
        self.parts = advance(cache, "train-part", base, start) if config.region > 0 else self.cap["train"]
        self.caption_parts = np.load(cache / "train-caption-parts.npy")
        train = np.asarray(splits["train"].caption_image)
        self.caption_image = {"train": train, "dev": np.asarray(splits["dev"].caption_image)}
        # Validation: the last val_images of the split file; training: the images before them.
        self.val_items = np.arange(n_train - config.val_images, n_train)
        limit = n_train - config.val_images
        if config.train_images > limit:
            raise ValueError(f"train_images must be at most {limit} (the rest validates)")
        self.train_items = np.arange(config.train_images or limit)
        self.captions_of = [np.flatnonzero(train == i) for i in range(n_train)]


def encode_texts(text_top: TextTop, aligner: AlignerV2, states: Ragged, items: np.ndarray,
                 drop: np.ndarray | None = None) -> torch.Tensor:
    tokens, mask = text_top(states.gather(items, drop), states.lengths(items, drop))
    return aligner.text_embed(tokens, mask)


def evaluate(text_top: TextTop, aligner: AlignerV2, maps, states: Ragged, caption_image: np.ndarray,
             images: np.ndarray) -> dict:
    """Global-mode recall: captions of ``images`` against those images (text->image R@1/5/10, image->text)."""
    text_top.eval()
    aligner.eval()
    position = {int(i): n for n, i in enumerate(images)}
    captions = np.flatnonzero(np.isin(caption_image, images))
    with torch.no_grad():
        img = torch.cat([aligner.image_embed(torch.from_numpy(np.asarray(maps[images[i:i + 200]], np.float32)))
                         for i in range(0, len(images), 200)])
        order = captions[np.argsort(states.lengths(captions), kind="stable")]  # batches of similar lengths
        txt = torch.cat([encode_texts(text_top, aligner, states, order[i:i + 500]) for i in range(0, len(order), 500)])
    target = np.array([position[int(caption_image[c])] for c in order])
    return recall_metrics(F.normalize(txt, dim=-1).numpy(), F.normalize(img, dim=-1).numpy(), target)


def recall_metrics(txt_n: np.ndarray, img_n: np.ndarray, target: np.ndarray) -> dict:
    """Text->image R@1/5/10 and image->text R@1/5/10 (an image's best-ranked caption) of unit vectors."""
    sims = txt_n @ img_n.T
    own = sims[np.arange(len(txt_n)), target]
    t2i = (sims > own[:, None]).sum(1)
    best = np.full(len(img_n), np.inf)
    rank_of_caption = (sims[:, target] > own[None, :]).sum(0)  # image->text: captions above caption c for its image
    for c, i in enumerate(target):
        best[i] = min(best[i], rank_of_caption[c])
    out = {f"t2i_r{k}": 100 * recall_at_k(t2i, k) for k in (1, 5, 10)}
    out.update({f"i2t_r{k}": 100 * recall_at_k(best, k) for k in (1, 5, 10)})
    return out


def region_scores(aligner: AlignerV2, maps: torch.Tensor, segments: list[torch.Tensor], queries: torch.Tensor,
                  query_caption: torch.Tensor, n_captions: int) -> torch.Tensor:
    """(captions, images) multi-vector segment score: mean over each caption's queries of its best segment."""
    seg = [F.normalize(aligner.image_head(aligner.image_pool.pool_regions(m, s.view(-1, *m.shape[1:]))), dim=-1)
           for m, s in zip(maps, segments)]
    width = max(len(s) for s in seg)
    padded = torch.stack([F.pad(s, (0, 0, 0, width - len(s))) for s in seg])  # (I, S, dim)
    valid = torch.stack([torch.arange(width) < len(s) for s in seg])  # (I, S)
    sims = torch.einsum("qd,isd->qis", F.normalize(queries, dim=-1), padded)
    best = sims.masked_fill(~valid[None], -2.0).amax(-1)  # (Q, I)
    total = torch.zeros(n_captions, best.shape[1]).index_add(0, query_caption, best)
    count = torch.zeros(n_captions).index_add(0, query_caption, torch.ones(len(query_caption)))
    return total / count[:, None]


def train_aligner_v2(data: str | Path, out: str | Path, cache_dir: str | Path, config: TrainConfigV2 | None = None,
                     show_progress: bool = True, log=print, evaluate_dev: bool = True,
                     cache_views: int | None = None, build: bool = True) -> dict:
    """Train v2 and write ``out`` (.safetensors) plus ``out.json`` (config, validation history, dev metrics).

    ``cache_views`` augmented views are cached per train image (default
    ``config.views``; one cache serves every run that uses at most that many). ``build=False`` uses the cache
    files already there (experiments running while another process fills it).
    """
    config = config or TrainConfigV2()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    t0 = time.time()
    cache_views = config.views if cache_views is None else cache_views
    if config.views > cache_views:
        raise ValueError(f"views ({config.views}) must be at most cache_views ({cache_views})")
    cache = build_cache_v2(data, cache_dir, cache_views, 0, show_progress, log) if build else Path(cache_dir)
    log(f"caches ready in {time.time() - t0:.0f}s")
    _, base = load_minilm()
    _, model = load_minilm()
    d = Data(Path(data), cache, config, base)
    text_params = adapt_text_tower(model, config.text_adapter, config.text_layers, config.lora_rank,
                                   config.lora_alpha)
    text_top = TextTop(model, 6 - config.text_layers)
    aligner = AlignerV2(config.dim)
    groups = [{"params": list(aligner.parameters()), "lr": config.lr_heads}]
    if text_params:
        groups.append({"params": text_params, "lr": config.lr_text})
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]

    items = d.train_items
    steps_per_epoch = max(1, len(items) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    best, best_state, best_epoch, step, history = -1.0, None, -1, 0, []
    for epoch in range(config.epochs):
        text_top.train()
        aligner.train()
        perm = rng.permutation(items)
        losses = []
        for b in range(steps_per_epoch):
            idx = np.sort(perm[b * config.batch_size:(b + 1) * config.batch_size])
            view = rng.integers(0, 1 + config.views, size=len(idx))
            feats = torch.from_numpy(np.stack([d.views[v][i] for v, i in zip(view, idx)]).astype(np.float32))
            cap = np.array([rng.choice(d.captions_of[i]) for i in idx])
            spans = d.drop_span[cap] * (rng.random(len(cap)) < config.phrase_dropout)[:, None]  # (0, 0): keep all
            txt = encode_texts(text_top, aligner, d.cap["train"], cap, spans)
            img_emb = F.normalize(aligner.image_embed(feats), dim=-1)
            txt_emb = F.normalize(txt, dim=-1)
            scale = aligner.logit_scale.exp().clamp(max=100)
            sims = img_emb @ txt_emb.T
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(scale * sims, target) + F.cross_entropy(scale * sims.T, target)) / 2
            if config.hard_negative > 0:
                pos = sims.diag()
                off = sims.masked_fill(torch.eye(len(idx), dtype=torch.bool), -2.0)
                hinge = (F.relu(config.margin - pos + off.amax(1)) + F.relu(config.margin - pos + off.amax(0))).mean()
                loss = loss + config.hard_negative * hinge
            if config.region > 0:
                loss = loss + config.region * _region_loss(d, text_top, aligner, idx, cap, txt, scale, config)
            losses.append(scheduled_step(opt, base_lrs, loss, step, config.warmup_steps, total_steps))
            step += 1
        metrics = evaluate(text_top, aligner, d.views[0], d.cap["train"], d.caption_image["train"], d.val_items)
        score = metrics["t2i_r1"] + metrics["t2i_r5"] + metrics["t2i_r10"]
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **{f"val_{k}": v for k, v in
                                                                                 metrics.items()}})
        log(f"epoch {epoch + 1:2d} loss {np.mean(losses):.3f} val t2i R@1/5/10 {metrics['t2i_r1']:.1f}/"
            f"{metrics['t2i_r5']:.1f}/{metrics['t2i_r10']:.1f} i2t R@1 {metrics['i2t_r1']:.1f} "
            f"temp {1 / aligner.logit_scale.exp().item():.4f} ({time.time() - t0:.0f}s)")
        if score > best:
            best, best_epoch = score, epoch + 1
            best_state = ({k: v.detach().clone() for k, v in aligner.state_dict().items()},
                          {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert best_state is not None  # the first epoch's score (>= 0) beats the initial -1
    aligner.load_state_dict(best_state[0])
    model.load_state_dict(best_state[1])
    result = {
        "model": "effnet-minilm-v2",
        "dim": config.dim,
        "text_attention": True,
        "recipe": asdict(config),
        "selection": f"epoch with the best t2i R@1+R@5+R@10 on the last {config.val_images} train images "
                     "(split file order); dev never seen in training or selection",
        "best_epoch": best_epoch,
        "val_metrics": evaluate(text_top, aligner, d.views[0], d.cap["train"], d.caption_image["train"],
                                d.val_items),
        "history": history,
    }
    if evaluate_dev:
        dev_images = np.arange(len(d.dev_maps))
        result["dev_metrics"] = evaluate(text_top, aligner, d.dev_maps, d.cap["dev"], d.caption_image["dev"],
                                         dev_images)
    result["train_seconds"] = round(time.time() - t0, 1)
    save_v2(out, aligner, text_tower_state(model, base, config.text_adapter), result)
    return result


def _region_loss(d: Data, text_top: TextTop, aligner: AlignerV2, idx: np.ndarray, cap: np.ndarray,
                 txt: torch.Tensor, scale: torch.Tensor, config: TrainConfigV2) -> torch.Tensor:
    """InfoNCE on the multi-vector segment score over the first ``region_batch`` pairs of the batch."""
    n = min(config.region_batch, len(idx))
    sub_img, sub_cap = idx[:n], cap[:n]
    maps = torch.from_numpy(np.asarray(d.views[0][sub_img], np.float32))  # sub_img is sorted
    regions = grid_regions(maps.shape[-1])
    segments = [regions] * n
    part_lists = [np.arange(d.caption_parts[c], d.caption_parts[c + 1]) for c in sub_cap]
    part_items = np.concatenate(part_lists) if part_lists else np.zeros(0, np.int64)
    queries, owner = [txt[:n]], [torch.arange(n)]
    if len(part_items):
        queries.append(encode_texts(text_top, aligner, d.parts, part_items))
        owner.append(torch.from_numpy(np.repeat(np.arange(n), [len(p) for p in part_lists])))
    scores = region_scores(aligner, maps, segments, torch.cat(queries), torch.cat(owner), n)  # (captions, images)
    target = torch.arange(n)
    return (F.cross_entropy(scale * scores, target) + F.cross_entropy(scale * scores.T, target)) / 2


def grid_regions(grid: int, splits: tuple[int, ...] = (2, 3, 4)) -> torch.Tensor:
    """Boxes of a ``grid`` x ``grid`` map cut into n x n parts for each n in ``splits``, as (R, grid*grid) masks.

    The region term trains on these instead of SLIC segments: SLIC on every
    train image would cost most of a tower forward each; the pooling and head
    they train are the ones segments go through.
    """
    masks = []
    for n in splits:
        edges = np.round(np.linspace(0, grid, n + 1)).astype(int)
        for r in range(n):
            for c in range(n):
                m = torch.zeros(grid, grid)
                m[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 1.0
                masks.append(m.reshape(-1))
    return torch.stack(masks)
