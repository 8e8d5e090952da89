"""Ablation of AE-SVC's loss terms against PCA, by class mAP on Revisited Paris (mini).

What this measures
------------------
Global ``effnet-minilm`` embeddings of the 238 ``imlist`` images of
rparis6k-mini (5 landmarks), optionally with Flickr8k photos as distractors,
are compressed by each projection and searched by cosine. Every landmark image
is a query against the rest of the database (itself excluded); the relevant
images are those of the same landmark (``paris_<landmark>_<n>``);
distractors are never relevant. The score is mAP over the 238 queries
(revisitop's ``compute_map``, the query itself passed as junk), in percent.

Each projection is fitted on the database it searches (landmarks plus that
setting's distractors), without labels, as an index would fit it:

* ``none``     the 238 landmark images alone;
* ``dev1k``    plus the 1,000 Flickr8k dev images;
* ``all7k``    plus all 7,000 Flickr8k images (train and dev).

Rows: no projection (512-d), PCA, PCA with whitening, AE-SVC with the
paper-like weights (reconstruction 25, covariance/orthogonality 1, variance
15, mean 1), the same with each term dropped and with a linear encoder, the
plain autoencoder (reconstruction only, and with mean-centering), the shipped
default weights (25/0.1/0.1/1), and (SS)2D (one student trained once with the
default AE-SVC as teacher, read at every size). Learned rows are averaged over
``--seeds``; all AE rows share AESVC's default architecture and schedule.
Besides mAP the JSON keeps each row's standard deviation of pairwise cosine
similarities and its effective number of dimensions (the two quantities of
the paper's argument), from :mod:`finegrain.compress.analysis`.

Landmark and dev embeddings are the vectors of the cached bench index that
``finegrain bench compress`` / ``bench revisitop`` use (built on first use);
the 6,000 train images (``all7k``) are encoded once and cached as ``.npy``
under ``~/.cache/finegrain/bench/``.

Usage::

    python -m experiments.aesvc_ablation [--data ../shared/data] [--settings none dev1k all7k] \
        [--dims 32 64 128] [--seeds 0 1 2] [--figures DIR] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

from finegrain.compress import AESVC, PCA, SS2D, Projection
from finegrain.compress.analysis import plot_distributions, summarize
from finegrain.eval.metrics import compute_map

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DEFAULT_CACHE = Path.home() / ".cache" / "finegrain" / "bench"
SETTINGS = ("none", "dev1k", "all7k")
SS2D_DIMS = (16, 32, 64, 128, 256)

err = Console(stderr=True)


# --------------------------------------------------------------------------- data
def cached_embeddings(paths: list[Path], encoder: str, cache_dir: Path, tag: str) -> np.ndarray:
    """Global embeddings of ``paths``, read from ``cache_dir`` when the same files were encoded before."""
    from finegrain import encoders

    names = [str(p.resolve()) for p in paths]
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
    stem = cache_dir / f"aesvc-{tag}-{encoder.replace('/', '_').replace(':', '_')}-{len(paths)}-{digest}"
    npy, manifest = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if npy.is_file() and manifest.is_file() and json.loads(manifest.read_text()) == names:
        return np.load(npy)
    err.print(f"encoding {len(paths)} images ({tag}) with {encoder}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    emb = encoders.create(encoder).encode_images(paths, show_progress=True)
    np.save(npy, emb)
    manifest.write_text(json.dumps(names))  # written last: marks the cache complete
    return emb


@dataclass
class BenchData:
    """Landmark embeddings with their labels, and the distractor embeddings of each setting."""

    landmarks: np.ndarray
    labels: np.ndarray
    distractors: dict[str, np.ndarray]


def load_data(data: Path, encoder: str, cache_dir: Path, settings: list[str]) -> BenchData:
    """Landmark and Flickr8k-dev embeddings from the same cached bench index as ``finegrain bench compress``
    (and ``bench revisitop``) with dev distractors, so both report on identical vectors; train: encoded here."""
    from finegrain.bench.revisitop import revisitop_index
    from finegrain.datasets import load_revisitop

    flickr = data / "flickr8k"
    bench = load_revisitop(data / "rparis6k-mini", None, flickr / "images", flickr / "splits" / "dev.txt")
    index, _, position = revisitop_index(bench, encoder, cache_dir, show_progress=True)
    rows = np.zeros((len(bench.db_paths) + len(bench.distractor_paths), index.global_rows.vectors.shape[1]), np.float32)
    rows[position] = index.global_rows.vectors
    n_db = len(bench.db_paths)
    landmarks = rows[:n_db]
    labels = np.array(bench.landmarks)  # paris_defense_000000 -> defense
    split = {s: (flickr / "splits" / f"{s}.txt").read_text().split() for s in ("dev", "train")}
    distractors = {"none": np.zeros((0, landmarks.shape[1]), np.float32)}
    if "dev1k" in settings or "all7k" in settings:
        distractors["dev1k"] = rows[n_db:]
    if "all7k" in settings:
        train = cached_embeddings([flickr / "images" / n for n in split["train"]], encoder, cache_dir, "flickr8k-train")
        distractors["all7k"] = np.concatenate([distractors["dev1k"], train])
    return BenchData(landmarks, labels, {s: distractors[s] for s in settings})


# ------------------------------------------------------------------------ metric
def class_map(landmarks: np.ndarray, distractors: np.ndarray, labels: np.ndarray) -> float:
    """mAP (percent) of every landmark image as a query against all other database rows, by cosine."""
    db = np.concatenate([landmarks, distractors]).astype(np.float64)
    db /= np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    ranks = np.argsort(-(db[:len(landmarks)] @ db.T), axis=1, kind="stable").T
    n = len(landmarks)
    # The query itself is "junk": removed from its ranking, as revisitop removes junk images.
    gnd = [{"ok": np.flatnonzero((labels == labels[q]) & (np.arange(n) != q)), "junk": [q]} for q in range(n)]
    return 100.0 * compute_map(ranks, gnd)[0]


# -------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One projection recipe: ``make(dim, seed)`` builds it unfitted; ``None`` means no projection."""

    name: str
    make: Callable[[int, int], Projection] | None
    seeded: bool = True


