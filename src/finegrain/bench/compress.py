"""Compact embeddings benchmark: PCA vs AE-SVC vs (SS)2D at several sizes, image-to-image.

Two scores per method and size, on a Revisited Oxford/Paris-style folder
(``--data``/``--gnd``/``--distractors`` mean what they mean for
``finegrain bench revisitop``; the database embeddings come from the same
cached bench index):

* ``map_medium``: the ground truth's cropped image queries against the
  database plus distractors, revisitop mAP under the Medium protocol;
* ``class_map``: every database image of the ground truth's ``imlist`` as a
  query against all other database and distractor images; relevant are the
  images of the same landmark (the second ``_``-separated part of the file
  name), the query itself is junk; distractors are never relevant.

Each projection is fitted, without labels, on the database and distractor
embeddings only (never on the query crops), then applied to database and
queries alike; scores are cosines of the projected, L2-normalised rows.
PCA and AE-SVC are fitted once per size; (SS)2D is fitted once at the largest
size with every requested size nested in it, and read at each size.

Optionally (``text_data``) a text-to-image check on a Flickr8k split: the
projection is fitted on that split's image embeddings and applied to both the
images and the caption embeddings (``effnet-minilm`` maps both towers into
one joint space), reporting caption -> image Recall@1/5/10.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from ..datasets import RevisitopSet, load_flickr8k, load_revisitop
from ..eval.metrics import compute_map, recall_at_k, revisitop_map
from .common import bench_index, flickr8k_index_name
from .revisitop import revisitop_index

if TYPE_CHECKING:
    from ..compress import SS2D

METHODS = ("pca", "aesvc", "aesvc-paper", "ss2d")
DEFAULT_METHODS = ("pca", "aesvc", "ss2d")
#: Bench method names that are a registered projection with fixed parameters.
VARIANTS = {"aesvc-paper": ("aesvc", {"loss": "paper"})}


def cosine_ranks(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """(n_db, n_queries) database positions by decreasing cosine (revisitop's ``ranks`` layout)."""
    q = _unit(queries)
    db = _unit(database)
    return np.argsort(-(db @ q.T), axis=0, kind="stable")


def class_map(database: np.ndarray, labels: Sequence[str] | np.ndarray, n_labelled: int | None = None) -> float:
    """mAP (percent) of each labelled database row as a query against all other rows, relevant = same label.

    ``database`` holds the ``len(labels)`` labelled rows first, then
    distractors (never relevant). The query itself is passed as junk, so it is
    removed from its own ranking.
    """
    labels = np.asarray(labels)
    n = len(labels) if n_labelled is None else n_labelled
    ranks = cosine_ranks(database[:n], database)
    idx = np.arange(n)
    gnd = [{"ok": np.flatnonzero((labels == labels[q]) & (idx != q)), "junk": [q]} for q in range(n)]
    return 100.0 * compute_map(ranks, gnd)[0]


def fit_projections(method: str, dims: Sequence[int], X: np.ndarray, seed: int = 0, ss2d_teacher: str = "aesvc",
                    **params):
    """``{dim: (projection, transform)}``: one fit per size, or one (SS)2D fit serving every size.

    ``ss2d_teacher``: ``"aesvc"`` (the paper's pipeline) or ``"input"`` (the
    input's own cosine space). ``method`` ``"aesvc-paper"`` is
    ``AESVC(loss="paper")`` (the paper's loss form and weights).
    """
    from ..compress import create_projection

    if method == "ss2d":
        top = max(dims)
        teacher = None if ss2d_teacher == "input" else ss2d_teacher
        unfitted = create_projection("ss2d", top, dims=sorted(set(dims)), random_state=seed, teacher=teacher,
                                     **params)
        student = cast("SS2D", unfitted).fit(X)
        return {d: (student, lambda Z, d=d: student.transform(Z, dim=d)) for d in dims}
    name, fixed = VARIANTS.get(method, (method, {}))
    out = {}
    for d in dims:
        p = create_projection(name, d, random_state=seed, **fixed, **params).fit(X)
        out[d] = (p, p.transform)
    return out


def bench_vectors(bench: RevisitopSet, encoder: str, cache_dir: Path, dims: Sequence[int], show_progress: bool,
                  available_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``(X, present, queries, index_stats)``: the bench index's global vector of every benchmark position
    (database then distractors; zero where an image failed, ``present`` False), and the cropped queries' vectors.

    ``available_only``: use the cached index as it is (see :func:`revisitop_index`); ``bench`` must then
    already be restricted to the distractors it holds.
    """
    index, index_stats, position_of_row = revisitop_index(bench, encoder, cache_dir, show_progress,
                                                          available_only=available_only)
    n_db, n_total = len(bench.db_paths), len(bench.db_paths) + len(bench.distractor_paths)
    X = np.zeros((n_total, index.global_rows.vectors.shape[1]), np.float32)
    present = np.zeros(n_total, bool)
    X[position_of_row] = index.global_rows.vectors
    present[position_of_row] = True
    if not present[:n_db].all():
        raise ValueError(f"{int((~present[:n_db]).sum())} database images could not be indexed")
    too_big = [d for d in dims if d > X.shape[1]]
    if too_big:
        raise ValueError(f"dims {too_big} are larger than the {X.shape[1]}-dim embeddings of {encoder}")
    queries = np.stack([index.embed_query(image=p, bbox=b) for p, b in zip(bench.query_paths, bench.query_boxes)])
    return X, present, queries, index_stats


def run_compress_bench(data: str | Path, gnd: str | Path | None = None, distractors: str | Path | None = None,
                       distractor_list: str | Path | None = None, methods: Sequence[str] = DEFAULT_METHODS,
                       dims: Sequence[int] = (16, 32, 64, 128, 256), encoder: str = "effnet-minilm",
                       cache_dir: str | Path | None = None, plots: str | Path | None = None,
                       text_data: str | Path | None = None, text_split: str = "dev", seed: int = 0,
                       show_progress: bool = True, log=None, ss2d_teacher: str = "aesvc") -> dict:
    """Run the benchmark; returns ``{"results": [...], ...}`` with mAPs in percent.

    ``results`` has one row per (method, dim) plus a ``none`` row at the
    input size: ``method``, ``dim``, ``map_medium``, ``class_map``,
    ``bytes_per_image`` (float32 storage of the searched vector),
    ``fit_seconds`` (wall time of the fit(s) that produced it).
    """
    from ..progress import progress_bar

    if ss2d_teacher not in ("aesvc", "input"):
        raise ValueError(f"ss2d_teacher must be 'aesvc' or 'input', got {ss2d_teacher!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 1:
        raise ValueError(f"dims must be positive integers, got {dims}")
    log = log or (lambda message: None)
    bench = load_revisitop(data, gnd, distractors, distractor_list)
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "finegrain" / "bench")
    X, present, queries, index_stats = bench_vectors(bench, encoder, cache_dir, dims, show_progress)
    n_db = len(bench.db_paths)
    input_dim = X.shape[1]
    fit_rows = X[present]  # database + distractors that were indexed; never the query crops
    labels = bench.landmarks

    def score(db: np.ndarray, q: np.ndarray) -> tuple[float, float]:
        db = db.copy()
        db[~present] = 0.0  # failed images rank last (zero cosine) rather than vanish
        ranks = cosine_ranks(q, db)
        return revisitop_map(ranks, bench.gnd.gnd)["map_medium"], class_map(db, labels, n_db)

    results = []
    m, c = score(X, queries)
    results.append({"method": "none", "dim": input_dim, "map_medium": m, "class_map": c,
                    "bytes_per_image": 4 * input_dim, "fit_seconds": 0.0})
    fitted: dict[str, dict] = {}
    with progress_bar(len(methods), "fitting projections", show_progress) as bar:
        for method in methods:
            t0 = time.perf_counter()
            fitted[method] = fit_projections(method, dims, fit_rows, seed, ss2d_teacher)
            seconds = time.perf_counter() - t0
            for d in dims:
                _, transform = fitted[method][d]
                m, c = score(transform(X), transform(queries))
                results.append({"method": method, "dim": d, "map_medium": m, "class_map": c,
                                "bytes_per_image": 4 * d,
                                "fit_seconds": seconds if method == "ss2d" else None})
                log(f"{method:6s} {d:4d}  mAP-M {m:6.2f}  class mAP {c:6.2f}")
            if method != "ss2d":  # per-size fit times
                for row, d in zip(results[-len(dims):], dims):
                    row["fit_seconds"] = float(getattr(fitted[method][d][0], "fit_seconds_", seconds / len(dims)))
            bar.advance(1)
    report = {
        "benchmark": "compress",
        "dataset": Path(data).name,
        "encoder": encoder,
        "database": n_db,
        "distractors": len(bench.distractor_paths),
        "queries": len(bench.query_paths),
        "fitted_on": int(len(fit_rows)),
        "ss2d_teacher": ss2d_teacher,
        **{k: v for k, v in index_stats.items() if k == "index_reused"},
    }
    if plots is not None:
        report["plots"] = write_plots(fit_rows, dims, fitted, Path(plots), seed)
    if text_data is not None:
        report["text_to_image"] = text_check(text_data, text_split, methods, dims, encoder, cache_dir, seed,
                                             show_progress, log, ss2d_teacher)
    report["results"] = results  # last key: the JSON line ends with the results list
    return report


def write_plots(X: np.ndarray, dims: Sequence[int], fitted: dict[str, dict], out: Path, seed: int = 0) -> dict:
    """Pairwise-cosine distribution and per-dimension variance figures: input vs PCA vs AE-SVC (vs SS2D)."""
    from ..compress import AESVC, PCA
    from ..compress.analysis import plot_distributions

    dim = max([d for d in dims if d <= 128] or [min(dims)])
    projections = {}
    for method, label in (("pca", "PCA"), ("aesvc", "AE-SVC"), ("ss2d", "SS2D")):
        if method in fitted and dim in fitted[method]:
            _, transform = fitted[method][dim]
            projections[f"{label} {dim}"] = transform(X)
    if not any(k.startswith("PCA") for k in projections):
        projections[f"PCA {dim}"] = PCA(dim).fit_transform(X)
    if not any(k.startswith("AE-SVC") for k in projections):
        projections[f"AE-SVC {dim}"] = AESVC(dim, random_state=seed).fit_transform(X)
    report = plot_distributions(X, projections, out, prefix=f"compress-{dim}")
    return {"similarity_png": str(report.similarity_png), "variance_png": str(report.variance_png),
            "summary": {k: vars(v) for k, v in report.summary.items()}}


def text_check(data: str | Path, split: str, methods: Sequence[str], dims: Sequence[int], encoder: str,
               cache_dir: Path, seed: int = 0, show_progress: bool = True, log=None,
               ss2d_teacher: str = "aesvc") -> list[dict]:
    """Caption -> image Recall@1/5/10 (percent) on a Flickr8k split, projection fitted on its images."""
    log = log or (lambda message: None)
    ds = load_flickr8k(data, split)
    paths = ds.image_paths()
    name = flickr8k_index_name(split, encoder)  # shared with `bench flickr8k`
    index, _ = bench_index(paths, encoder, cache_dir / name, show_progress)
    row_of_path = {index.records[int(i)].path: r for r, i in enumerate(index.global_rows.owners)}
    rows = [row_of_path.get(str(p.resolve()), row_of_path.get(str(p.absolute()))) for p in paths]
    if any(r is None for r in rows):
        raise ValueError(f"{sum(r is None for r in rows)} images of the {split} split could not be indexed")
    images = np.asarray(index.global_rows.vectors)[cast(list[int], rows)]  # no None: checked above
    texts = index.encoder.encode_texts(ds.captions, batch_size=256)
    target = np.asarray(ds.caption_image)

    def recalls(img: np.ndarray, txt: np.ndarray) -> dict:
        sims = _unit(txt) @ _unit(img).T
        true = sims[np.arange(len(target)), target]
        rank = (sims > true[:, None]).sum(axis=1).astype(np.float64)
        return {f"r{k}": 100.0 * recall_at_k(rank, k) for k in (1, 5, 10)}

    out = [{"method": "none", "dim": images.shape[1], **recalls(images, texts)}]
    for method in methods:
        for d, (_, transform) in fit_projections(method, dims, images, seed, ss2d_teacher).items():
            out.append({"method": method, "dim": d, **recalls(transform(images), transform(texts))})
            log(f"text->image {method:6s} {d:4d}  R@1 {out[-1]['r1']:5.2f}  R@10 {out[-1]['r10']:5.2f}")
    return out


def _unit(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float32)
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
