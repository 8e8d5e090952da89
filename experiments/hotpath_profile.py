"""Where a multi-vector query's time goes: encoding, candidate stage, segment scoring (issue 15, "Scale").

Usage::

    python -m experiments.hotpath_profile INDEX DATA [N_QUERIES] [MODE ...]

``INDEX`` is a synthetic index of ``finegrain bench scale``, ``DATA`` the Flickr8k folder (dev captions,
seed 0, as the bench draws them). Per mode (``hierarchical:candidates=500`` syntax), one line of
medians per phase (decomposition + encoding, candidate stage, scoring, the whole ``Index.search``) and
the similarity ops, then cProfile's top functions of the staged path (encoding excluded). CPU: the
process's CPU time over all threads, less sensitive to other processes' load than wall time. On a loaded
machine these are ratios between phases, not timings to quote. ``HOTPATH_TOPS=FILE`` saves each mode's
rankings (first run) or compares them with the saved ones (later runs); ``HOTPATH_QUICK=1`` prints the
phases only.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time

import numpy as np

from finegrain.bench.scale import flickr8k_queries, parse_mode
from finegrain.compress.coded import global_vectors
from finegrain.index import Index
from finegrain.retrieval import Query
from finegrain.retrieval import multivector as mvr
from finegrain.search import multivector as mv


def staged(snap, params: mvr.MultiVectorParams, mode: str, vectors: np.ndarray, k: int = 10) -> dict:
    """The retriever's path with the encoding left out: candidate stage, then scoring (phase times in ms)."""
    n = mvr.auto_candidates(len(snap)) if params.candidates is None else params.candidates
    t0, c0 = time.perf_counter(), time.process_time()
    cand = mvr.candidate_positions(snap, vectors, n) if 0 < n < len(snap) else None
    t1, c1 = time.perf_counter(), time.process_time()
    _, positions, stats = mv.search(mode, mvr.segment_table(snap), global_vectors(snap), vectors, k,
                                    params.config(), cand)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"candidates_ms": (t1 - t0) * 1000, "scoring_ms": (t2 - t1) * 1000, "sim_ops": stats.sim_ops,
            "candidates_cpu_ms": (c1 - c0) * 1000, "scoring_cpu_ms": (c2 - c1) * 1000,
            "n_candidates": 0 if cand is None else len(cand), "top": positions.tolist()}


def main(argv: list[str]) -> None:
    path, data = argv[0], argv[1]
    n_queries = int(argv[2]) if len(argv) > 2 else 30
    modes = argv[3:] or ["hierarchical:candidates=500", "hierarchical"]
    texts = flickr8k_queries(data, "dev", n_queries, 0)
    index = Index.open(path)
    snap = index.snapshot
    index.search(text=texts[0], k=10, mode="hierarchical", candidates=500)  # model, segment table, ANN
    tops: dict[str, list] = {}
    quick = bool(os.environ.get("HOTPATH_QUICK"))  # phases only: no whole Index.search pass, no cProfile
    print(f"{path}: {len(snap):,} images, {len(snap.field_parts('segments-compact'))} segment chunks")
    for label in modes:
        base, options = parse_mode(label)
        params = mvr.MultiVectorParams.from_options(options, {}, mode=base)
        enc, vecs = [], []
        for t in texts:
            t0 = time.perf_counter()
            _, v = mvr.query_vectors(snap, Query(text=t), params)
            enc.append((time.perf_counter() - t0) * 1000)
            vecs.append(v)
        staged(snap, params, base, vecs[0])  # warm
        rows = [staged(snap, params, base, v) for v in vecs]
        whole = []
        for t in texts if not quick else []:
            t0 = time.perf_counter()
            index.search(text=t, k=10, mode=base, **options)
            whole.append((time.perf_counter() - t0) * 1000)
        med = {key: float(np.median([r[key] for r in rows])) for key in rows[0] if key != "top"}
        print(f"{label}: encode+decompose {np.median(enc):.1f} ms, candidates {med['candidates_ms']:.1f} ms "
              f"(CPU {med['candidates_cpu_ms']:.1f}), scoring {med['scoring_ms']:.1f} ms "
              f"(CPU {med['scoring_cpu_ms']:.1f}), Index.search {np.median(whole) if whole else np.nan:.1f} ms "
              "(medians); "
              f"query vectors {np.median([len(v) for v in vecs]):.0f}, candidates {med['n_candidates']:.0f}, "
              f"sim ops {med['sim_ops']:.0f}")
        tops[label] = [r["top"] for r in rows]
        if quick:
            continue
        prof = cProfile.Profile()
        prof.enable()
        for v in vecs:
            staged(snap, params, base, v)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])
    index.close()
    saved = os.environ.get("HOTPATH_TOPS")  # rankings before a change, compared after it
    if saved and os.path.exists(saved):
        before = json.loads(open(saved).read())
        for label, ranked in tops.items():
            if label in before:
                same = sum(a == b for a, b in zip(before[label], ranked))
                print(f"{label}: {same}/{len(ranked)} queries rank their top 10 as before")
    elif saved:
        with open(saved, "w") as f:
            json.dump(tops, f)


if __name__ == "__main__":
    main(sys.argv[1:])
