"""Segment embedding pool vs crop: indexing speed and retrieval quality on the first 200 Flickr8k dev images.

Usage: python -m experiments.himir_pool_vs_crop   (writes indexes under ~/.cache/finegrain/cvp-*; prints one JSON line per embed mode)
"""
import sys, time, shutil, json, numpy as np
from pathlib import Path
from finegrain import Index
from finegrain.datasets import load_flickr8k
from finegrain.decompose.segments import SegmentConfig
from finegrain.decompose.query import decompose_query, RulesDecomposer
from finegrain.search import multivector as mv
from finegrain.eval.metrics import ndcg_at_k, recall_at_k
N = 200
ds = load_flickr8k('../shared/data/flickr8k', 'dev')
paths = ds.image_paths()[:N]
out = {}
for embed in ("pool", "crop"):
    d = Path.home() / ".cache" / "finegrain" / f"cvp-{embed}"
    if not (d / "finegrain.sqlite").exists():
        idx = Index.create(d, segments=SegmentConfig(embed=embed))
        t = time.perf_counter(); r = idx.add(paths); out[f"{embed}_images_per_s"] = r.indexed / (time.perf_counter() - t)
    idx = Index.open(d)
    id_of = {Path(r.path).name: r.id for r in idx.records.values()}
    sel = [c for c, i in enumerate(ds.caption_image) if i < N]
    Qs = [idx.encoder.encode_texts(decompose_query(ds.captions[c], RulesDecomposer())) for c in sel]
    tgt = [id_of[ds.images[ds.caption_image[c]]] for c in sel]
    for mode in ("global", "single", "exhaustive", "hierarchical"):
        ranks = []
        for q, g in zip(Qs, tgt):
            _, pos, _ = mv.search(mode, idx.segment_table, idx.global_rows.vectors, q, 10, mv.MultiVectorConfig())
            ids = idx.global_rows.owners[pos].tolist(); ranks.append(ids.index(g) if g in ids else np.inf)
        out[f"{embed}_{mode}_ndcg10"] = ndcg_at_k(ranks, 10); out[f"{embed}_{mode}_r1"] = 100 * recall_at_k(ranks, 1)
    print(json.dumps(out), flush=True)
