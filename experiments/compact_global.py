"""Quality cost of a quantised global field (``finegrain compress --field global --quantize Q``) on Flickr8k dev.

Opens an existing index (a *copy*: it is changed in place), and for each variant stores the global
field as float32 (``original``), float16 or int8 (int8 ranges fitted on that index's own global rows:
images only, no caption) with :meth:`finegrain.Index.compress`, then runs dev captions through the
product's global search (:func:`finegrain.retrieval.dense.search_vectors`: the FAISS scalar-quantizer
index over the stored codes, then the best ``rescore`` re-scored from the float32 originals) and,
with ``--modes ...,hierarchical``, through the multi-vector scoring whose global term reads the codes
(:func:`finegrain.compress.coded.global_vectors`). Reports text->image R@1/5/10, NDCG@10 and the
share of queries whose top 10 equals the original's. A ``+rescoreN`` suffix sets ``rescore`` (the
product's default is 100; ``+rescore0``: the codes alone). A ``pcaD+`` / ``ss2dD+`` prefix projects first
(``--field global --method M --dim D --quantize Q``: the projected rows quantised, re-scored from the
projected float32 rows; ``pca128`` alone: the projection in float32). Ends with the originals again.

Usage::

    cp -r /work/cache/scale-src-dev /tmp/cq-dev
    python -m experiments.compact_global --index /tmp/cq-dev --data ../shared/data/flickr8k \\
        --variants original,float16+rescore0,float16,int8+rescore0,int8,original
    python -m experiments.compact_global --index /tmp/cq-dev --data ../shared/data/flickr8k \
        --variants original,pca128,pca128+int8+rescore0,pca128+int8,pca64,pca64+int8+rescore0,pca64+int8
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

#: Projection parameters per method (SS2D: the input teacher, chosen for about a thousand images).
PARAMS: dict[str, dict] = {"ss2d": {"teacher": None}}


def _parse(name: str) -> tuple[str, int | None, str, int | None]:
    """``[pca128+]int8[+rescore0]`` -> (method, dim, quantize, rescore); ``original``: float32, no projection."""
    parts = name.split("+")
    rescore = next((int(p[len("rescore"):]) for p in parts if p.startswith("rescore")), None)
    parts = [p for p in parts if not p.startswith("rescore")]
    method, dim = "none", None
    if parts and parts[0].rstrip("0123456789") in ("pca", "aesvc", "ss2d"):
        method = parts[0].rstrip("0123456789")
        dim = int(parts[0][len(method):])
        parts = parts[1:]
    quantize = parts[0] if parts else "none"
    return method, dim, "none" if quantize == "original" else quantize, rescore


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
        method, dim, quantize, rescore = _parse(name)
        t0 = time.perf_counter()
        index.compress(None, None, field="global", quantize="none")  # from the float32 originals each time
        index.compress("none")
        if method == "none":
            info = index.compress(None, None, field="global", quantize=quantize)
        elif quantize == "none":  # the projection alone (float32 projected rows)
            info = index.compress(method, dim, **PARAMS.get(method, {}))
        else:  # the projection, its rows quantised (`--field global --method M --dim D --quantize Q`)
            info = index.compress(method, dim, field="global", quantize=quantize, **PARAMS.get(method, {}))
        snap = index.snapshot
        row: dict = {"variant": name, "projection": f"{method}{dim}" if dim else "none", "quantize": quantize,
                     "rescore": "default (100)" if rescore is None else rescore,
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
            if method != "none":  # against the same projection in float32 (the first such variant run)
                same = first.setdefault(f"{mode}:{method}{dim}", tops)
                row[mode]["same_top10_as_float32_projection"] = round(float((tops == same).all(axis=1).mean()), 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)  # loaded shared machine: not a timing result
        print(json.dumps(row), flush=True)
    index.compress(None, None, field="global", quantize="none")  # leave the copy as it came
    index.compress("none")
    index.close()


if __name__ == "__main__":
    main()
