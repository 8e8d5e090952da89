"""Peer comparison: finegrain's multi-vector modes against LanceDB and Qdrant on the same segment vectors.

Every system gets the same vectors from one segmented finegrain index (per
image: the global vector plus every segment of every level) and the same
pre-encoded queries (the full caption and its rule-based sub-queries), so the
comparison measures search alone, not text encoding:

- ``lancedb``: an embedded LanceDB table with one multivector column
  (``List<FixedSizeList<float32, dim>>``), searched with the multi-vector
  query; LanceDB scores it by MaxSim (sum over query vectors of the best
  cosine over the image's vectors), exact (no ANN index: with about 90
  vectors per image an IVF-PQ index would trade recall for speed).
- ``qdrant``: ``qdrant-client`` local mode (in-process, on disk) with a
  named multivector field, ``MultiVectorComparator.MAX_SIM``, cosine.
- ``finegrain exhaustive`` / ``hierarchical``: :func:`finegrain.search.multivector.search`
  with the index's saved settings (``finegrain tune`` writes them).

The peers score by plain MaxSim, their native multivector scoring; finegrain
scores by its own combination (global weight plus mean of per-query maxima).
Both quality (NDCG@10, R@1/10) and latency are reported per system.

Usage::

    python -m experiments.peers_multivector --index ~/.cache/finegrain/bench/flickr8k-dev-effnet-minilm-seg-pool-4_9_16_25_36-320 \
        --data ../shared/data/flickr8k --queries 500 --json

The index is the one ``finegrain bench flickr8k --mode exhaustive`` builds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from finegrain import Index
from finegrain.datasets import load_flickr8k
from finegrain.decompose.query import RulesDecomposer, decompose_query
from finegrain.eval.metrics import ndcg_at_k, recall_at_k
from finegrain.search import multivector as mv


def image_multivectors(index: Index) -> list[np.ndarray]:
    """Per image (global field order): its global vector followed by all its segment vectors."""
    table = index.segment_table
    out = []
    for pos, g in enumerate(index.global_rows.vectors):
        parts = [g[None, :]]
        for level in range(table.n_levels):
            parts.append(table.image_rows(level, pos))
        out.append(np.ascontiguousarray(np.concatenate(parts), dtype=np.float32))
    return out


class LanceDBPeer:
    name = "lancedb (MaxSim, exact)"

    def __init__(self, docs: list[np.ndarray], workdir: Path):
        import lancedb
        import pyarrow as pa

        dim = docs[0].shape[1]
        flat = pa.array(np.concatenate(docs).ravel(), pa.float32())
        vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(d) for d in docs])]), pa.int32())
        column = pa.ListArray.from_arrays(offsets, vectors)
        table = pa.table({"pos": pa.array(np.arange(len(docs)), pa.int64()), "vectors": column})
        t0 = time.perf_counter()
        self.table = lancedb.connect(str(workdir / "lancedb")).create_table("images", table)
        self.build_s = time.perf_counter() - t0

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        hits = (self.table.search(queries, vector_column_name="vectors").distance_type("cosine")
                .limit(k).select(["pos"]).to_arrow())
        return np.asarray(hits["pos"].to_numpy())


class QdrantPeer:
    name = "qdrant local (MaxSim)"

    def __init__(self, docs: list[np.ndarray], workdir: Path):
        from qdrant_client import QdrantClient, models

        dim = docs[0].shape[1]
        t0 = time.perf_counter()
        self.client = QdrantClient(path=str(workdir / "qdrant"))
        self.client.create_collection("images", vectors_config={"v": models.VectorParams(
            size=dim, distance=models.Distance.COSINE,
            multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))})
        for start in range(0, len(docs), 256):
            self.client.upsert("images", [models.PointStruct(id=i, vector={"v": docs[i].tolist()})
                                          for i in range(start, min(start + 256, len(docs)))])
        self.build_s = time.perf_counter() - t0

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        res = self.client.query_points("images", query=queries.tolist(), using="v", limit=k)
        return np.array([p.id for p in res.points])


class FinegrainMode:
    def __init__(self, index: Index, mode: str):
        self.name = f"finegrain {mode}"
        self.mode, self.table, self.glob = mode, index.segment_table, index.global_rows.vectors
        self.config = mv.MultiVectorConfig.from_dict(index.search_config_dict().get("multivector", {}))
        self.build_s = 0.0
        self.ops: list[int] = []

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        _, pos, stats = mv.search(self.mode, self.table, self.glob, queries, k, self.config)
        self.ops.append(stats.sim_ops)
        return pos


def evaluate(system, queries: list[np.ndarray], targets: np.ndarray, k: int = 10) -> dict:
    """Quality and per-query latency (search only; queries are already embedded)."""
    system.search(queries[0], k)  # warm-up (first-call allocations, caches)
    ranks, times = [], []
    for q, target in zip(queries, targets):
        t0 = time.perf_counter()
        found = system.search(q, k)
        times.append((time.perf_counter() - t0) * 1000)
        hit = np.flatnonzero(found == target)
        ranks.append(float(hit[0]) if len(hit) else np.inf)
    ranks = np.asarray(ranks)
    row = {"system": system.name, "ndcg10": round(ndcg_at_k(ranks, 10), 4),
           "r1": round(100 * recall_at_k(ranks, 1), 1), "r10": round(100 * recall_at_k(ranks, 10), 1),
           "ms_p50": round(float(np.percentile(times, 50)), 3), "ms_mean": round(float(np.mean(times)), 3),
           "ms_p95": round(float(np.percentile(times, 95)), 3), "build_s": round(system.build_s, 1)}
    if getattr(system, "ops", None):
        row["sim_ops_per_query"] = round(float(np.mean(system.ops[1:])))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True, help="a segmented finegrain index of the split's images")
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--queries", type=int, default=500, help="first N captions of the split (0: all)")
    ap.add_argument("--systems", default="finegrain,lancedb,qdrant")
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args()

    index = Index.open(args.index)
    ds = load_flickr8k(args.data, args.split)
    n = args.queries or len(ds.captions)
    pos_of_path = {index.records[int(i)].path: p for p, i in enumerate(index.global_rows.owners)}
    paths = ds.image_paths()
    targets = np.array([pos_of_path[str(paths[i].resolve())] for i in ds.caption_image[:n]])
    decomposer = RulesDecomposer()
    queries = [index.encoder.encode_texts(decompose_query(c, decomposer)) for c in ds.captions[:n]]
    docs = image_multivectors(index)
    print(f"{len(docs)} images, {sum(map(len, docs))} vectors ({np.mean([len(d) for d in docs]):.1f} per image), "
          f"{n} queries ({np.mean([len(q) for q in queries]):.2f} vectors per query)", flush=True)

    wanted = args.systems.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        systems = []
        if "finegrain" in wanted:
            systems += [FinegrainMode(index, "exhaustive"), FinegrainMode(index, "hierarchical")]
        if "lancedb" in wanted:
            systems.append(LanceDBPeer(docs, Path(tmp)))
        if "qdrant" in wanted:
            systems.append(QdrantPeer(docs, Path(tmp)))
        for system in systems:
            rows.append(evaluate(system, queries, targets))
            r = rows[-1]
            print(f"{r['system']:28s} NDCG@10 {r['ndcg10']:.4f}  R@1 {r['r1']:5.1f}  R@10 {r['r10']:5.1f}  "
                  f"p50 {r['ms_p50']:8.2f} ms  mean {r['ms_mean']:8.2f} ms  p95 {r['ms_p95']:8.2f} ms  "
                  f"build {r['build_s']:.1f} s" + (f"  ops {r['sim_ops_per_query']}" if "sim_ops_per_query" in r else ""),
                  flush=True)
    fg = [r for r in rows if r["system"].startswith("finegrain")]
    peers = [r for r in rows if not r["system"].startswith("finegrain")]
    summary = {"images": len(docs), "queries": n, "config": FinegrainMode(index, "hierarchical").config.to_dict(), "results": rows}
    if fg and peers:
        fastest_peer = min(peers, key=lambda r: r["ms_p50"])
        for r in fg:
            r["speedup_vs_fastest_peer_p50"] = round(fastest_peer["ms_p50"] / r["ms_p50"], 1)
            r["ndcg_minus_best_peer"] = round(r["ndcg10"] - max(p["ndcg10"] for p in peers), 4)
            print(f"{r['system']}: {r['speedup_vs_fastest_peer_p50']}x faster (p50) than {fastest_peer['system']}, "
                  f"NDCG@10 {r['ndcg_minus_best_peer']:+.4f} vs the best peer")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
