"""The text tower in float32 against bfloat16: dev retrieval quality and a query's encoding time.

Usage::

    python -m experiments.text_precision INDEX DATA [N_QUERIES]

INDEX: a segmented index holding the Flickr8k dev images (the 7,244-photo source of the scale runs).
Quality: every dev caption against the 1,000 dev images' global vectors from INDEX, text->image R@1/5/10,
with the captions embedded by two encoders in one process, one per precision. Time: N dev captions (seed 0)
through the query path (rule decomposition, 3-4 texts split over the scoring workers), the two precisions
interleaved query by query, back to back and right after an ``exhaustive`` scoring of every image of INDEX.
Produced "Query encoding in bfloat16" in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from finegrain import encoders
from finegrain.bench.scale import flickr8k_queries
from finegrain.datasets import load_flickr8k
from finegrain.decompose.query import create_decomposer, decompose_query
from finegrain.encoders import minilm
from finegrain.index import Index
from finegrain.retrieval import multivector as mvr
from finegrain.search import multivector as mv


def encoder_in(precision: str) -> encoders.Encoder:
    os.environ[minilm.PRECISION_ENV] = precision
    enc = encoders.create("effnet-minilm", cache=False)
    enc.encode_texts(["a warm-up"])  # the tower loads (and is cast) now, under this precision
    return enc


def recall(text_emb: np.ndarray, image_emb: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    ranks = np.argsort(-(text_emb @ image_emb.T), axis=1, kind="stable")
    first = np.argmax(ranks == truth[:, None], axis=1)
    return {f"R@{k}": round(float(np.mean(first < k)) * 100, 2) for k in (1, 5, 10)}


def main(argv: list[str]) -> None:
    path, data = argv[0], argv[1]
    n = int(argv[2]) if len(argv) > 2 else 50
    index = Index.open(path)
    snap = index.snapshot
    dev = load_flickr8k(data, "dev")
    by_name = {os.path.basename(r.path): r.id for r in snap.records.values()}
    ids = [by_name[name] for name in dev.images]
    image_emb = np.asarray(snap.global_rows.vectors[snap.positions(ids)], np.float32)
    encs = {p: encoder_in(p) for p in ("float32", "bfloat16")}
    out: dict = {"captions": len(dev.captions)}
    emb = {p: e.encode_texts(dev.captions, batch_size=64) for p, e in encs.items()}
    for p in encs:
        out[p] = recall(emb[p], image_emb, np.asarray(dev.caption_image))
    out["min_cosine"] = round(float((emb["float32"] * emb["bfloat16"]).sum(axis=1).min()), 5)
    print(json.dumps(out), flush=True)

    rules = create_decomposer("rules")
    texts = [decompose_query(t, rules) for t in flickr8k_queries(data, "dev", n, 0)]
    table, glob, cfg = mvr.segment_table(snap), snap.global_rows.vectors, mvr.MultiVectorParams().config()
    for after in ("back to back", "after an exhaustive scoring"):
        ms: dict[str, list[float]] = {p: [] for p in encs}
        for parts in texts:
            for p, e in encs.items():
                t0 = time.perf_counter()
                q = e.encode_texts(parts)
                ms[p].append((time.perf_counter() - t0) * 1000)
                if after != "back to back":
                    mv.search("exhaustive", table, glob, q, 10, cfg)
        print(json.dumps({"when": after, "queries": len(texts),
                          **{f"{p}_p50_ms": round(float(np.median(v)), 2) for p, v in ms.items()}}), flush=True)
    index.close()


if __name__ == "__main__":
    main(sys.argv[1:])
