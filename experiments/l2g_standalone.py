"""Local-to-global retrieval (L2G) on Revisited Paris mini, standalone (no index): four modes, mAP E/M/H.

Modes over one set of features:
  global        whitened multi-scale GeM (p=4.6) of the tower's feature map, inner product
  global+local  global top-k, re-ranked by exact Chamfer (the conventional global-to-local baseline)
  local         approximate (CANN-style) Chamfer search over all database descriptors
  l2g           local search top-k -> MDS of sparse local similarities + global fusion -> SuperGlobal re-rank
plus two reference rows: the foundation's joint-space global embedding (``encode_images``) and
exact Chamfer over the whole database.

Queries are cropped to their box; the database is the ground truth's imlist, plus (by default)
the Flickr8k dev images as distractors. Raw features are cached under
~/.cache/finegrain/bench/l2g/ (float16 .npy chunks), so re-runs with other re-ranking or
whitening settings only recompute what changed. Query features are re-extracted live
each run for the timings.

Usage:
  python -m experiments.l2g_standalone                         # defaults, with 1,000 distractors
  python -m experiments.l2g_standalone --no-distractors --k 100 --mds-dim 16 --w 0.19 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from finegrain.datasets import load_revisitop  # noqa: E402
from finegrain.eval.metrics import revisitop_map  # noqa: E402
from finegrain.local import chamfer as ch  # noqa: E402
from finegrain.local import features as lf  # noqa: E402
from finegrain.rerank.mds import L2GConfig, l2g_rerank, online_pairs  # noqa: E402

CACHE = Path.home() / ".cache" / "finegrain" / "bench" / "l2g"
CHUNK = 64


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- raw feature cache
def cached_raw(extractor: lf.LocalExtractor, items: list[tuple[Path, list | None]], tag: str) -> list[lf.RawFeatures]:
    """Raw features of ``items`` ((path, bbox) pairs), computed once and cached in chunks of 64 images."""
    key = _hash({"name": extractor.name, "cfg": {k: v for k, v in extractor.config().items() if k != "threads"}})
    folder = CACHE / f"raw-{extractor.name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(extractor.config(), indent=1))
    out: list[lf.RawFeatures] = []
    t0, done = time.time(), 0
    for c in range(0, len(items), CHUNK):
        part = items[c:c + CHUNK]
        ck = _hash([(str(Path(p).resolve()), b) for p, b in part])
        base = folder / f"chunk-{ck}"
        files = {f: Path(f"{base}.{f}.npy") for f in ("desc", "meta", "counts", "sizes", "global")}
        if not all(f.exists() for f in files.values()):
            raws = [extractor.extract_raw(p, b) for p, b in part]
            dim = next(r.descriptors.shape[1] for r in raws if len(r.descriptors))
            arrays = {
                "desc": np.concatenate([r.descriptors.reshape(-1, dim) for r in raws]).astype(np.float16),
                "meta": np.concatenate([np.column_stack([r.positions.reshape(-1, 2), r.strengths, r.scales])
                                        for r in raws]).astype(np.float32),
                "counts": np.array([len(r.descriptors) for r in raws], np.int64),
                "sizes": np.array([r.image_size for r in raws], np.int64),
                "global": np.stack([r.global_raw if r.global_raw is not None else np.zeros(1, np.float32)
                                    for r in raws]).astype(np.float32),
            }
            for f, arr in arrays.items():
                tmp = Path(str(files[f]) + ".tmp.npy")
                np.save(tmp, arr)
                os.replace(tmp, files[f])
            done += len(part)
            rate = (time.time() - t0) / done
            log(f"  [{tag}] {c + len(part)}/{len(items)} images, {rate:.2f} s/image")
        desc, meta = np.load(files["desc"]), np.load(files["meta"])
        counts, sizes, glob = np.load(files["counts"]), np.load(files["sizes"]), np.load(files["global"])
        offs = np.concatenate([[0], np.cumsum(counts)])
        for i in range(len(part)):
            a, b = offs[i], offs[i + 1]
            out.append(lf.RawFeatures(desc[a:b], meta[a:b, :2], meta[a:b, 2], meta[a:b, 3], tuple(sizes[i]),
                                      glob[i] if glob.shape[1] > 1 else None))
    return out


def cached_joint_global(paths: list[Path], boxes: list, tag: str) -> np.ndarray:
    """The foundation's default global embedding (joint space, 224 px) of each image / query crop."""
    from PIL import Image

    from finegrain import encoders
    from finegrain.images import load_image

    f = CACHE / f"joint-{tag}-{_hash([(str(p), b) for p, b in zip(paths, boxes)])}.npy"
    if f.exists():
        return np.load(f)
    enc = encoders.create("effnet-minilm")
    items = []
    for p, b in zip(paths, boxes):
        if b is None:
            items.append(p)
        else:
            img = load_image(p)
            items.append(img.crop(tuple(int(round(v)) for v in b)))
    vecs = enc.encode_images(items, batch_size=32)
    f.parent.mkdir(parents=True, exist_ok=True)
    np.save(f, vecs)
    return vecs


