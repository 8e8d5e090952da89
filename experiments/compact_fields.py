"""Quality cost of compact segment storage (``finegrain compress --field segments``) on Flickr8k dev.

Opens an existing segmented index (a *copy*: it is compressed in place), and for each variant stores
the ``segments`` field compact with :meth:`finegrain.Index.compress` (projection fitted on that
index's own segment rows: images only, no caption), then runs every dev caption (5,000) through
the product's multi-vector scoring (``Index.segment_table`` + :func:`finegrain.search.multivector.search`,
the path ``Index.search`` takes, with the index's saved search settings) and reports text->image
R@1/5/10 and NDCG@10 per mode, and the field's stored bytes per image. Query texts (captions and
their rule-based sub-queries) are encoded once and cached. Ends with ``--method none --quantize none``
(the originals); an ``original`` variant after others checks that undo reproduces the first one's rankings.

Usage::

    cp -r /work/cache/scale-src-dev /tmp/compact-dev
    python -m experiments.compact_fields --index /tmp/compact-dev --data ../shared/data/flickr8k \\
        --variants original,float16,int8,pca64+int8,pca64+int8+rescore100 --per-image 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from finegrain import Index
from finegrain.compress import storage
from finegrain.datasets import load_flickr8k
from finegrain.decompose.query import create_decomposer, decompose_query
from finegrain.eval.metrics import ndcg_at_k, recall_at_k
from finegrain.retrieval.multivector import MultiVectorRetriever
from finegrain.retrieval.multivector import rescore as rescore_positions
from finegrain.search import multivector as mv

#: variant name -> (method, dim, quantize); a ``+rescoreN`` suffix re-scores the best N from the originals
VARIANTS = {
    "original": ("none", None, "none"),
    "float16": ("none", None, "float16"),
    "int8": ("none", None, "int8"),
    "pca64": ("pca", 64, "none"),
    "pca128": ("pca", 128, "none"),
    "ss2d64": ("ss2d", 64, "none"),
    "ss2d128": ("ss2d", 128, "none"),
    "pca64+int8": ("pca", 64, "int8"),
    "pca128+int8": ("pca", 128, "int8"),
    "ss2d64+int8": ("ss2d", 64, "int8"),
    "pca64+float16": ("pca", 64, "float16"),
}


def query_matrices(index: Index, captions: list[str], cache: Path) -> list[np.ndarray]:
    """Per caption: (1 + N, dim) embeddings of the caption and its rule-based sub-queries (cached)."""
    decomposer = create_decomposer("rules")
    parts = [decompose_query(c, decomposer) for c in captions]
    texts = sorted({t for p in parts for t in p})
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        if list(data["texts"]) == texts:
            emb = data["emb"]
        else:
            emb = None
    else:
        emb = None
    if emb is None:
        emb = index.encoder.encode_texts(texts, batch_size=256)
        np.savez(cache, texts=np.array(texts), emb=emb)
    row = {t: i for i, t in enumerate(texts)}
    return [emb[[row[t] for t in p]] for p in parts]


def dev_captions(index: Index, data: Path, per_image: int) -> tuple[list[str], np.ndarray]:
    """Flickr8k dev captions (the first ``per_image`` of each image; 0: all) and each one's image id in ``index``."""
    ds = load_flickr8k(data, "dev")
    id_of = {Path(rec.path).name: rec.id for rec in index.snapshot.records.values()}
    paths = ds.image_paths()
    targets = np.asarray([id_of[paths[i].name] for i in ds.caption_image])
    captions = list(ds.captions)
    if per_image:
        seen: dict[int, int] = {}
        keep = []
        for i, img in enumerate(ds.caption_image):
            seen[img] = seen.get(img, 0) + 1
            if seen[img] <= per_image:
                keep.append(i)
        captions, targets = [captions[i] for i in keep], targets[keep]
    return captions, targets


def evaluate(index: Index, queries: list[np.ndarray], targets: np.ndarray, mode: str,
             rescore: int = 0) -> tuple[dict, np.ndarray]:
    snap = index.snapshot
    cfg = MultiVectorRetriever().params(snap, mode, {}).config()  # type: ignore[attr-defined]
    table, glob = index.segment_table, snap.global_rows.vectors
    ranks, tops = [], []
    for q, target in zip(queries, targets):
        _, pos, _ = mv.search(mode, table, glob, q, max(10, rescore), cfg)
        if rescore:  # what `search --rescore N` does (retrieval.multivector.rescore)
            again = rescore_positions(snap, mode, q, pos, 10, cfg)
            assert again is not None
            pos = again[1]
        ids = snap.ids[pos].tolist()
        tops.append(ids + [-1] * (10 - len(ids)))
        ranks.append(ids.index(target) if target in ids else np.inf)
    r = np.asarray(ranks, np.float64)
    return ({"ndcg10": round(ndcg_at_k(r, 10), 4), **{f"r{k}": round(100 * recall_at_k(r, k), 2) for k in (1, 5, 10)}},
            np.asarray(tops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="a COPY of a segmented dev index (modified)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="hierarchical,exhaustive")
    parser.add_argument("--per-image", type=int, default=0, help="the first N captions of each image (0: all 5)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/compact-fields-queries.npz"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    index = Index.open(args.index)
    captions, targets = dev_captions(index, args.data, args.per_image)
    queries = query_matrices(index, captions, args.cache)
    modes = args.modes.split(",")
    first_tops: dict[str, np.ndarray] = {}
    previous = None
    for name in args.variants.split(","):
        base, _, extra = name.partition("+rescore")
        method, dim, quantize = VARIANTS[base]
        t0 = time.perf_counter()
        if base != previous:  # a +rescore variant right after its base reuses the stored rows
            info = index.compress(method, dim, field="segments", quantize=quantize)
            index.refresh()
        previous = base
        stored = storage.compact_name("segments") if info else "segments"
        row = {"variant": name, "method": method, "dim": dim or 512, "quantize": quantize,
               "bytes_per_image": index.info()["vector_bytes_per_image"][stored],
               "fitted_on_rows": info.get("fitted_on"), "teacher": info.get("teacher")}
        for mode in modes:
            row[mode], tops = evaluate(index, queries, targets, mode, int(extra or 0))
            first_tops.setdefault(mode, tops)
            if name == "original":
                row[mode]["same_top10_as_first"] = bool(np.array_equal(tops, first_tops[mode]))
        row["seconds"] = round(time.perf_counter() - t0, 1)  # loaded shared machine: not a timing result
        print(json.dumps(row), flush=True)
    index.compress("none", field="segments", quantize="none")  # leave the copy as it came
    index.close()


if __name__ == "__main__":
    main()
