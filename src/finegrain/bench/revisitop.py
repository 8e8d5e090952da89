"""Revisited Oxford/Paris benchmark: image queries cropped to their box, mAP Easy/Medium/Hard.

The database is the ground truth's ``imlist`` plus optional distractors
(never relevant). Each query image is cropped to its ``bbx`` and searched
against the whole index; the full ranking goes to the revisitop
``compute_map`` (junk removed, Easy/Medium/Hard protocols, mP@1/5/10).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..datasets import RevisitopSet, load_revisitop
from ..eval.metrics import revisitop_map, revisitop_protocols
from ..index import Index
from ..local.chamfer import recall_at_k
from ..local.search import LOCAL_MODES
from ..local.store import LocalConfig
from ..report import ReportData, revisitop_pr
from .common import bench_index

#: Distractors added per indexing pass: a killed build keeps the whole database and a prefix of the list.
DISTRACTOR_STEP = 1000


def revisitop_index_name(data: RevisitopSet, encoder: str, local: LocalConfig | None = None) -> str:
    """The cache folder name of a bench index: dataset, encoder, the distractor list (a hash of the absolute
    paths, so it does not depend on the working directory) and the local-feature settings."""
    name = f"revisitop-{data.db_paths[0].parent.parent.name}-{encoder.replace('/', '_').replace(':', '_')}"
    if data.distractor_paths:
        digest = hashlib.sha1("\n".join(sorted(os.path.abspath(p) for p in data.distractor_paths)).encode())
        name += f"-d{len(data.distractor_paths)}-{digest.hexdigest()[:8]}"
    if local is not None:
        settings = local.to_dict()
        settings["params"] = {k: v for k, v in settings["params"].items() if k != "threads"}  # runtime only
        name += "-local-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return name


def revisitop_index(data: RevisitopSet, encoder: str, cache_dir: Path, show_progress: bool,
                    local: LocalConfig | None = None, available_only: bool = False,
                    step: int = DISTRACTOR_STEP, index_dir: Path | None = None) -> tuple[Index, dict, np.ndarray]:
    """The cached bench index of database + distractor images, and each indexed image's benchmark position.

    With ``local`` the index also stores local features (a separate cached
    index, named after the local settings).

    The index is built incrementally and can be resumed: the database alone
    first (so the local whitening is fitted on the database images, the same
    for every distractor list; when the database's own bench index exists in
    ``cache_dir`` it is copied instead of re-indexed), then ``step``
    distractors per pass, in list order; indexing commits as it goes and
    skips images already indexed, so an interrupted build continues where it
    stopped, holds the whole database as soon as the first pass is done, and
    later runs reuse it.
    ``available_only``: do not index anything; open the cached index as it
    is (``data`` must list only distractors it holds and ``index_dir`` name
    it, see :func:`available_distractors`).

    Returns ``(index, index_stats, position_of_row)``: ``position_of_row[r]``
    is the benchmark position (database ``i`` -> ``i``, distractor ``j`` ->
    ``len(db) + j``) of the index's global row ``r``.
    """
    images = data.db_paths + data.distractor_paths
    index_dir = index_dir or cache_dir / revisitop_index_name(data, encoder, local)
    if available_only:
        if not (index_dir / "finegrain.sqlite").exists():
            raise FileNotFoundError(f"no cached bench index at {index_dir}: build it first (without --available)")
        index = Index.open(index_dir)
        stats: dict = {"index_images_per_s": index.catalog.get_meta("bench_index_images_per_s"),
                       "index_failed": 0, "index_reused": True}
    else:
        n_db, n_d, reused = len(data.db_paths), len(data.distractor_paths), True
        if n_d and not index_dir.exists():  # start from the database's own bench index when there is one
            seed_index(cache_dir / revisitop_index_name(dataclasses.replace(data, distractor_paths=[]), encoder,
                                                        local), index_dir, n_db)
        for end in [0, *range(min(step, n_d), n_d + step, step)] if n_d else [0]:
            index, stats = bench_index(images[: n_db + min(end, n_d)], encoder, index_dir, show_progress,
                                       local=local)
            reused = reused and stats["index_reused"]
            if end >= n_d:
                break
        stats["index_reused"] = reused
    # The index stores each file as the walk named it (absolute, symlinks kept), not resolved: key by both.
    position = {str(p.resolve()): i for i, p in enumerate(images)}
    position.update({os.path.abspath(p): i for i, p in enumerate(images)})
    rows = np.array([position.get(index.records[int(i)].path, -1) for i in index.global_rows.owners])
    if (rows < 0).any():
        raise ValueError(f"the bench index {index_dir} holds images that are not part of this benchmark")
    return index, stats, rows


def seed_index(source: Path, target: Path, n_images: int) -> bool:
    """Copy the finished bench index ``source`` (the database alone, ``n_images`` images) to ``target`` as the
    start of a bigger one, so the database is indexed once for every distractor list; False when there is none.

    The copy goes to a temporary folder renamed into place, so an interrupted copy leaves nothing half-made.
    """
    if not (source / "finegrain.sqlite").exists():
        return False
    try:
        if len(Index.open(source)) != n_images:
            return False
    except (OSError, ValueError):  # an unreadable cache is simply not used
        return False
    tmp = target.with_name(target.name + ".seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("ann"))
    tmp.rename(target)
    return True


def available_distractors(data: RevisitopSet, encoder: str, cache_dir: Path,
                          local: LocalConfig | None = None) -> tuple[RevisitopSet, Path]:
    """``data`` restricted to the distractors its cached bench index already holds (list order kept), and the
    index's folder (named after the full list: pass it to :func:`revisitop_index` with ``available_only``).

    For a benchmark whose distractor index is still being built: the result
    records how many were used. Raises when the index is missing or does not
    hold the whole database yet.
    """
    index_dir = cache_dir / revisitop_index_name(data, encoder, local)
    if not (index_dir / "finegrain.sqlite").exists():
        raise FileNotFoundError(f"no cached bench index at {index_dir}: build it first (without --available)")
    index = Index.open(index_dir)
    held = {index.records[int(i)].path for i in index.global_rows.owners}
    has = [os.path.abspath(p) in held or str(p.resolve()) in held for p in data.db_paths + data.distractor_paths]
    n_db = len(data.db_paths)
    if not all(has[:n_db]):
        raise ValueError(f"the bench index {index_dir} holds {sum(has[:n_db])} of the {n_db} database images "
                         "so far; let its build reach the distractors first")
    kept = [p for p, ok in zip(data.distractor_paths, has[n_db:]) if ok]
    return dataclasses.replace(data, distractor_paths=kept), index_dir


def full_ranking(order: np.ndarray, n_total: int) -> np.ndarray:
    """Benchmark positions in ranked order, completed with any missing ones (for example failed images) at the end."""
    seen = np.zeros(n_total, bool)
    seen[order] = True
    return np.concatenate([order, np.flatnonzero(~seen)])


def run_revisitop(data: str | Path, gnd: str | Path | None = None, distractors: str | Path | None = None,
                  distractor_list: str | Path | None = None, mode: str = "global", encoder: str = "effnet-minilm",
                  cache_dir: str | Path | None = None, show_progress: bool = True,
                  local: LocalConfig | str | None = None,
                  recall_k: int = 100, report: ReportData | None = None, available_only: bool = False,
                  index_only: bool = False, baselines: bool = True, **search_options) -> dict:
    """Run the benchmark; mAPs and mP@k in percent, query latency in ms (image encoding included).

    The local-feature modes (``global+local``, ``local``, ``l2g``, and
    ``global`` with ``global_field="instance"``) need ``local`` (an extractor
    name or :class:`LocalConfig`); they also report the re-ranking time per
    query (``rerank_ms_p50``), and the ``local``/``l2g`` modes the recall of
    the approximate Chamfer top-``recall_k`` against exact Chamfer over the
    whole database (``approx_recall_at_100``, the approximate scores alone; with an
    exact re-score, ``exact_rerank=R`` or the searcher's default, also
    ``first_stage_recall_at_100``: the first stage as searched, its
    approximate top R re-scored exactly).
    ``report``, when given, receives per-query latencies and the
    Easy/Medium/Hard precision-recall curves for :func:`finegrain.report.write_report`.

    ``distractors`` is a folder (with ``distractor_list``: names in it) or a
    text file of image paths. The distractor index is built incrementally
    and resumed when interrupted (:func:`revisitop_index`); ``index_only``
    builds it and returns without searching; ``available_only`` searches
    the database plus only the distractors the cached index holds so far
    (``distractors`` then says how many, ``distractors_requested`` how many
    were listed). With local features, ``baselines`` adds the two global
    descriptors' mAPs (``baseline_global``: the joint space;
    ``baseline_instance``: the GeM instance descriptor) to the result.
    """
    bench = load_revisitop(data, gnd, distractors, distractor_list)
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "finegrain" / "bench")
    local_cfg = LocalConfig.from_dict(local) if not isinstance(local, LocalConfig) else local
    if mode == "global" and search_options.get("global_field") == "instance":  # the instance descriptor's own mode
        mode = "instance"
        search_options = {k: v for k, v in search_options.items() if k != "global_field"}
    known = ("global", "instance", *LOCAL_MODES)
    if mode not in known:  # before the bench index is built (minutes with local features)
        raise ValueError(f"unknown mode {mode!r} for this bench; choose one of {', '.join(known)}")
    uses_local = mode in LOCAL_MODES or mode == "instance"
    if uses_local and local_cfg is None:
        raise ValueError(f"mode {mode!r} needs local features: pass local='cnn' (CLI: --local cnn)")
    requested, index_dir = len(bench.distractor_paths), None
    if available_only:
        bench, index_dir = available_distractors(bench, encoder, cache_dir, local_cfg)
    index, index_stats, position_of_row = revisitop_index(bench, encoder, cache_dir, show_progress, local_cfg,
                                                          available_only=available_only, index_dir=index_dir)
    counts = {"database": len(bench.db_paths), "distractors": len(bench.distractor_paths),
              "distractors_requested": requested}
    if index_only:
        return {"dataset": Path(data).name, "encoder": encoder, "index_only": True, **counts,
                "indexed": len(index), **index_stats}
    position_of_id = {int(i): int(p) for i, p in zip(index.global_rows.owners, position_of_row)}
    n_total = len(bench.db_paths) + len(bench.distractor_paths)
    searcher = index.local_searcher if uses_local else None
    if mode == "l2g":
        assert searcher is not None  # l2g is one of LOCAL_MODES
        searcher.graph(show_progress=show_progress)  # query-independent, built once per index state

    index.search(image=bench.query_paths[0], k=1, mode=mode, **search_options)  # warm-up
    columns, latencies, rerank, search_ms, recalls, verified = [], [], [], [], [], []
    for path, box in zip(bench.query_paths, bench.query_boxes):
        t0 = time.perf_counter()
        hits = index.search(image=path, bbox=box, k=len(index), mode=mode, **search_options)
        latencies.append((time.perf_counter() - t0) * 1000)
        columns.append(full_ranking(np.array([position_of_id[h.id] for h in hits], dtype=np.int64), n_total))
        if searcher is not None:
            t = hits.timings
            if "rerank_ms" in t:
                rerank.append(t["rerank_ms"])
            search_ms.append(t.get("search_ms", 0.0))
            if mode in ("local", "l2g"):
                q, _ = searcher.query_features(path, box)
                if search_options.get("query_features"):
                    q = q[: int(search_options["query_features"])]
                exact = searcher.exact_top(q)
                approx = searcher.approx(search_options.get("knn"), search_options.get("nprobe"))
                _, approx_pos = approx.search(q, recall_k)
                recalls.append(recall_at_k(approx_pos, exact, recall_k))
                R = searcher.exact_rerank_for(mode, search_options.get("exact_rerank"))
                if R:  # the first stage as searched (the approximate top R re-scored exactly)
                    _, pos = approx.search(q, recall_k, exact_rerank=R)
                    verified.append(recall_at_k(pos, exact, recall_k))
    ranks = np.stack(columns, axis=1)
    if report is not None:
        report.latencies_ms.extend(latencies)
        for name, protocol in revisitop_protocols(bench.gnd.gnd).items():
            report.pr_curves[name] = revisitop_pr(ranks, protocol)
    extra: dict = {}
    if rerank:
        extra["rerank_ms_p50"] = float(np.percentile(rerank, 50))
        extra["rerank_ms_max"] = float(np.max(rerank))
    if search_ms:
        extra["first_stage_ms_p50"] = float(np.percentile(search_ms, 50))
    if recalls:
        extra[f"approx_recall_at_{recall_k}"] = float(np.mean(recalls))
    if verified:  # the first stage as searched: approximate top R re-scored exactly
        extra[f"first_stage_recall_at_{recall_k}"] = float(np.mean(verified))
    if local_cfg is not None:
        extra["local"] = index.info()["local"]
        if baselines:  # the two global descriptors, so every local-mode row has its baselines beside it
            for name, base_mode in (("baseline_global", "global"), ("baseline_instance", "instance")):
                base = ranks if base_mode == mode and not search_options else np.stack(
                    [full_ranking(np.array([position_of_id[h.id] for h in index.search(
                        image=p, bbox=b, k=len(index), mode=base_mode)], dtype=np.int64), n_total)
                     for p, b in zip(bench.query_paths, bench.query_boxes)], axis=1)
                maps = revisitop_map(base, bench.gnd.gnd)
                extra[name] = {k: maps[k] for k in ("map_easy", "map_medium", "map_hard")}
    return {
        "dataset": Path(data).name,
        "mode": mode,
        "encoder": encoder,
        **counts,
        "distractors_partial": len(bench.distractor_paths) < requested,
        "queries": len(bench.query_paths),
        **revisitop_map(ranks, bench.gnd.gnd),
        "query_ms_p50": float(np.percentile(latencies, 50)),
        "query_ms_p95": float(np.percentile(latencies, 95)),
        **extra,
        **{k: v for k, v in search_options.items() if v is not None},
        **index_stats,
    }