def aesvc(recon: float, cov: float, var: float, mean: float, **params) -> Callable[[int, int], Projection]:
    """An AE-SVC row with these loss weights (other parameters: AESVC's defaults unless given)."""
    weights = dict(reconstruction_weight=recon, covariance_weight=cov, variance_weight=var, mean_weight=mean)
    return lambda dim, seed: AESVC(dim, random_state=seed, **weights, **params)


ROWS = [
    Row("no projection (512-d)", None, seeded=False),
    Row("PCA", lambda d, s: PCA(d), seeded=False),
    Row("PCA whiten", lambda d, s: PCA(d, whiten=True), seeded=False),
    Row("AE-SVC 25/1/15/1 (paper-like)", aesvc(25, 1, 15, 1)),
    Row("  - reconstruction (0/1/15/1)", aesvc(0, 1, 15, 1)),
    Row("  - orthogonality (25/0/15/1)", aesvc(25, 0, 15, 1)),
    Row("  - unit variance (25/1/0/1)", aesvc(25, 1, 0, 1)),
    Row("  - mean-centering (25/1/15/0)", aesvc(25, 1, 15, 0)),
    Row("  linear, no hidden layer", aesvc(25, 1, 15, 1, hidden_sizes=())),
    Row("AE reconstruction only (25/0/0/0)", aesvc(25, 0, 0, 0)),
    Row("AE reconstruction + mean (25/0/0/1)", aesvc(25, 0, 0, 1)),
    Row("AE-SVC 25/0.1/0.1/1 (default)", aesvc(25, 0.1, 0.1, 1)),
]
SS2D_ROW = "(SS)2D, AE-SVC teacher, one model"


@dataclass
class Cell:
    """Results of one row at one setting and size, over seeds."""

    maps: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    similarity_std: list[float] = field(default_factory=list)
    effective_dims: list[float] = field(default_factory=list)

    def add(self, value: float, seconds: float, Z: np.ndarray, rng: np.random.Generator) -> None:
        self.maps.append(value)
        self.seconds.append(seconds)
        s = summarize(Z[rng.permutation(len(Z))[:2000]])
        self.similarity_std.append(s.similarity_std)
        self.effective_dims.append(s.effective_dims)

    def as_dict(self) -> dict:
        return {"map": float(np.mean(self.maps)), "map_std": float(np.std(self.maps)), "runs": len(self.maps),
                "maps": [round(m, 2) for m in self.maps], "fit_seconds": float(np.mean(self.seconds)),
                "similarity_std": float(np.mean(self.similarity_std)), "effective_dims": float(np.mean(self.effective_dims))}


