"""How a projection changes the cosine space: similarity distributions and per-dimension variance.

Two figures from the AE-SVC paper's argument (Omama et al.):

* the distribution of pairwise cosine similarities before and after a
  projection (their Fig. 3): the constraints narrow it, which the paper links
  to better retrieval;
* the variance of each embedding dimension, sorted (the point of their
  Fig. 2): after PCA a few dimensions carry most of the variance and so
  dominate every cosine; AE-SVC's unit-variance constraint flattens this.

Both are measured on L2-normalised rows, the space search actually scores in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .base import Projection, _as_matrix


@dataclass
class SpaceSummary:
    """Numbers behind the two figures for one embedding space."""

    dim: int
    similarity_mean: float  #: mean cosine over distinct pairs
    similarity_std: float  #: its standard deviation (what AE-SVC lowers)
    variance_top_share: float  #: share of the total variance in the largest-variance dimension
    variance_max_over_min: float  #: spread between the largest and smallest dimension variance
    effective_dims: float  #: participation ratio (sum v)^2 / sum v^2: dim when all are equal, 1 when one dominates


@dataclass
class AnalysisReport:
    """Paths of the written figures and one :class:`SpaceSummary` per space (``"input"`` first)."""

    similarity_png: Path
    variance_png: Path
    summary: dict[str, SpaceSummary] = field(default_factory=dict)


def summarize(Z: np.ndarray) -> SpaceSummary:
    """Similarity and per-dimension variance numbers of rows ``Z`` (L2-normalised here)."""
    Z = _normalized(Z)
    sims = _pair_similarities(Z)
    var = np.sort(Z.var(axis=0, dtype=np.float64))[::-1]
    total = var.sum()
    return SpaceSummary(
        dim=Z.shape[1],
        similarity_mean=float(sims.mean()),
        similarity_std=float(sims.std()),
        variance_top_share=float(var[0] / total) if total > 0 else 0.0,
        variance_max_over_min=float(var[0] / max(var[-1], 1e-12)),
        effective_dims=float(total**2 / max((var**2).sum(), 1e-24)),
    )


def plot_distributions(
    X: np.ndarray,
    projections: Mapping[str, Projection | np.ndarray],
    out_dir: str | os.PathLike,
    prefix: str = "compress",
    max_samples: int = 2000,
    random_state: int = 0,
) -> AnalysisReport:
    """Write ``<prefix>-similarity.png`` and ``<prefix>-variance.png`` comparing ``X`` with its projections.

    Parameters
    ----------
    X : (n, dim) array
        The embeddings before projection (labelled ``"input"``).
    projections : mapping of name to fitted Projection or (n, d) array
        A projection is applied to ``X``; an array is taken as already projected rows of ``X``.
    out_dir : path
        Folder for the figures (created if needed).
    max_samples : int
        Rows used (a fixed random subset when ``X`` is larger): pairs grow quadratically.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    X = _as_matrix(X)
    rows = (np.random.default_rng(random_state).permutation(len(X))[:max_samples] if len(X) > max_samples
            else slice(None))
    spaces = {"input": X[rows]}
    for name, p in projections.items():
        Z = p.transform(X[rows]) if isinstance(p, Projection) else _as_matrix(p)[rows]
        if len(Z) != len(spaces["input"]):
            raise ValueError(f"{name!r} has {len(Z)} rows, expected one per row of X")
        spaces[name] = Z
    summary = {name: summarize(Z) for name, Z in spaces.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, Z in spaces.items():
        s = summary[name]
        ax.hist(_pair_similarities(_normalized(Z)), bins=100, density=True, histtype="step", linewidth=1.4,
                label=f"{name} ({s.dim}-d): mean {s.similarity_mean:.3f}, std {s.similarity_std:.3f}")
    similarity_png = _save(fig, ax, out / f"{prefix}-similarity.png", "cosine similarity between pairs", "density",
                           "Pairwise cosine similarities")

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, Z in spaces.items():
        var = np.sort(_normalized(Z).var(axis=0, dtype=np.float64))[::-1]
        s = summary[name]
        ax.plot(np.arange(1, len(var) + 1), var / var.sum(), linewidth=1.4,
                label=f"{name} ({s.dim}-d): effective dims {s.effective_dims:.1f}")
    ax.set_yscale("log")
    ax.set_xscale("log")
    variance_png = _save(fig, ax, out / f"{prefix}-variance.png", "dimension (sorted by variance)",
                         "share of total variance", "Per-dimension variance")
    return AnalysisReport(similarity_png, variance_png, summary)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label one figure, write it as a PNG and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _normalized(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float64)
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def _pair_similarities(Z: np.ndarray) -> np.ndarray:
    """Cosines of all distinct pairs of (already normalised) rows."""
    if len(Z) < 2:
        raise ValueError("need at least 2 rows to compare pairs")
    i, j = np.triu_indices(len(Z), k=1)
    return (Z @ Z.T)[i, j]
