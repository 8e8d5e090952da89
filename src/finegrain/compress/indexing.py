"""A projection stored inside an index: fitted on its own embeddings, applied to every later vector.

``finegrain compress --index PATH --method aesvc --dim 128`` (or
:meth:`finegrain.Index.compress`) does, under the index's writer lock:

1. fit the projection on the index's live ``global`` vectors (the original,
   un-projected ones, which are always kept);
2. write the fitted projection to ``projection/<name>.safetensors`` and the
   projected rows of every live image as a new chunk of the ``compressed``
   vector field (both written temp-then-rename, fsynced);
3. in one catalog transaction: drop the previous ``compressed`` chunks, add
   the new one and set the ``projection`` setting (method, sizes, file);
4. delete the previous projection's files.

A run killed before step 3 leaves the index as it was (the new files are
orphans, swept by the next writer); after it, the new projection is complete.
From then on global search scores against the ``compressed`` field, queries
(text or image) are projected with the stored projection, and
``finegrain index`` writes a ``compressed`` row beside every new ``global``
row in the same commit. Re-running ``compress`` with another method fits
again on the original vectors; ``method="none"`` goes back to them.
Multi-vector (segment) search modes keep using the original joint space.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..store.vectors import FieldRows, new_chunk_name

if TYPE_CHECKING:  # pragma: no cover
    from ..store.snapshot import Snapshot
    from ..store.writer import Writer
    from .base import Projection

#: Catalog setting holding the active projection (absent or null: none).
META_KEY = "projection"
#: Vector field of the projected global vectors.
FIELD = "compressed"
#: Folder (inside the index) of projection files.
PROJECTION_DIR = "projection"
#: The field a projection is fitted on and applied to.
SOURCE_FIELD = "global"
#: What ``compress`` accepts (``none`` removes the projection).
METHODS = ("pca", "aesvc", "ss2d", "none")
#: Rows projected per batch when re-encoding stored vectors.
BATCH_ROWS = 8192


def projection_path(root: Path, info: dict) -> Path:
    """Where the projection described by catalog setting ``info`` is stored."""
    name = str(info["file"])
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"bad projection file name {name!r} in the index catalog")
    return root / PROJECTION_DIR / name


def load_index_projection(root: Path, info: dict) -> Projection:
    """Read the projection the catalog setting ``info`` points to (``FileNotFoundError`` if absent)."""
    from .base import load_projection

    path = projection_path(root, info)
    if not path.exists():
        raise FileNotFoundError(path)
    projection = load_projection(path)
    if projection.method != info["method"] or projection.n_components_ != int(info["dim"]):
        raise ValueError(f"{path} holds a {projection.method} projection to {projection.n_components_} dims, "
                         f"but the catalog says {info['method']} to {info['dim']}")
    return projection


def nested_dims(info: dict | None) -> tuple[int, ...]:
    """The sizes a search may ask for with ``dim=`` (SS2D only; empty otherwise)."""
    if not info or info.get("method") != "ss2d":
        return ()
    return tuple(int(d) for d in info.get("dims", [info["dim"]]))


def check_search_dim(info: dict | None, dim: int | None) -> int | None:
    """Validate a search-time ``dim``; returns None when the full stored size is meant."""
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ValueError(f"dim must be an integer, got {dim!r}")
    dim = int(dim)
    if not info:
        raise ValueError("this index is not compressed; dim= needs an index compressed with "
                         "`finegrain compress --method ss2d`")
    if info["method"] != "ss2d":
        raise ValueError(f"dim= picks a nested size of an SS2D index, but this index is compressed with "
                         f"{info['method']} to {info['dim']} dims; re-run `finegrain compress --method ss2d` to use it")
    if not 1 <= dim <= int(info["dim"]):
        raise ValueError(f"dim must be from 1 to {info['dim']} for this SS2D index "
                         f"(trained sizes: {', '.join(map(str, nested_dims(info)))}), got {dim}")
    return None if dim == int(info["dim"]) else dim


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Leading ``dim`` columns of ``vectors``, rows re-normalised to unit length."""
    v = np.ascontiguousarray(vectors[:, :dim], dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def project_rows(projection: Projection, vectors: np.ndarray, show_progress: bool = False) -> np.ndarray:
    """``projection.transform`` in batches (bounded memory for memory-mapped inputs), full stored size."""
    from ..progress import progress_bar

    out = np.empty((len(vectors), projection.n_components_), np.float32)
    with progress_bar(len(vectors), "projecting", show_progress) as bar:
        for start in range(0, len(vectors), BATCH_ROWS):
            part = np.asarray(vectors[start:start + BATCH_ROWS], dtype=np.float32)
            out[start:start + len(part)] = projection.transform(part)
            bar.advance(len(part))
    return out


def compress_index(writer: Writer, snapshot: Snapshot, method: str, dim: int | None = None,
                   params: dict[str, Any] | None = None, show_progress: bool = False) -> dict:
    """Fit ``method`` on the index's original global vectors and make it the index's projection.

    Parameters
    ----------
    writer : Writer
        The index's writer (holding its lock).
    snapshot : Snapshot
        The committed state, read under that lock.
    method : {"pca", "aesvc", "ss2d", "none"}
        Projection to fit; ``"none"`` removes the current projection.
    dim : int
        Output size (for ``ss2d`` the largest nested size); required unless ``method="none"``.
    params : dict, optional
        Extra constructor parameters of the projection class (for example ``n_steps``).
    show_progress : bool
        Rich progress while fitting and re-encoding.

    Returns
    -------
    dict
        The new ``projection`` setting (also in ``Index.info()["projection"]``), or ``{}`` for ``none``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "none" and (dim is None or isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
        raise ValueError(f"--dim must be a positive integer, got {dim!r}")
    from . import storage as compact_storage

    root = writer.path
    stored = dict(snapshot.settings.get(compact_storage.META_KEY) or {})
    quantised = stored.pop(FIELD, None)  # the projected rows' own quantisation (`compress --field global`)
    drop = [FIELD, compact_storage.compact_name(FIELD)]
    if method == "none":  # the projection goes, and with it the quantisation of its rows (same transaction)
        writer.replace_fields(drop, [], {META_KEY: None, **({compact_storage.META_KEY: stored or None}
                                                            if quantised else {})})
        sweep_projection_files(root, None)
        compact_storage.sweep_storage_files(root, stored)
        return {}
    if quantised:
        raise ValueError(f"this index's projected global rows are stored {quantised.get('quantize')} (compress "
                         "--field global); change both with `finegrain compress --field global --method M --dim D "
                         "--quantize Q`, or undo the quantisation first (`--field global --quantize none`)")
    info, chunk, _ = build_projection(writer, snapshot, method, dim, params, show_progress)
    writer.replace_fields([FIELD], [chunk], {META_KEY: info})
    sweep_projection_files(root, info)
    return info


def build_projection(writer: Writer, snapshot: Snapshot, method: str, dim: int | None,
                     params: dict[str, Any] | None = None, show_progress: bool = False
                     ) -> tuple[dict, tuple[str, str, int], FieldRows]:
    """Steps 1-2 of :func:`compress_index`, no catalog change: fit ``method`` on the live global rows, write the
    projection file and the ``compressed`` chunk. Returns the ``projection`` setting, the chunk and its rows."""
    from . import create_projection

    assert dim is not None  # checked by the callers for every method but none
    root = writer.path
    source = snapshot.field(SOURCE_FIELD)
    input_dim = source.vectors.shape[1]
    if dim > input_dim:
        raise ValueError(f"--dim {dim} is larger than the index's {input_dim}-dim embeddings")
    if len(source) < 2:
        raise ValueError(f"the index holds {len(source)} image(s); compress needs at least 2 to fit on")
    X = np.asarray(source.vectors, dtype=np.float32)
    projection = create_projection(method, int(dim), **(params or {}))
    start = time.perf_counter()
    _fit(projection, X, show_progress)
    fit_seconds = time.perf_counter() - start
    name = f"{new_chunk_name()}-{method}{dim}.safetensors"
    path = root / PROJECTION_DIR / name
    projection.save(path)
    fsync_file(path)
    rows = FieldRows(project_rows(projection, X, show_progress), source.owners)
    chunk = writer.write_rows(FIELD, rows)
    info = {
        "method": method,
        "dim": int(projection.n_components_),
        "input_dim": int(input_dim),
        "source_field": SOURCE_FIELD,
        "file": name,
        "fitted_on": int(len(X)),
        "fit_seconds": round(fit_seconds, 3),
    }
    if method in ("aesvc", "ss2d"):  # how it was trained, as `finegrain info` shows it
        learned: Any = projection  # AESVC or SS2D: both have these parameters
        info["batch_size"] = int(learned.batch_size)
        info["n_steps"] = int(getattr(learned, "n_steps_", None) or learned.n_steps)  # AE-SVC's "auto" resolved
    if method == "aesvc":  # which loss form trained it (AESVC's ``loss``: finegrain's or the paper's)
        info["loss"] = str(getattr(projection, "loss", "finegrain"))
    if method == "ss2d":
        info["dims"] = [int(d) for d in projection.dims_]
        teacher = projection.teacher
        info["teacher"] = "input" if teacher is None else getattr(teacher, "method", str(teacher))
    return info, chunk, rows


def _fit(projection: Projection, X: np.ndarray, show_progress: bool) -> None:
    """Fit, with a rich spinner on a terminal (training has a fixed step count, a few seconds to a minute)."""
    import sys

    if not (show_progress and sys.stderr.isatty()):
        projection.fit(X)
        return
    from rich.console import Console

    with Console(stderr=True).status(f"fitting {projection.method} on {len(X)} embeddings ..."):
        projection.fit(X)


def sweep_projection_files(root: Path, info: dict | None) -> int:
    """Delete projection files other than the one catalog setting ``info`` names (crash leftovers, replaced ones).

    Call it under the writer lock with the committed setting; returns how many files it deleted.
    """
    folder = root / PROJECTION_DIR
    if not folder.is_dir():
        return 0
    keep = info["file"] if info else None
    removed = 0
    for path in folder.iterdir():
        if path.name != keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def fsync_file(path: Path) -> None:
    """fsync a file and then its folder (so a rename into it is durable too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
