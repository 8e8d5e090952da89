"""Flickr8k dev through the product encoders: ``global`` and ``exhaustive`` text->image recall, image->text R@1.

Every encoder named on the command line (``effnet-minilm``,
``effnet-minilm-v2``, ``effnet-minilm-v2:PATH``) is scored the same way,
through its public API: ``feature_maps`` of each dev image at ``--size``
(224: the global field's input), the global vector pooled from the map and
projected (equal to ``encode_images``), SLIC segments of the product's
default config pooled from the same map and projected (``encode_regions``'s
computation), captions and their rule-based sub-queries through
``encode_texts``. ``exhaustive`` is the product's formula (w = 0.5; mean over
the caption and its sub-queries of the best segment at any level). The
product indexes segments from a 320 px map; ``--size 224`` reuses the
global map (one forward per image), which is what this machine's CPU budget
allowed: say which in any table.

    python -m experiments.modelv2_dev_modes --data ../shared/data/flickr8k --json effnet-minilm effnet-minilm-v2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from experiments.modelv2_ablation import multivector_recall
from finegrain import encoders
from finegrain.datasets import load_flickr8k
from finegrain.decompose.query import RulesDecomposer
from finegrain.decompose.segments import SegmentConfig, segment_image
from finegrain.images import load_image
from finegrain.train.aligner_v2 import recall_metrics


def evaluate(name: str, data: Path, size: int, limit: int | None) -> dict:
    t0 = time.time()
    enc = encoders.create(name, cache=False)
    ds = load_flickr8k(data, "dev")
    paths = ds.image_paths()[:limit]
    caption_image = np.asarray(ds.caption_image)
    captions = np.flatnonzero(caption_image < len(paths))
    config = SegmentConfig()
    img, seg, owner = [], [], []
    with torch.inference_mode():
        for at in range(0, len(paths), 32):
            batch = paths[at:at + 32]
            pictures = [load_image(p) for p in batch]
            pixels = torch.from_numpy(np.stack([enc.prepare_image(p, size) for p in pictures]))
            fmaps = enc.feature_map_batch(pixels)
            whole = torch.ones(1, *fmaps.shape[2:])  # pooling the whole map is the global embedding
            img.append(enc.project(np.stack([enc.pool_regions(f, whole)[0].float().numpy() for f in fmaps])))
            for n, picture in enumerate(pictures):
                masks = torch.from_numpy(segment_image(picture, config).masks.astype(np.float32))[:, None]
                grid = F.adaptive_avg_pool2d(masks, fmaps.shape[-2:])[:, 0]
                pooled = enc.pool_regions(fmaps[n], grid)
                seg.append(enc.project(pooled.float().numpy()))
                owner.append(np.full(len(grid), at + n))
    image_seconds = time.time() - t0
    img_v = np.concatenate(img)
    decomposer = RulesDecomposer()
    texts = [ds.captions[c] for c in captions]
    parts = [decomposer.decompose(t) for t in texts]
    cap_emb = enc.encode_texts(texts, batch_size=256)
    flat = [p for ps in parts for p in ps]
    part_emb = enc.encode_texts(flat, batch_size=256) if flat else np.zeros((0, enc.dim), np.float32)
    queries, query_caption, at = [], [], 0
    for c, ps in enumerate(parts):
        queries += [cap_emb[c:c + 1], part_emb[at:at + len(ps)]]
        query_caption += [c] * (1 + len(ps))
        at += len(ps)
    target = caption_image[captions]
    out = {"encoder": name, "images": len(paths), "captions": len(captions), "segment_size": size,
           **{f"global_{k}": v for k, v in recall_metrics(cap_emb, img_v, target).items()},
           **multivector_recall(img_v, np.concatenate(seg), np.concatenate(owner), np.concatenate(queries),
                                np.asarray(query_caption), target),
           "image_seconds": round(image_seconds, 1), "seconds": round(time.time() - t0, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--size", type=int, default=224, help="input side of the map segments are pooled from")
    parser.add_argument("--limit", type=int, default=None, help="first N dev images only (a smoke run)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("encoders", nargs="+")
    args = parser.parse_args()
    for name in args.encoders:
        result = evaluate(name, args.data, args.size, args.limit)
        print(json.dumps(result) if args.json else result, flush=True)


if __name__ == "__main__":
    main()
