"""fast-plaid peer of ``finegrain bench scale --peers``, run in fast-plaid's own virtualenv (torch 2.11).

Standalone: imports numpy, torch and fast_plaid only, never finegrain (whose virtualenv has another torch).
Reads what :mod:`finegrain.bench.peers` wrote in ``WORKDIR``:

- ``docs-NNNNN.npy`` / ``docs-NNNNN-offsets.npy``: blocks of images in position order, each image's
  vectors already in MaxSim form (:mod:`finegrain.bench.maxsim`: ``[g, 1]`` then ``[s, -1]`` rows);
- ``queries.npz``: ``vectors`` (scaled by their weights) and ``offsets``, one query after another;

builds a fast-plaid index under ``--index-dir`` (default ``WORKDIR/index``; ``create`` on the first
block, ``update`` with the others, so memory holds one block at a time), searches one query at a time and
writes ``result.json``.

With ``--fingerprint``, a finished build leaves ``finegrain-built.json`` in the index folder; a later run
with the same fingerprint reuses that index (no blocks needed) and reports the original build's seconds
with ``build_reused``. A build is an hour at 100,000 images on two cores, so the search can be timed alone
in a second run.

    python fastplaid_runner.py WORKDIR K [--nbits 4] [--n-ivf-probe 8] [--n-full-scores 4096]
                               [--index-dir DIR] [--fingerprint TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("k", type=int)
    ap.add_argument("--nbits", type=int, default=4)
    ap.add_argument("--n-ivf-probe", type=int, default=8)
    ap.add_argument("--n-full-scores", type=int, default=4096)
    ap.add_argument("--index-dir", default=None)
    ap.add_argument("--fingerprint", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from fast_plaid import search as fp_search

    torch.set_num_threads(max(1, int(os.environ.get("FINEGRAIN_PEER_THREADS", "0")) or torch.get_num_threads()))
    work = Path(args.workdir)
    index_dir = Path(args.index_dir or work / "index")
    marker = index_dir / "finegrain-built.json"
    built = json.loads(marker.read_text()) if marker.exists() else {}
    reused = args.fingerprint is not None and built.get("fingerprint") == args.fingerprint
    if reused:
        plaid = fp_search.FastPlaid(index=str(index_dir), device="cpu")
        build_s = float(built["build_s"])
        print(f"fast-plaid: reusing the finished index ({build_s:.0f} s build)", flush=True)
    else:
        marker.unlink(missing_ok=True)  # a build stopped half-way must never be taken for a finished one
        blocks = sorted(p for p in work.glob("docs-*.npy") if not p.name.endswith("-offsets.npy"))
        if not blocks:
            raise SystemExit(f"no documents to index in {work} and no finished index in {index_dir}")
        t0 = time.perf_counter()
        plaid = fp_search.FastPlaid(index=str(index_dir), device="cpu")
        for i, path in enumerate(blocks):
            docs = np.load(path)
            offsets = np.load(path.with_name(path.stem + "-offsets.npy"))
            tensors = [torch.from_numpy(docs[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
            if i == 0:
                plaid.create(documents_embeddings=tensors, nbits=args.nbits)
            else:
                plaid.update(documents_embeddings=tensors)
            print(f"fast-plaid: block {i + 1}/{len(blocks)} in, {time.perf_counter() - t0:.0f} s", flush=True)
        build_s = time.perf_counter() - t0
        if args.fingerprint is not None:
            marker.write_text(json.dumps({"fingerprint": args.fingerprint, "build_s": build_s}))

    q = np.load(work / "queries.npz")
    vectors, offsets = q["vectors"], q["offsets"]
    queries = [torch.from_numpy(vectors[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]

    def run(query: torch.Tensor) -> list[int]:
        hits = plaid.search(queries_embeddings=[query], top_k=args.k, n_ivf_probe=args.n_ivf_probe,
                            n_full_scores=args.n_full_scores, show_progress=False)[0]
        return [int(doc) for doc, _ in hits]

    run(queries[0])  # warm-up
    ranked, latencies = [], []
    for query in queries:
        t = time.perf_counter()
        ranked.append(run(query))
        latencies.append((time.perf_counter() - t) * 1000)
    index_bytes = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    from importlib.metadata import version

    (work / "result.json").write_text(json.dumps({
        "ranked": ranked, "latencies_ms": latencies, "build_s": build_s, "build_reused": reused,
        "rss_mb": _rss_peak_mb(),
        "index_bytes": index_bytes, "torch": torch.__version__,
        "fast_plaid": version("fast-plaid"), "nbits": args.nbits,
        "n_ivf_probe": args.n_ivf_probe, "n_full_scores": args.n_full_scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