# --------------------------------------------------------------------------- ranking helpers
def full_order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, kind="stable")


def with_head(head: np.ndarray, base_order: np.ndarray) -> np.ndarray:
    """``head`` first, then the rest of ``base_order`` without it."""
    rest = base_order[~np.isin(base_order, head)]
    return np.concatenate([head, rest])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "rparis6k-mini"))
    ap.add_argument("--distractors", default=str(ROOT.parent / "shared" / "data" / "flickr8k" / "images"))
    ap.add_argument("--distractor-list", default=str(ROOT.parent / "shared" / "data" / "flickr8k" / "splits" / "dev.txt"))
    ap.add_argument("--no-distractors", action="store_true")
    ap.add_argument("--extractor", default="cnn", choices=["cnn", "sift", "disk"])
    ap.add_argument("--image-size", type=int, default=512, help="cnn: longer side before the scales")
    ap.add_argument("--scales", default="1.414,1.0,0.707,0.5")
    ap.add_argument("--features", type=int, default=1000, help="local features per database image")
    ap.add_argument("--query-features", type=int, default=1000, help="local features of the query")
    ap.add_argument("--raw-power", type=float, default=0.5)
    ap.add_argument("--whiten-power", type=float, default=0.5)
    ap.add_argument("--whiten-shrinkage", type=float, default=0.1)
    ap.add_argument("--global-whiten", action="store_true", help="PCA-whiten the global GeM on the collection")
    ap.add_argument("--global-dim", type=int, default=512)
    ap.add_argument("--global-power", type=float, default=0.5)
    ap.add_argument("--global-shrinkage", type=float, default=0.1)
    ap.add_argument("--index", default="ivf", choices=["ivf", "hnsw", "flat"])
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--fill", default="kth", choices=["kth", "zero"])
    ap.add_argument("--threshold", type=float, default=None, help="match threshold of the Chamfer similarity")
    ap.add_argument("--exact-rerank", type=int, default=0, help="re-score the best R of the local search exactly")
    ap.add_argument("--graph-m", type=int, default=50, help="stored local neighbours per database image")
    ap.add_argument("--graph-query-features", type=int, default=None)
    ap.add_argument("--pairs", default="graph", choices=["graph", "online", "none"])
    ap.add_argument("--k", type=int, default=100, help="shortlist size (l2g and global+local)")
    ap.add_argument("--mds-dim", type=int, default=16)
    ap.add_argument("--smacof-iter", type=int, default=100)
    ap.add_argument("--smacof-eps", type=float, default=1e-4)
    ap.add_argument("--w", type=float, default=0.19)
    ap.add_argument("--sim-floor", type=float, default=0.0)
    ap.add_argument("--neighbors", type=int, default=None, help="stored neighbours used per shortlist image")
    ap.add_argument("--query-neighbors", type=int, default=10, help="known query pairs (0: all k)")
    ap.add_argument("--sg-k", type=int, default=9)
    ap.add_argument("--sg-beta", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=1, help="torch/FAISS threads (at most 2 on shared machines)")
    ap.add_argument("--no-joint", action="store_true", help="skip the joint-space global reference row")
    ap.add_argument("--no-live-timing", action="store_true", help="use cached query features (no extraction timing)")
    ap.add_argument("--sweep", default=None, help="JSON list of L2GConfig overrides to evaluate on cached features")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace) -> dict:
    """Load (or compute and cache) every feature and search structure the modes need."""
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    scales = tuple(float(s) for s in args.scales.split(","))
    bench = load_revisitop(args.data, distractors=None if args.no_distractors else args.distractors,
                           distractor_list=None if args.no_distractors else args.distractor_list)
    db_items = [(p, None) for p in bench.db_paths + bench.distractor_paths]
    q_items = list(zip(bench.query_paths, bench.query_boxes))
    n_db = len(db_items)
    log(f"database {len(bench.db_paths)} + {len(bench.distractor_paths)} distractors, {len(q_items)} queries")

    # ---- features (cnn always: it gives the global descriptor)
    cnn = lf.CNNExtractor(image_size=args.image_size, scales=scales, max_features=100_000, raw_power=args.raw_power,
                          whiten_power=args.whiten_power, whiten_shrinkage=args.whiten_shrinkage,
                          global_whiten=args.global_whiten, global_dim=args.global_dim, global_power=args.global_power,
                          global_shrinkage=args.global_shrinkage, threads=args.threads)
    cnn_cache = lf.CNNExtractor(image_size=args.image_size, scales=scales, max_features=100_000, raw_power=1.0)
    t = time.time()
    raw_db = cached_raw(cnn_cache, db_items, "cnn db")
    raw_q = cached_raw(cnn_cache, q_items, "cnn queries")
    log(f"cnn raw features ready ({time.time() - t:.0f} s)")
    cnn.fit([r.top(args.features) for r in raw_db])
    G_db = cnn.transform_global(np.stack([r.global_raw for r in raw_db]))
    G_q = cnn.transform_global(np.stack([r.global_raw for r in raw_q]))

    if args.extractor == "cnn":
        local_ex = cnn
        loc_db = [cnn.transform(r.top(args.features)) for r in raw_db]
        loc_q = [cnn.transform(r.top(args.query_features)) for r in raw_q]
    else:
        local_ex = lf.create(args.extractor, max_features=args.features if args.extractor != "sift" else 100_000)
        cache_ex = lf.create(args.extractor, **{**local_ex.config(), "max_features": 100_000})
        rdb = cached_raw(cache_ex, db_items, f"{args.extractor} db")
        rq = cached_raw(cache_ex, q_items, f"{args.extractor} queries")
        local_ex.fit([r.top(args.features) for r in rdb])
        loc_db = [local_ex.transform(r.top(args.features)) for r in rdb]
        loc_q = [local_ex.transform(r.top(args.query_features)) for r in rq]
    db = ch.LocalDatabase.from_features(loc_db)
    log(f"local database: {db.n_rows} descriptors ({db.counts.mean():.0f}/image), dim {db.dim}")

    # ---- approximate local search structure (FAISS index cached on disk)
    lkey = _hash({"ex": local_ex.config(), "f": args.features, "n": n_db, "ext": args.extractor,
                  "raw": [args.image_size, scales], "data": [str(p) for p, _ in db_items[:3]] + [n_db]})
    ikey = _hash([lkey, args.index, args.nprobe])
    ifile = CACHE / f"faiss-{ikey}.index"
    t = time.time()
    if ifile.exists():
        searcher = ch.ApproxChamfer(db, index=args.index, knn=args.knn, nprobe=args.nprobe, fill=args.fill,
                                    threshold=args.threshold, threads=args.threads,
                                    faiss_index=faiss.read_index(str(ifile)))
    else:
        searcher = ch.ApproxChamfer(db, index=args.index, knn=args.knn, nprobe=args.nprobe, fill=args.fill,
                                    threshold=args.threshold, threads=args.threads)
        faiss.write_index(searcher.index, str(ifile))
    log(f"FAISS {args.index} over {searcher.index.ntotal} descriptors ready ({time.time() - t:.0f} s)")

    gfile = CACHE / f"graph-{_hash([ikey, args.knn, args.fill, args.graph_m, args.graph_query_features, args.threshold])}.npz"
    if args.pairs == "graph":
        if gfile.exists():
            z = np.load(gfile)
            graph = (z["ids"], z["sims"])
        else:
            t = time.time()
            graph = ch.knn_graph(searcher, args.graph_m, max_query_features=args.graph_query_features)
            np.savez(gfile, ids=graph[0], sims=graph[1])
            log(f"local kNN graph (m={args.graph_m}) built in {time.time() - t:.0f} s")
    else:
        graph = None

    # ---- exact Chamfer of every query to every image (reference; cached)
    efile = CACHE / f"exact-{_hash([lkey, args.query_features, [str(p) for p, _ in q_items], args.threshold])}.npy"
    if efile.exists():
        exact = np.load(efile)
    else:
        t = time.time()
        exact = np.stack([ch.chamfer_scores(f.descriptors, db, threshold=args.threshold) for f in loc_q])
        np.save(efile, exact)
        log(f"exact Chamfer over the database in {time.time() - t:.0f} s")

    # ---- live query extraction timing (the same extractor, the cached arrays are used for scoring)
    extract_ms = []
    if not args.no_live_timing:
        live = lf.CNNExtractor(image_size=args.image_size, scales=scales, max_features=args.query_features,
                               raw_power=args.raw_power, threads=args.threads)
        live.local_whitening, live.global_whitening = cnn.local_whitening, cnn.global_whitening
        live.global_whiten = cnn.global_whiten
        live.extract_raw(*q_items[0])  # warm-up
        for p, b in q_items:
            t = time.perf_counter()
            raw = live.extract_raw(p, b)
            live.transform(raw)
            live.transform_global(raw)
            if args.extractor != "cnn":
                local_ex.extract(p, b)
            extract_ms.append((time.perf_counter() - t) * 1e3)

    return dict(bench=bench, db_items=db_items, q_items=q_items, n_db=n_db, cnn=cnn, raw_db=raw_db, raw_q=raw_q,
                G_db=G_db, G_q=G_q, local_ex=local_ex, loc_db=loc_db, loc_q=loc_q, db=db, searcher=searcher,
                graph=graph, exact=exact, extract_ms=extract_ms)


