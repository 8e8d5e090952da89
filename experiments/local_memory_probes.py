"""Small probes behind the local-database memory figures of docs/benchmarks.md ("The local family at 100,000
images with the default 970 descriptors"), one per subcommand::

    python -m experiments.local_memory_probes kept INDEX      # share of descriptors the near-duplicate pass keeps
    python -m experiments.local_memory_probes float16 INDEX   # FAISS bytes, scores: float16 as stored vs float32
    python -m experiments.local_memory_probes release INDEX   # cost of giving back every part's pages
    python -m experiments.local_memory_probes reserve --how faiss_add   # IVF list memory: FAISS's own add ...
    python -m experiments.local_memory_probes reserve --how reserved    # ... and lists reserved first

Each prints one JSON line; run ``reserve`` once per ``--how``, each in its own process (freed memory a first
build left in the heap would hide a second build's growth).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _searcher(path: str):
    from finegrain import Index
    from finegrain.local.search import LocalSearcher

    return LocalSearcher(Index.open(path).snapshot)


def kept(path: str) -> dict:
    from finegrain.local.chamfer import representative_rows

    db = _searcher(path).db
    rows = representative_rows(db, 0.7)
    return {"images": db.n_images, "descriptors": db.n_rows, "kept": len(rows),
            "share": round(len(rows) / db.n_rows, 4)}


def float16(path: str) -> dict:
    import faiss

    from finegrain.local.chamfer import IVF_TRAIN_ROWS, ApproxChamfer, ivf_lists

    db = _searcher(path).db
    if db.dtype != np.float16:
        raise SystemExit("the index must store its local field float16 (the default)")
    new = ApproxChamfer(db, knn=512, nprobe=16, dedup=0.7)
    x = db.decode(db.take(new.rows))
    nlist = ivf_lists(len(x))
    old = faiss.IndexIVFFlat(faiss.IndexFlatIP(db.dim), db.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    train = min(64 * nlist, IVF_TRAIN_ROWS)  # the build's own training sample
    old.train(x if len(x) <= train else x[np.sort(np.random.default_rng(0).choice(len(x), train, replace=False))])
    old.add(x)
    before = ApproxChamfer(db, knn=512, nprobe=16, dedup=0.7, rows=new.rows, faiss_index=old)
    probes = np.linspace(0, db.n_images - 1, 5).astype(int)
    diff = max(float(np.abs(new.score_all(db.image(int(i)))[0] - before.score_all(db.image(int(i)))[0]).max())
               for i in probes)
    return {"indexed_rows": len(new.rows), "float16_index_bytes": int(faiss.serialize_index(new.index).nbytes),
            "float32_index_bytes": int(faiss.serialize_index(old).nbytes), "queries": len(probes),
            "largest_score_difference": diff}


def release(path: str) -> dict:
    db = _searcher(path).db
    db.release()
    t0 = time.perf_counter()
    for _ in range(20):
        db.release()
    return {"parts": len(db.parts), "release_ms": round((time.perf_counter() - t0) / 20 * 1e3, 3)}


def reserve(how: str) -> dict:
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    def anon_mb() -> int:
        return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))

    d, n, nlist, block = 128, 3_000_000, 1024, 200_000
    rng = np.random.default_rng(0)
    out = {"rows": n, "codes_and_ids_mb": n * (d + 8) // 2**20}
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT, False)
    index.train(rng.standard_normal((nlist * 40, d)).astype(np.float32))
    starts = range(0, n, block)

    def rows(a: int) -> np.ndarray:
        return np.random.default_rng(a).standard_normal((min(n, a + block) - a, d)).astype(np.float32)

    base = anon_mb()
    if how == "faiss_add":
        for a in starts:
            index.add(rows(a))
    else:  # what compress.coded._add_reserved does
        lists = np.concatenate([index.quantizer.search(rows(a), 1)[1][:, 0] for a in starts])
        for list_no, count in enumerate(np.bincount(lists, minlength=nlist).tolist()):
            index.invlists.resize(list_no, count)
            index.invlists.resize(list_no, 0)
        for a in starts:
            add_preassigned(index, rows(a), np.ascontiguousarray(lists[a:a + block], np.int64))
    out[f"{how}_mb"] = anon_mb() - base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=["kept", "float16", "release", "reserve"])
    ap.add_argument("index", nargs="?")
    ap.add_argument("--how", choices=["faiss_add", "reserved"], default="reserved", help="reserve: which build")
    args = ap.parse_args()
    if args.probe != "reserve" and not args.index:
        ap.error(f"{args.probe} needs an index with local features")
    result = reserve(args.how) if args.probe == "reserve" else {"kept": kept, "float16": float16, "release": release}[
        args.probe](args.index)
    print(json.dumps({"probe": args.probe, **result}))


if __name__ == "__main__":
    main()
