"""Memory and quality of int8 local descriptors and instance descriptors in the local searcher (issue 15 item 1).

Opens an index with local features (a *copy*: it is changed in place), and for each variant stores the
``local`` and/or ``instance`` field int8 (``finegrain compress --field local|instance --quantize int8``),
then, in a fresh subprocess, opens the index and builds the local searcher with its first stage
(``LocalSearcher.approx()``) and reports the memory it holds: the descriptor rows (``db``), the FAISS
index (its serialised size), the instance matrix, and the process's anonymous and file-backed RSS
(``/proc/self/status``: ``RssAnon``, ``RssFile``) after loading, against the same process before the
searcher. Then every Revisited-Paris query (cropped to its box; features extracted once and cached)
is ranked by the product's searcher in each mode, and the revisitop mAPs are reported.

Usage::

    cp -r /work/cache/landmarks/bench/revisitop-rparis6k-mini-effnet-minilm-local-bc50260c /tmp/cl-idx
    python -m experiments.compact_local --index /tmp/cl-idx --data ../shared/data/rparis6k-mini
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

#: variant -> the fields stored int8
VARIANTS = {"float16": (), "local-int8": ("local",), "instance-int8": ("instance",), "both-int8": ("local", "instance")}


def memory(index_path: str) -> dict:
    """Run in a fresh process: what the local searcher of ``index_path`` holds once built."""
    import faiss

    from finegrain import Index

    def status() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    idx = Index.open(index_path)
    _ = idx.snapshot.global_rows  # the snapshot's own arrays first
    before = status()
    s = idx.local_searcher
    approx = s.approx()
    after = status()
    inst = s.instance
    inst_bytes = 0 if inst is None else int(getattr(inst, "rows", inst).nbytes)
    return {"db_dtype": str(s.db.dtype), "descriptors": s.db.n_rows,
            "db_MB": round(s.db.nbytes / 2**20, 2),
            "faiss_MB": round(faiss.serialize_index(approx.index).nbytes / 2**20, 2),
            "faiss_kind": type(faiss.downcast_index(approx.index)).__name__,
            "instance_MB": round(inst_bytes / 2**20, 3),
            "rss_anon_delta_MB": round((after["RssAnon"] - before["RssAnon"]) / 2**20, 1),
            "rss_file_delta_MB": round((after["RssFile"] - before["RssFile"]) / 2**20, 1)}


def _memory_in_subprocess(index: Path, src: Path | None) -> dict:
    """:func:`memory` in a fresh interpreter (``src``: the ``finegrain`` package folder's parent to import)."""
    import os

    here = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), here])
    script = (f"import json, sys; sys.path.insert(1, {here!r}); from experiments.compact_local import memory; "
              f"print(json.dumps(memory({str(index)!r})))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="a COPY of an index with local features")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rparis6k-mini"))
    parser.add_argument("--variants", default="float16,local-int8,instance-int8,both-int8,float16")
    parser.add_argument("--modes", default="instance,local,l2g")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/compact-local-queries.npz"))
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="also measure the memory with the finegrain package under this folder (e.g. main's src)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from finegrain import Index
    from finegrain.datasets import load_revisitop
    from finegrain.eval.metrics import revisitop_map

    bench = load_revisitop(args.data)
    index = Index.open(args.index)
    position = {p.name: i for i, p in enumerate(bench.db_paths)}
    queries: list[tuple[np.ndarray, np.ndarray]] = []
    if not args.memory_only:
        if args.cache.exists():
            with np.load(args.cache, allow_pickle=False) as z:
                queries = [(z[f"q{i}"], z[f"g{i}"]) for i in range(int(z["n"]))]
        else:
            s = index.local_searcher
            queries = [s.query_features(p, b) for p, b in zip(bench.query_paths, bench.query_boxes)]
            np.savez(args.cache, n=len(queries), **{f"q{i}": q for i, (q, _) in enumerate(queries)},
                     **{f"g{i}": g for i, (_, g) in enumerate(queries)})
    first: dict[str, np.ndarray] = {}
    for name in args.variants.split(","):
        for field in ("local", "instance"):
            index.compress(None, None, field=field, quantize="int8" if field in VARIANTS[name] else "none")
        row: dict = {"variant": name, "vector_bytes_per_image": index.info()["vector_bytes_per_image"]}
        row["memory"] = _memory_in_subprocess(args.index, None)
        if args.baseline_src:  # the same index read by another checkout's code (the searcher before this change)
            row["memory_baseline"] = _memory_in_subprocess(args.index, args.baseline_src)
        if queries:
            s = index.local_searcher
            pos_of = np.array([position[Path(index.snapshot.records[int(i)].path).name] for i in s.ids])
            for mode in args.modes.split(","):
                opts = {"shortlist": 100} if mode == "l2g" else {}
                cols = []
                for q, g in queries:
                    _, order = s.rank("global" if mode == "instance" else mode, q, g, **opts)
                    cols.append(pos_of[order])
                ranks = np.stack(cols, axis=1)
                maps = revisitop_map(ranks, bench.gnd.gnd)
                row[mode] = {k: round(maps[k], 2) for k in ("map_easy", "map_medium", "map_hard")}
                base = first.setdefault(mode, ranks)
                row[mode]["same_top10_as_first"] = round(float((ranks[:10] == base[:10]).all(axis=0).mean()), 3)
        print(json.dumps(row), flush=True)
    for field in ("local", "instance"):  # leave the copy as it came
        index.compress(None, None, field=field, quantize="none")
    index.close()


if __name__ == "__main__":
    main()
