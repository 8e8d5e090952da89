"""Compact storage of an index's vector fields: a projection, a quantisation, or both, per field.

``finegrain compress --index IDX --field segments --method pca --dim 64 --quantize int8``
(or :meth:`finegrain.Index.compress` with ``field=``) does, under the index's writer lock:

1. fit the projection (``pca``, ``aesvc``, ``ss2d``; optional) on the field's original rows (a
   random sample of at most :data:`FIT_ROWS`), then the int8 quantiser (per-dimension offset and
   scale from the minimum and maximum of each projected dimension over the same sample);
2. write the projection and the quantiser under ``storage/`` and every live row, projected and
   quantised, as one chunk of the field ``<field>-compact`` (same owners and attributes:
   levels, boxes), all temp-then-rename and fsynced;
3. in one catalog transaction: replace the ``<field>-compact`` chunks, set the field's entry of the
   ``storage`` setting and, with ``drop_originals``, drop the original chunks;
4. delete storage files that no setting names.

A run killed before step 3 leaves the index as it was (the new files are orphans that the next
writer sweeps). From then on every commit (``finegrain index``, ``watch``, the Ray engine) writes
the compact rows of new images in the same commit as their originals (or instead of them, once
dropped), ``compact`` rewrites them like any field, and the retrievers score the compact rows
(:func:`scoring`): queries are projected with the field's projection, int8 rows are converted to
float32 in blocks of :data:`SCORE_BLOCK_ROWS` rows and scored with the scale folded into the query.
``method="none", quantize="none"`` goes back to the originals (impossible once they are dropped).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..store.vectors import FieldRows, new_chunk_name
from .indexing import fsync_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..store.snapshot import Snapshot
    from ..store.writer import Writer
    from .base import Projection

T = TypeVar("T")

#: Catalog setting: ``{field: {...}}`` for every field stored compact.
META_KEY = "storage"
#: Folder (inside the index) of the fields' projection and quantiser files.
STORAGE_DIR = "storage"
#: The compact rows of field ``F`` are the field ``F`` + this suffix.
SUFFIX = "-compact"
#: Fields that can be stored compact (``global``, ``local``, ``instance``: see :mod:`.coded`).
FIELDS = ("segments", "objects", "objects_mean", "objects_refined", "global", "local", "instance")
#: Fields with their own rules (:func:`.coded.check_quantize_only`): ``local`` and ``instance`` take ``--quantize
#: int8`` only; ``global`` keeps its originals, and its projection is the global projection's.
QUANTIZE_ONLY = ("global", "local", "instance")
METHODS = ("none", "pca", "aesvc", "ss2d")
QUANTIZE = ("none", "float16", "int8")
#: The projection and the quantiser are fitted on at most this many rows (a seeded random sample).
FIT_ROWS = 100_000
#: Rows projected and quantised at a time when encoding (bounded temporary memory).
BLOCK_ROWS = 65_536
#: Rows scored per torch matmul in :func:`dot_rows` (2,048-4,096 measured fastest on this machine's cache).
SCORE_BLOCK_ROWS = 4_096
#: int8 codes span -127..127 (symmetric around each dimension's offset).
INT8_LEVELS = 127


def compact_name(field: str) -> str:
    """The field holding ``field``'s compact rows."""
    return field + SUFFIX


@dataclass(frozen=True)
class Codec:
    """How a field's stored rows relate to the joint space: projection, then quantisation (either optional).

    A stored int8 row ``c`` stands for ``offset + scale * c``; its score against a projected query ``q``
    is ``c . (scale * q) + offset . q``, so rows are never dequantised as a whole.
    """

    projection: Projection | None = None
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    dtype: str = "float32"

    def project(self, queries: np.ndarray) -> np.ndarray:
        """Queries (n, input dim) in the stored rows' space (float32)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.projection is None:
            return q
        if q.shape[1] != self.projection.input_dim_:
            raise ValueError(f"query dimension {q.shape[1]} does not match the field's input dimension "
                             f"{self.projection.input_dim_}")
        return np.asarray(self.projection.transform(q), np.float32)

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Original rows as stored: projected in blocks, then cast (float16) or quantised (int8)."""
        n = len(vectors)
        out_dim = self.projection.n_components_ if self.projection is not None else vectors.shape[1]
        out = np.empty((n, out_dim), np.dtype(self.dtype))
        for start in range(0, n, BLOCK_ROWS):
            part = self.project(np.asarray(vectors[start:start + BLOCK_ROWS], np.float32))
            if self.dtype == "int8":
                assert self.scale is not None and self.offset is not None
                codes = np.rint((part - self.offset) / self.scale)
                part = np.clip(codes, -INT8_LEVELS, INT8_LEVELS)
            out[start:start + len(part)] = part
        return out

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows back to float32 (dequantised; still in the projected space)."""
        out = np.asarray(rows, np.float32)
        if self.dtype == "int8":
            assert self.scale is not None and self.offset is not None
            out = out * self.scale + self.offset
        return out

    def scores(self, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """(len(rows), n) similarities of stored rows with already projected queries (n, d)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        bias = None
        if self.dtype == "int8":
            assert self.scale is not None and self.offset is not None
            bias = q @ self.offset
            q = q * self.scale
        return dot_rows(rows, q, bias)


