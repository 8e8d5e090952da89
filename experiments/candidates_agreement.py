"""Top-10 agreement of the multi-vector modes with and without the candidate stage, on a real index.

Produced the "Candidate stage on real vectors" table of docs/benchmarks.md ("Scale"):

    python -m experiments.candidates_agreement INDEX ../shared/data/flickr8k [N_QUERIES]

INDEX: an index with segments (e.g. the 1,000 Flickr8k dev images, segments 4,9,16,25,36).
Reference: ``exhaustive`` with ``candidates=0`` (every image scored).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from finegrain.bench.scale import flickr8k_queries
from finegrain.index import Index


def main() -> None:
    index_dir, data = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    queries = flickr8k_queries(data, "dev", n, 0)
    index = Index.open(index_dir)
    ref = {q: [h.id for h in index.search(text=q, k=10, mode="exhaustive", candidates=0)] for q in queries}
    out = {}
    for mode in ("exhaustive", "hierarchical"):
        for c in (0, 50, 100, 200):
            hits = {q: {h.id for h in index.search(text=q, k=10, mode=mode, candidates=c)} for q in queries}
            out[f"{mode}:candidates={c}"] = round(float(np.mean([len(set(ref[q]) & hits[q]) / 10 for q in queries])), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