def run_setting(bench: BenchData, setting: str, dims: list[int], seeds: list[int], with_ss2d: bool) -> dict[str, dict[int, Cell]]:
    """Fit every row on the setting's database and score it; returns row -> dim -> cell."""
    lm, dis = bench.landmarks, bench.distractors[setting]
    fit_data = np.concatenate([lm, dis])
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, Cell]] = {}
    for row in ROWS:
        out[row.name] = {}
        for dim in dims:
            cell = out[row.name][dim] = Cell()
            for seed in (seeds if row.seeded else seeds[:1]):
                t0 = time.perf_counter()
                if row.make is None:
                    z_lm, z_dis = lm, dis
                else:
                    p = row.make(dim, seed).fit(fit_data)
                    z_lm, z_dis = p.transform(lm), p.transform(dis)
                seconds = time.perf_counter() - t0  # fit + transform, not the scoring
                cell.add(class_map(z_lm, z_dis, bench.labels), seconds, np.concatenate([z_lm, z_dis]), rng)
            err.print(f"{setting:6s} {dim:4d} {row.name:34s} {np.mean(cell.maps):6.2f}")
    if with_ss2d:
        out[SS2D_ROW] = {dim: Cell() for dim in dims}
        size = max(d for d in SS2D_DIMS if d <= fit_data.shape[1])
        for seed in seeds:
            t0 = time.perf_counter()
            student = SS2D(n_components=size, dims=sorted({*SS2D_DIMS, *dims}), random_state=seed).fit(fit_data)
            seconds = time.perf_counter() - t0  # one fit serves every size
            for dim in dims:
                z_lm, z_dis = student.transform(lm, dim=dim), student.transform(dis, dim=dim)
                out[SS2D_ROW][dim].add(class_map(z_lm, z_dis, bench.labels), seconds, np.concatenate([z_lm, z_dis]), rng)
        err.print(f"{setting:6s} {SS2D_ROW}: " + ", ".join(f"{d}: {np.mean(c.maps):.2f}" for d, c in out[SS2D_ROW].items()))
    return out


def print_table(setting: str, n_db: int, results: dict[str, dict[int, Cell]], dims: list[int]) -> None:
    table = Table(title=f"class mAP (%), database {n_db} images ({setting}); relative to PCA in brackets")
    table.add_column("projection")
    for dim in dims:
        table.add_column(f"{dim}-d", justify="right")
    table.add_column("fit s", justify="right")  # fit + transform of the whole database, one thread
    pca = {dim: np.mean(results["PCA"][dim].maps) for dim in dims}
    for name, cells in results.items():
        values = []
        for dim in dims:
            c = cells[dim]
            spread = f" ±{np.std(c.maps):.1f}" if len(c.maps) > 1 else ""
            values.append(f"{np.mean(c.maps):.1f}{spread} ({100 * (np.mean(c.maps) / pca[dim] - 1):+.1f}%)")
        table.add_row(name, *values, f"{np.mean([np.mean(cells[d].seconds) for d in dims]):.1f}")
    Console(width=200).print(table)


def write_figures(bench: BenchData, setting: str, dim: int, out: Path) -> dict:
    """Similarity-distribution and per-dimension-variance figures: input vs PCA vs AE-SVC (paper-like and default)."""
    X = np.concatenate([bench.landmarks, bench.distractors[setting]])
    projections = {f"PCA {dim}": PCA(dim).fit(X), f"AE-SVC 25/1/15/1 {dim}": aesvc(25, 1, 15, 1)(dim, 0).fit(X),
                   f"AE-SVC default {dim}": AESVC(dim).fit(X)}
    fig = plot_distributions(X, projections, out, prefix=f"aesvc-{setting}-{dim}")
    return {"similarity": str(fig.similarity_png), "variance": str(fig.variance_png),
            "summary": {k: vars(v) for k, v in fig.summary.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--encoder", default="effnet-minilm")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--dims", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no-ss2d", action="store_true", help="skip the (SS)2D row")
    parser.add_argument("--figures", type=Path, help="write similarity / variance figures (PCA vs AE-SVC) here")
    parser.add_argument("--figures-only", action="store_true", help="write the figures, skip the ablation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave cores to others)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy/scipy BLAS too: idle-spinning BLAS threads slow a busy machine down

    bench = load_data(args.data, args.encoder, args.cache_dir, args.settings)
    report = {"benchmark": "aesvc_ablation", "encoder": args.encoder, "queries": len(bench.landmarks),
              "dims": args.dims, "seeds": args.seeds, "settings": {}}
    start = time.perf_counter()
    for setting in ([] if args.figures_only else args.settings):
        results = run_setting(bench, setting, args.dims, args.seeds, not args.no_ss2d)
        n_db = len(bench.landmarks) + len(bench.distractors[setting])
        report["settings"][setting] = {"database": n_db,
                                       "rows": {name: {str(d): c.as_dict() for d, c in cells.items()}
                                                for name, cells in results.items()}}
        if not args.json:
            print_table(setting, n_db, results, args.dims)
    if args.figures:
        report["figures"] = write_figures(bench, args.settings[-1], max(args.dims), args.figures)
    report["seconds"] = time.perf_counter() - start
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