def main(argv=None) -> dict:
    args = parse_args(argv)
    st = prepare(args)
    bench, db_items, q_items, n_db = st["bench"], st["db_items"], st["q_items"], st["n_db"]
    G_db, G_q, loc_q, db, searcher = st["G_db"], st["G_q"], st["loc_q"], st["db"], st["searcher"]
    graph, exact, extract_ms = st["graph"], st["exact"], st["extract_ms"]
    base_cfg = dict(k=args.k, mds_dim=args.mds_dim, smacof_iter=args.smacof_iter, smacof_eps=args.smacof_eps,
                    w=args.w, sim_floor=args.sim_floor, neighbors=args.neighbors,
                    query_neighbors=args.query_neighbors or None, sg_k=args.sg_k, sg_beta=args.sg_beta)

    def run_modes(cfg: L2GConfig, with_refs: bool) -> dict:
        cols = {m: [] for m in ("global", "global+local", "local", "l2g", "local (exact)")}
        t_local, t_rerank, t_gl, recalls, recalls_k, rerank_parts = [], [], [], [], [], []
        for qi, f in enumerate(loc_q):
            gs = G_db @ G_q[qi]
            g_order = full_order(gs)
            cols["global"].append(g_order)
            # global+local: exact Chamfer on the global shortlist
            t = time.perf_counter()
            head = g_order[:cfg.k]
            ex = ch.chamfer_scores(f.descriptors, db, head, threshold=args.threshold)
            t_gl.append((time.perf_counter() - t) * 1e3)
            cols["global+local"].append(with_head(head[np.argsort(-ex, kind="stable")], g_order))
            # local: approximate Chamfer search
            t = time.perf_counter()
            scores, reached = searcher.score_all(f.descriptors)
            if args.exact_rerank:
                s_top, ids_top = searcher.search(f.descriptors, max(cfg.k, 100), exact_rerank=args.exact_rerank)
            t_local.append((time.perf_counter() - t) * 1e3)
            order = np.lexsort((-scores, ~reached))
            if args.exact_rerank:
                order = with_head(ids_top[ids_top >= 0], order)
                scores = scores.copy()
                scores[ids_top[ids_top >= 0]] = s_top[ids_top >= 0]
            cols["local"].append(order)
            cols["local (exact)"].append(full_order(exact[qi]))
            recalls.append(ch.recall_at_k(order, exact[qi], 100))
            recalls_k.append(ch.recall_at_k(order, exact[qi], cfg.k))
            # l2g
            t = time.perf_counter()
            short = order[:cfg.k]
            pairs = None
            if args.pairs == "online":
                pairs = online_pairs([db.image(int(i)) for i in short], G_db[short])
            elif args.pairs == "none":
                pairs = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
            res = l2g_rerank(scores[short], short, G_q[qi], G_db[short], cfg, graph=graph, pairs=pairs)
            rerank_parts.append(res.timings)
            t_rerank.append((time.perf_counter() - t) * 1e3)
            cols["l2g"].append(with_head(res.ids, order))
        out = {}
        for m, c in cols.items():
            r = revisitop_map(np.stack(c, axis=1), bench.gnd.gnd)
            out[m] = {"E": r["map_easy"], "M": r["map_medium"], "H": r["map_hard"]}
        out["_timing"] = {"local_search_ms": float(np.mean(t_local)), "rerank_ms": float(np.mean(t_rerank)),
                          "rerank_ms_max": float(np.max(t_rerank)), "global_local_rerank_ms": float(np.mean(t_gl)),
                          "recall@100": float(np.mean(recalls)), f"recall@{cfg.k}": float(np.mean(recalls_k)),
                          **{f"rerank_{k}": float(np.mean([p[k] for p in rerank_parts])) for k in rerank_parts[0]}}
        return out

    cfg = L2GConfig(**base_cfg)
    res = run_modes(cfg, True)
    if not args.no_joint:
        J_db = cached_joint_global([p for p, _ in db_items], [None] * n_db, "db")
        J_q = cached_joint_global([p for p, _ in q_items], [b for _, b in q_items], "q")
        r = revisitop_map(np.stack([full_order(J_db @ J_q[i]) for i in range(len(q_items))], 1), bench.gnd.gnd)
        res["global (joint, foundation default)"] = {"E": r["map_easy"], "M": r["map_medium"], "H": r["map_hard"]}
    tm = res["_timing"]
    tm["extract_ms"] = float(np.mean(extract_ms)) if extract_ms else float("nan")
    tm["l2g_query_ms"] = tm["extract_ms"] + tm["local_search_ms"] + tm["rerank_ms"]
    report = {"args": vars(args), "database": len(bench.db_paths), "distractors": len(bench.distractor_paths),
              "queries": len(q_items), "descriptors": db.n_rows, "results": res}

    rows = ["global (joint, foundation default)", "global", "global+local", "local", "local (exact)", "l2g"]
    print(f"\n| mode | E | M | H |\n|---|---|---|---|")
    for m in rows:
        if m in res:
            v = res[m]
            print(f"| {m} | {v['E']:.1f} | {v['M']:.1f} | {v['H']:.1f} |")
    print("\n" + ", ".join(f"{k} {v:.3f}" if "recall" in k else f"{k} {v:.0f}" for k, v in tm.items()))

    if args.sweep:
        sweep = []
        for over in json.loads(args.sweep):
            c = L2GConfig(**{**base_cfg, **over})
            r = run_modes(c, False)
            sweep.append({"config": over, "l2g": r["l2g"], "global+local": r["global+local"],
                          "rerank_ms": r["_timing"]["rerank_ms"]})
            print(f"sweep {over}: l2g E/M/H {r['l2g']['E']:.1f}/{r['l2g']['M']:.1f}/{r['l2g']['H']:.1f} "
                  f"(g+l M {r['global+local']['M']:.1f}) rerank {r['_timing']['rerank_ms']:.0f} ms", flush=True)
        report["sweep"] = sweep
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    main()