#: The codec of a field stored as it is (float32 rows in the joint space).
IDENTITY = Codec()


def dot_rows(rows: np.ndarray, queries: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``rows @ queries.T (+ bias)`` in float32, whatever the rows' dtype (float32, float16, int8).

    Rows go through torch's matmul :data:`SCORE_BLOCK_ROWS` at a time, each block converted to float32
    while it is in cache, on a pool of single-threaded workers that each take a contiguous share of the
    blocks. Against one numpy matmul over the mapped rows this was 1.6x (float32), 3.3x (int8) and 5.3x
    (float16) faster on 780,000 x 512 rows alone on the machine, and unlike torch's own threads it does not
    collapse when other processes hold the cores (docs/benchmarks.md, "Scoring kernel").
    """
    import torch

    rows = np.asarray(rows)
    q = tensor_view(np.ascontiguousarray(queries, dtype=np.float32).T)  # queries may be stored rows too
    out = np.empty((len(rows), len(queries)), np.float32)
    result = torch.from_numpy(out)
    source = tensor_view(rows if rows.flags.c_contiguous else np.ascontiguousarray(rows))

    def score(start: int, stop: int) -> None:
        for a in range(start, stop, SCORE_BLOCK_ROWS):
            b = min(a + SCORE_BLOCK_ROWS, stop)
            block = source[a:b]
            torch.matmul(block if block.dtype == torch.float32 else block.float(), q, out=result[a:b])

    pool, workers = _scoring_pool()
    n_blocks = -(-len(rows) // SCORE_BLOCK_ROWS)
    if threading.current_thread().name.startswith(_POOL_PREFIX):
        score(0, len(rows))  # already on a worker (a nested call): waiting on the pool could deadlock
    elif n_blocks < 2 * workers:
        # One worker, not the calling thread: there torch's own threads wait at a barrier after every block,
        # which on a loaded machine cost a hierarchical query more CPU than its whole scoring.
        pool.submit(score, 0, len(rows)).result()
    else:
        share = -(-n_blocks // workers) * SCORE_BLOCK_ROWS
        for f in [pool.submit(score, a, min(a + share, len(rows))) for a in range(0, len(rows), share)]:
            f.result()
    if bias is not None:
        out += bias[None, :].astype(np.float32)
    return out


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array``'s own memory (never a copy), for reading only when ``array`` is read-only.

    Index rows are read-only memory maps, which ``torch.from_numpy`` takes with a warning. DLPack 1.0 carries
    the read-only flag, so ``torch.from_dlpack`` takes them silently, with no change to the process-wide
    warning filters (scoring runs in several threads at once).
    """
    import torch

    if array.flags.writeable:
        return torch.from_numpy(array)
    try:
        return torch.from_dlpack(array)
    except BufferError:  # numpy < 2.1, or a torch without DLPack 1.0: no read-only export
        return _from_read_only_numpy(array)


_READ_ONLY_LOCK = threading.Lock()
_read_only_seen = False


def _from_read_only_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` on a read-only array: torch warns once per process, so only the first call silences it."""
    import torch

    global _read_only_seen
    with _READ_ONLY_LOCK:
        if not _read_only_seen:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
                tensor = torch.from_numpy(array)
            _read_only_seen = True
            return tensor
    return torch.from_numpy(array)


def map_single_threaded(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[fn(item) for item in items]``, the items spread over the scoring workers (torch on one thread each).

    For small torch work on a request's path (a query's texts): on the calling thread torch's own threads
    meet at a barrier after every operation, which on a loaded machine made encoding a query's four texts
    20x slower than on one thread (docs/benchmarks.md, "Scale"); spread over the workers, its latency
    falls with the free cores.
    """
    if threading.current_thread().name.startswith(_POOL_PREFIX):
        return [fn(item) for item in items]  # a nested call: waiting on the pool could deadlock
    pool, _ = _scoring_pool()
    return [f.result() for f in [pool.submit(fn, item) for item in items]]


def scoring_workers() -> int:
    """How many scoring workers run at once (one per core, at most torch's thread count)."""
    return _scoring_pool()[1]


_POOL: tuple[ThreadPoolExecutor, int] | None = None
_POOL_PREFIX = "finegrain-score"
_POOL_LOCK = threading.Lock()


def _scoring_pool() -> tuple[ThreadPoolExecutor, int]:
    """One worker per core, each with torch's intra-op threads set to 1 (a per-thread setting).

    torch's own parallel matmul waits at a barrier after every block; when another process holds a core
    that wait lasts a scheduler slice, which made a 780,000-row int8 scan 76x slower on a loaded machine.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            import torch

            workers = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
            _POOL = (ThreadPoolExecutor(workers, thread_name_prefix=_POOL_PREFIX,
                                        initializer=lambda: torch.set_num_threads(1)), workers)
        return _POOL


# ------------------------------------------------------------------ reading
def field_info(settings: dict[str, Any], field: str) -> dict | None:
    """The ``storage`` setting of ``field`` (None: stored as it is)."""
    return (settings.get(META_KEY) or {}).get(field) or None


def _file(root: Path, name: str) -> Path:
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"bad storage file name {name!r} in the index catalog")
    return root / STORAGE_DIR / name


def load_codec(root: Path, info: dict) -> Codec:
    """The codec a field's ``storage`` setting describes (``FileNotFoundError`` if its files are gone)."""
    projection = None
    if info.get("projection_file"):
        from .base import load_projection

        path = _file(root, str(info["projection_file"]))
        if not path.exists():
            raise FileNotFoundError(path)
        projection = load_projection(path)
    scale = offset = None
    if info.get("quantize") == "int8":
        path = _file(root, str(info["quantizer_file"]))
        if not path.exists():
            raise FileNotFoundError(path)
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        scale, offset = tensors["scale"].astype(np.float32), tensors["offset"].astype(np.float32)
    dtype = {"none": "float32", "float16": "float16", "int8": "int8"}[str(info.get("quantize", "none"))]
    return Codec(projection, scale, offset, dtype)


def snapshot_codec(snapshot: Snapshot, field: str) -> Codec:
    """The codec of ``field`` at this snapshot (loaded once per snapshot)."""
    info = field_info(snapshot.settings, field)
    if not info:
        return IDENTITY

    def build() -> Codec:
        from ..store.catalog import IndexFormatError
        from ..store.snapshot import StaleSnapshotError

        try:
            return load_codec(snapshot.path, info)
        except FileNotFoundError:
            raise StaleSnapshotError(f"storage files of generation {snapshot.generation} are gone") from None
        except (OSError, ValueError, KeyError) as exc:
            raise IndexFormatError(f"index at {snapshot.path} has unreadable storage files for field "
                                   f"{field}: {exc}") from None

    return snapshot.derived("codec:" + field, build)


def stored_name(snapshot: Snapshot, field: str) -> str:
    """The field whose rows are scored for ``field``: its compact field when it is stored compact."""
    return compact_name(field) if field_info(snapshot.settings, field) else field


def has_rows(snapshot: Snapshot, field: str) -> bool:
    """Whether the index holds rows of ``field`` (original or compact)."""
    return snapshot.has_field(stored_name(snapshot, field))


def scoring(snapshot: Snapshot, field: str) -> tuple[FieldRows, Codec]:
    """The rows search scores for ``field`` and their codec (``KeyError`` if the index has none)."""
    return snapshot.field(stored_name(snapshot, field)), snapshot_codec(snapshot, field)


def scoring_parts(snapshot: Snapshot, field: str) -> tuple[list[FieldRows], Codec]:
    """:func:`scoring` chunk by chunk (for the segment table)."""
    return snapshot.field_parts(stored_name(snapshot, field)), snapshot_codec(snapshot, field)


# ------------------------------------------------------------------ writing
def encode_commit(writer_root: Path, storage: dict | None, fields: dict[str, FieldRows],
                  codecs: dict[str, Any]) -> dict[str, FieldRows]:
    """A commit's fields with the compact rows of every compact field added (originals left out once dropped).

    ``storage`` is the committed ``storage`` setting; ``codecs`` caches loaded codecs by field (keyed by the
    setting's files), owned by the writer.
    """
    storage = storage or {}
    if not storage or not any(f in storage for f in fields):
        return fields
    out = dict(fields)
    for field, rows in fields.items():
        info = storage.get(field)
        if not info:
            continue
        key = f"{info.get('projection_file')}|{info.get('quantizer_file')}|{info.get('quantize')}"
        if field not in codecs or codecs[field][0] != key:
            codecs[field] = (key, load_codec(writer_root, info))
        codec = codecs[field][1]
        out[compact_name(field)] = FieldRows(codec.encode(rows.vectors), rows.owners, rows.attrs)
        if info.get("originals") == "dropped":
            del out[field]
    return out


def compress_field(writer: Writer, snapshot: Snapshot, field: str, method: str = "none", dim: int | None = None,
                   quantize: str = "none", drop_originals: bool = False, params: dict[str, Any] | None = None,
                   fit_rows: int = FIT_ROWS, seed: int = 0, show_progress: bool = False) -> dict:
    """Store ``field`` compact (or, with ``method="none", quantize="none"``, as it is again).

    Parameters
    ----------
    writer, snapshot
        The index's writer (holding its lock) and the committed state read under it.
    field : str
        One of :data:`FIELDS` that the index holds.
    method : {"none", "pca", "aesvc", "ss2d"}
        Projection fitted on the field's rows (``none``: keep the joint-space dimension).
    dim : int
        The projection's output size (required with a method, smaller than the rows' dimension).
    quantize : {"none", "float16", "int8"}
        How the (projected) rows are stored.
    drop_originals : bool
        Delete the original float32 rows in the same transaction (undo then needs re-indexing).
    params : dict, optional
        Extra constructor parameters of the projection (``n_steps``, ``teacher``...).
    fit_rows : int
        The projection and the int8 ranges are fitted on at most this many rows (seeded sample).

    Returns
    -------
    dict
        The field's new ``storage`` setting (``{}`` when it is stored as it is again).
    """
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; --field is one of {', '.join(FIELDS)}")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if method != "none" and (dim is None or isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                             or dim < 1):
        raise ValueError(f"--dim must be a positive integer with --method {method}, got {dim!r}")
    if method == "none" and dim is not None:
        raise ValueError("--dim needs a projection (--method pca, aesvc or ss2d)")
    if field in QUANTIZE_ONLY:
        from .coded import check_quantize_only

        check_quantize_only(snapshot, field, method, dim, quantize, drop_originals)
    if field == "global":  # its storage may go with the global projection (compress/coded.py)
        from .coded import compress_global

        return compress_global(writer, snapshot, method, dim, quantize, params, fit_rows, seed, show_progress)
    storage = dict(snapshot.settings.get(META_KEY) or {})
    current = storage.get(field)
    if not snapshot.has_field(field) and not current:
        raise ValueError(f"this index has no {field!r} field to compress (its fields: "
                         f"{', '.join(f for f in snapshot.field_names() if not f.endswith(SUFFIX))})")
    if current and current.get("originals") == "dropped":
        raise ValueError(f"the original {field} rows of this index were dropped (--drop-originals); its storage "
                         "cannot change any more: re-index the images to start again from float32 rows")
    root = writer.path
    if method == "none" and quantize == "none":
        if drop_originals:
            raise ValueError("--drop-originals needs a compact form (--method or --quantize)")
        storage.pop(field, None)
        writer.replace_fields([compact_name(field)], [], {META_KEY: storage or None})
        sweep_storage_files(root, storage)
        return {}
    info, chunk = build_storage(writer, field, snapshot.field(field), method, dim, quantize, drop_originals, params,
                                fit_rows, seed)
    storage[field] = info
    dropped = [field] if drop_originals else []
    writer.replace_fields([compact_name(field), *dropped], [chunk], {META_KEY: storage})
    sweep_storage_files(root, storage)
    return info


def build_storage(writer: Writer, field: str, source: FieldRows, method: str, dim: int | None, quantize: str,
                  drop_originals: bool = False, params: dict[str, Any] | None = None, fit_rows: int = FIT_ROWS,
                  seed: int = 0) -> tuple[dict, tuple[str, str, int]]:
    """The files of :func:`compress_field`, no catalog change: fit on ``source`` (the field's rows), write the
    projection and quantiser under ``storage/`` and the ``<field>-compact`` chunk. Returns the field's
    ``storage`` setting and the chunk."""
    from . import create_projection

    root = writer.path
    input_dim = int(source.vectors.shape[1])
    if dim is not None and dim >= input_dim:
        raise ValueError(f"--dim {dim} must be smaller than the {field} rows' {input_dim} dimensions")
    needs_fit = method != "none" or quantize == "int8"
    if needs_fit and len(source) < 2:
        raise ValueError(f"the {field} field holds {len(source)} row(s); fitting needs at least 2")
    start = time.perf_counter()
    sample = _sample(source.vectors, fit_rows, seed) if needs_fit else np.zeros((0, input_dim), np.float32)
    tag = new_chunk_name()
    info: dict[str, Any] = {"method": method, "quantize": quantize, "input_dim": input_dim,
                            "originals": "dropped" if drop_originals else "kept", "fitted_on": int(len(sample))}
    projection = None
    if method != "none":
        projection = create_projection(method, int(dim), **(params or {}))  # type: ignore[arg-type]
        projection.fit(sample)
        name = f"{tag}-{field}-{method}{dim}.safetensors"
        projection.save(_file(root, name))
        fsync_file(_file(root, name))
        info.update(dim=int(projection.n_components_), projection_file=name)
        if method == "aesvc":
            info["loss"] = str(getattr(projection, "loss", "finegrain"))
        if method == "ss2d":
            teacher = projection.teacher
            info["teacher"] = "input" if teacher is None else getattr(teacher, "method", str(teacher))
    else:
        info["dim"] = input_dim
    scale = offset = None
    if quantize == "int8":
        projected = Codec(projection).project(sample)
        lo, hi = projected.min(axis=0), projected.max(axis=0)
        scale = np.maximum((hi - lo) / (2 * INT8_LEVELS), 1e-12).astype(np.float32)
        offset = ((hi + lo) / 2).astype(np.float32)
        name = f"{tag}-{field}-int8.safetensors"
        from safetensors.numpy import save_file

        path = _file(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"scale": scale, "offset": offset}, str(tmp))
        os.replace(tmp, path)
        fsync_file(path)
        info["quantizer_file"] = name
    info["fit_seconds"] = round(time.perf_counter() - start, 3)
    codec = Codec(projection, scale, offset, {"none": "float32"}.get(quantize, quantize))
    chunk = writer.write_rows(compact_name(field), FieldRows(codec.encode(source.vectors), source.owners,
                                                             source.attrs))
    return info, chunk


def _sample(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` rows (a seeded random sample, in file order), as float32."""
    if len(vectors) <= n:
        return np.asarray(vectors, np.float32)
    keep = np.sort(np.random.default_rng(seed).choice(len(vectors), n, replace=False))
    return np.asarray(vectors[keep], np.float32)


def sweep_storage_files(root: Path, storage: dict | None) -> int:
    """Delete files under ``storage/`` that no field's setting names (replaced ones, crash leftovers).

    Call it under the writer lock with the committed setting; returns how many files it deleted.
    """
    folder = root / STORAGE_DIR
    if not folder.is_dir():
        return 0
    keep = {str(v) for info in (storage or {}).values() if info
            for k, v in info.items() if k in ("projection_file", "quantizer_file")}
    removed = 0
    for path in folder.iterdir():
        if path.name not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def bytes_per_image(root: Path, chunks: list[tuple[str, str, int]], n_images: int) -> dict[str, float]:
    """Stored vector bytes per live image of every field, from the catalog's chunk list and each file's
    header (no vector is read; rows of removed images count until ``compact``)."""
    from ..store.vectors import VECTORS_DIR, load_npy

    total: dict[str, int] = {}
    for name, field, rows in chunks:
        try:
            header = load_npy(root / VECTORS_DIR / field / f"{name}.npy", mmap=True)
        except (OSError, ValueError):
            continue
        width = header.shape[1] if header.ndim == 2 else 1
        total[field] = total.get(field, 0) + int(rows) * int(width) * header.dtype.itemsize
    return {field: round(b / max(1, n_images), 1) for field, b in sorted(total.items())}
