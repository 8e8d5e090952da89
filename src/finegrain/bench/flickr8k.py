"""Flickr8k benchmark: every caption of a split as a text query (and every image against all captions).

Reported: text->image R@1/5/10 and NDCG@10, image->text R@1/5/10, indexing
throughput (with the bare image-tower forward throughput beside it, to show
what decoding and storing add), and per-query latency (text encoding plus
search, one query at a time, as a user would send them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..datasets import load_flickr8k
from ..decompose.segments import SegmentConfig
from ..eval.metrics import ndcg_at_k, recall_at_k
from ..index import Index
from ..report import ReportData, single_relevant_pr
from .common import bench_index, flickr8k_index_name

TOWER_SAMPLE = 128


def tower_throughput(index: Index, images: list[Path], batch_size: int = 32) -> float:
    """Images/s of the bare image tower on already decoded and resized pixels."""
    enc = index.encoder
    pixels = np.stack([enc.preprocess(p) for p in images[:TOWER_SAMPLE]])
    enc.encode_pixels(pixels[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        enc.encode_pixels(pixels[start:start + batch_size])
    return len(pixels) / (time.perf_counter() - t0)


def run_flickr8k(data: str | Path, split: str = "dev", mode: str = "global", encoder: str = "effnet-minilm",
                 cache_dir: str | Path | None = None, show_progress: bool = True,
                 segments: SegmentConfig | None = None, report: ReportData | None = None,
                 index_path: str | Path | None = None, **search_options) -> dict:
    """Run the benchmark and return the metrics dict (recalls in percent, ndcg10 in [0, 1]).

    ``report``, when given, receives per-query latencies, ranks and
    precision-recall curves for :func:`finegrain.report.write_report`.

    Multi-vector modes (``single``, ``exhaustive``, ``hierarchical``) use an
    index with segments (``segments``, default :class:`SegmentConfig()`);
    ``search_options`` override the index's multi-vector settings.

    ``index_path``: search this existing index instead of building one of the split's images. It must hold
    every image of the split (matched by path); its other images are distractors (the distractor-heavy
    version of the numbers), and the index's own fields decide which modes work.
    """
    ds = load_flickr8k(data, split)
    paths = ds.image_paths()
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "finegrain" / "bench")
    if mode != "global":
        segments = segments or SegmentConfig()
    if index_path is None:
        name = flickr8k_index_name(split, encoder, segments)
        index, index_stats = bench_index(paths, encoder, cache_dir / name, show_progress, segments)
    else:
        index, index_stats = Index.open(index_path), {}
        encoder = index.snapshot.settings["encoder"]
    id_of_path = {rec.path: rec.id for rec in index.records.values()}
    image_ids = np.array([id_of_path.get(str(p.resolve()), id_of_path.get(str(p.absolute()), -1)) for p in paths])
    if (image_ids < 0).any():
        missing = int((image_ids < 0).sum())
        if index_path is not None:
            raise ValueError(f"{missing} images of the {split} split are not in the index at {index_path}")
        raise ValueError(f"{missing} images of the split could not be indexed")
    target = image_ids[np.asarray(ds.caption_image)]

    # Text -> image, one query at a time (latency includes text encoding). Every
    # reported metric looks at the top 10 only, so that is what is retrieved.
    latencies, t2i_ranks, sim_ops, levels = [], [], [], []
    index.search(text="warm up", k=10, mode=mode, **search_options)
    for caption, true_id in zip(ds.captions, target):
        t0 = time.perf_counter()
        hits = index.search(text=caption, k=10, mode=mode, **search_options)
        latencies.append((time.perf_counter() - t0) * 1000)
        sim_ops.append(hits.stats.sim_ops)
        levels.append(hits.stats.levels_visited)
        ranked = [h.id for h in hits]
        t2i_ranks.append(ranked.index(true_id) if true_id in ranked else np.inf)
    t2i_rank = np.asarray(t2i_ranks, dtype=np.float64)

    # Image -> text: each indexed image against all captions of the split.
    text_emb = index.encoder.encode_texts(ds.captions, batch_size=256)
    rows = {int(i): r for r, i in enumerate(index.global_rows.owners)}
    img_emb = index.global_rows.vectors[[rows[int(i)] for i in image_ids]]
    sims = img_emb @ text_emb.T
    caption_image = np.asarray(ds.caption_image)
    i2t_rank = np.full(len(paths), np.inf)
    for c, img in enumerate(caption_image):
        i2t_rank[img] = min(i2t_rank[img], float((sims[img] > sims[img, c]).sum()))

    if report is not None:
        report.latencies_ms.extend(latencies)
        report.first_relevant_ranks.update({"text->image": t2i_rank, "image->text": i2t_rank})
        report.pr_curves["text->image (top 10 retrieved)"] = single_relevant_pr(t2i_rank, 10)

    result = {
        "split": split,
        "mode": mode,
        "encoder": encoder,
        "images": len(paths),
        "distractors": len(index) - len(paths),
        "queries": len(ds.captions),
        **{f"t2i_r{k}": 100 * recall_at_k(t2i_rank, k) for k in (1, 5, 10)},
        **{f"i2t_r{k}": 100 * recall_at_k(i2t_rank, k) for k in (1, 5, 10)},
        "ndcg10": ndcg_at_k(t2i_rank, 10),
        **index_stats,
        "query_ms_p50": float(np.percentile(latencies, 50)),
        "query_ms_p95": float(np.percentile(latencies, 95)),
        "sim_ops_per_query": float(np.mean(sim_ops)),
        "levels_visited_mean": float(np.mean(levels)),
    }
    if index_path is None:  # the tower's own speed against the bench index's build
        result["tower_images_per_s"] = tower_throughput(index, paths)
        result["index_vs_tower_time_ratio"] = result["tower_images_per_s"] / max(result["index_images_per_s"], 1e-9)
    return result


def main() -> None:  # python -m finegrain.bench.flickr8k DATA [SPLIT]
    import sys

    print(json.dumps(run_flickr8k(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "dev")))


if __name__ == "__main__":
    main()
