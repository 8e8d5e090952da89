"""Quality cost of a quantised global field (``finegrain compress --field global --quantize Q``) on Flickr8k dev.

Opens an existing index (a *copy*: it is changed in place), and for each variant stores the global
field as float32 (``original``), float16 or int8 (int8 ranges fitted on that index's own global rows:
images only, no caption) with :meth:`finegrain.Index.compress`, then runs dev captions through the
product's global search (:func:`finegrain.retrieval.dense.search_vectors`: the FAISS scalar-quantizer
index over the stored codes, then the best ``rescore`` re-scored from the float32 originals) and,
with ``--modes ...,hierarchical``, through the multi-vector scoring whose global term reads the codes
(:func:`finegrain.compress.coded.global_vectors`). Reports text->image R@1/5/10, NDCG@10 and the
share of queries whose top 10 equals the original's. A ``+rescoreN`` suffix sets ``rescore`` (the
product's default is 100; ``+rescore0``: the codes alone). Ends with ``--field global --quantize none``.

Usage::

    cp -r /work/cache/scale-src-dev /tmp/cq-dev
    python -m experiments.compact_global --index /tmp/cq-dev --data ../shared/data/flickr8k \\
        --variants original,float16+rescore0,float16,int8+rescore0,int8,original
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from finegrain import Index
from finegrain.compress.coded import global_vectors
from finegrain.eval.metrics import ndcg_at_k, recall_at_k
from finegrain.retrieval.dense import search_vectors
from finegrain.retrieval.multivector import MultiVectorRetriever
from finegrain.search import multivector as mv

from .compact_fields import dev_captions, query_matrices


def _metrics(ranks: list[float]) -> dict:
    r = np.asarray(ranks, np.float64)
    return {"ndcg10": round(ndcg_at_k(r, 10), 4), **{f"r{k}": round(100 * recall_at_k(r, k), 2) for k in (1, 5, 10)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="a COPY of a dev index (modified)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--variants", default="original,float16+rescore0,float16,int8+rescore0,int8,original")
    parser.add_argument("--modes", default="global", help="global and/or hierarchical, exhaustive")
    parser.add_argument("--per-image", type=int, default=0, help="the first N captions of each image (0: all 5)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/compact-global-queries.npz"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    index = Index.open(args.index)
    captions, targets = dev_captions(index, args.data, args.per_image)
    queries = query_matrices(index, captions, args.cache)  # (1 + sub-queries, dim) per caption, full query first
    full = np.stack([q[0] for q in queries])
    first: dict[str, np.ndarray] = {}
    for name in args.variants.split(","):
        quantize, _, extra = name.partition("+rescore")
        quantize = "none" if quantize == "original" else quantize
        rescore = int(extra) if extra else None
        t0 = time.perf_counter()
        info = index.compress(None, None, field="global", quantize=quantize)
        snap = index.snapshot
        row: dict = {"variant": name, "quantize": quantize, "rescore": "default (100)" if rescore is None else rescore,
                     "bytes_per_image": index.info()["bytes_per_image"], "fitted_on_rows": info.get("fitted_on")}
        for mode in args.modes.split(","):
            tops = np.full((len(queries), 10), -1, np.int64)
            if mode == "global":
                _, ids = search_vectors(snap, full, 10, rescore=rescore)
                tops[:, :ids.shape[1]] = ids
            else:
                cfg = MultiVectorRetriever().params(snap, mode, {}).config()  # type: ignore[attr-defined]
                table, glob = index.segment_table, global_vectors(snap)
                for r, q in enumerate(queries):
                    _, pos, _ = mv.search(mode, table, glob, q, 10, cfg)
                    tops[r, :len(pos)] = snap.ids[pos]
            ranks = [float(np.flatnonzero(t == target)[0]) if target in t else np.inf
                     for t, target in zip(tops, targets)]
            row[mode] = _metrics(ranks)
            base = first.setdefault(mode, tops)
            row[mode]["same_top10_as_original"] = round(float((tops == base).all(axis=1).mean()), 4)
            overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(tops, base)]
            row[mode]["top10_overlap"] = round(float(np.mean(overlap)), 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)  # loaded shared machine: not a timing result
        print(json.dumps(row), flush=True)
    index.compress(None, None, field="global", quantize="none")  # leave the copy as it came
    index.close()


if __name__ == "__main__":
    main()
