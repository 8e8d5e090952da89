"""Quantised storage of the ``global``, ``local`` and ``instance`` fields (``compress --field F --quantize Q``).

The storage itself (the ``<field>-compact`` rows, the int8 quantiser file, crash safety, undo) is
:mod:`.storage`'s, as for the multi-vector fields. What differs is how the rows are read:

``global`` (``float16`` or ``int8``; the float32 originals are always kept)
    Global search runs on a FAISS scalar-quantizer index holding the stored codes
    (:class:`CodedIndex`: ``IndexScalarQuantizer`` below 200k images, ``IndexHNSWSQ`` above, or
    ``IndexIVFScalarQuantizer`` with ``ann="ivf"``), never on float32 copies: at 10^6 images of 512
    dims that is 0.5 GB (int8) or 1 GB (float16) instead of 2 GB, plus the HNSW graph. FAISS's 8-bit
    ranges are set to the index's own quantiser, so FAISS scores exactly the stored int8 values.
    The best ``rescore`` (default :data:`DEFAULT_RESCORE`) hits of the first stage are then scored again
    from the memory-mapped float32 rows (``rescore`` reads of one row each). Filters score the
    allowed rows' codes; the multi-vector modes' global term reads the codes (:func:`global_vectors`).
    ``--drop-originals`` is refused: the re-scoring, the global projection, ``duplicates``, export and
    the local modes' joint-space fusion read them, and memory-mapped they cost disk, not memory.
``global`` with the global projection (``--field global --method M --dim D --quantize Q``, or ``--quantize``
on an index already projected with ``compress --method M --dim D``)
    The rows global search scores are then the projected ones (the ``compressed`` field), so those are
    quantised: the storage entry and the compact field are ``compressed`` / ``compressed-compact``
    (:data:`PROJECTED`), fitted on the projected rows. Queries are projected, the codes searched as
    above, and the short list re-scored from the projected float32 rows, so ``rescore`` gives back the
    projection's own float32 answer. Projection and quantisation are written in one catalog transaction;
    ``compress --method none`` drops both, ``--field global --quantize none`` the quantisation only. An SS2D
    nested size (``search --dim``) is searched on the float32 projected rows (the codes are of the full size).
``local`` (``int8`` only: the descriptors are already stored float16)
    The local searcher holds the stored rows as they are (memory-mapped when the field is one chunk) and
    scores them in blocks (:class:`~finegrain.local.chamfer.LocalDatabase`); with int8 its FAISS first
    stage is a scalar-quantizer index over the same codes. ``--drop-originals`` is allowed (nothing
    else reads the descriptors).
``instance`` (``int8`` only: stored float16)
    The ``instance`` mode scores the codes (:class:`CodedRows`); the ``l2g`` fusion decodes the short list's
    rows. ``--drop-originals`` is allowed.

No projection for ``local`` or ``instance``: every query descriptor would have to be projected in the
local searcher as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..store.ann import AUTO_ANN_THRESHOLD, VectorIndex
from ..store.catalog import IndexFormatError
from .storage import (
    BLOCK_ROWS,
    FIT_ROWS,
    META_KEY,
    Codec,
    build_storage,
    compact_name,
    field_info,
    snapshot_codec,
    sweep_storage_files,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..store.snapshot import Snapshot
    from ..store.vectors import FieldRows
    from ..store.writer import Writer

#: Hits of a quantised global search scored again from the float32 originals unless ``rescore`` says otherwise.
#: 100 rows are 100 reads of 2 KB (512 dims) from the memory-mapped originals; chosen before any measurement.
DEFAULT_RESCORE = 100
#: Rows the IVF variant's coarse quantiser is trained on (a seeded sample).
IVF_TRAIN_ROWS = 100_000


#: The projected global rows (the global projection's ``compressed`` field): their storage key when quantised.
PROJECTED = "compressed"


def check_quantize_only(snapshot: Snapshot, field: str, method: str, dim: int | None, quantize: str,
                        drop_originals: bool) -> None:
    """One-line errors for what ``--field global`` / ``local`` / ``instance`` cannot do."""
    if method != "none" and field != "global":
        if field == "instance":
            raise ValueError("--field instance takes --quantize int8 only (a projection would have to be applied "
                             "to every query's instance descriptor too)")
        raise ValueError("--field local takes --quantize int8 only (a projection would have to be applied to "
                         "every query descriptor too)")
    if field == "global":
        if drop_originals:
            raise ValueError("the global field keeps its float32 originals (re-scoring, the global projection, "
                             "duplicates and export read them; memory-mapped they cost disk, not memory): "
                             "--drop-originals applies to the other fields")
        if method != "none" and quantize == "none":
            raise ValueError("--field global --method M --dim D needs --quantize float16 or int8 (a projection "
                             "alone is `finegrain compress --method M --dim D`, without --field)")
    if field in ("local", "instance") and quantize == "float16":
        raise ValueError(f"the {field} rows are already stored float16; --quantize int8 halves them")


def compress_global(writer: Writer, snapshot: Snapshot, method: str, dim: int | None, quantize: str,
                    params: dict[str, Any] | None = None, fit_rows: int = FIT_ROWS, seed: int = 0,
                    show_progress: bool = False) -> dict:
    """``compress --field global``: quantise the rows global search scores, with or without a projection.

    ``method`` given: fit the global projection (as ``compress --method M --dim D``) and quantise its projected
    rows, in one catalog transaction. ``method="none"``: quantise the projected rows when the index is
    projected, else the global rows themselves. ``quantize="none"``: drop the quantisation (the projection, if
    any, stays). Returns the quantised field's ``storage`` setting, with ``"projection"`` (the projection's
    setting) when the projected rows are the ones quantised; ``{}`` after an undo.
    """
    from . import indexing as compress_indexing

    root = writer.path
    storage = dict(snapshot.settings.get(META_KEY) or {})
    projected = snapshot.projection_info
    if method == "none" and quantize == "none":
        storage.pop("global", None)
        storage.pop(PROJECTED, None)
        writer.replace_fields([compact_name("global"), compact_name(PROJECTED)], [], {META_KEY: storage or None})
        sweep_storage_files(root, storage)
        return {}
    if not snapshot.has_field("global"):
        raise ValueError("this index has no 'global' field to compress (it holds no image yet)")
    if method == "none" and not projected:  # the global rows themselves
        info, chunk = build_storage(writer, "global", snapshot.global_rows, "none", None, quantize, False, None,
                                    fit_rows, seed)
        storage["global"] = info
        writer.replace_fields([compact_name("global")], [chunk], {META_KEY: storage})
        sweep_storage_files(root, storage)
        return info
    meta: dict[str, Any] = {}
    if method == "none":  # the projected rows of the projection in place
        assert projected is not None
        rows = snapshot.search_rows
        new_chunks = []
    else:  # a new projection and its quantised rows together
        projected, chunk, rows = compress_indexing.build_projection(writer, snapshot, method, dim, params,
                                                                    show_progress)
        new_chunks, meta[compress_indexing.META_KEY] = [chunk], projected
    info, chunk = build_storage(writer, PROJECTED, rows, "none", None, quantize, False, None, fit_rows, seed)
    storage.pop("global", None)  # an unprojected quantisation is replaced by this one
    storage[PROJECTED] = info
    drop = [compact_name("global"), compact_name(PROJECTED)] + ([compress_indexing.FIELD] if new_chunks else [])
    writer.replace_fields(drop, [*new_chunks, chunk], {**meta, META_KEY: storage})
    if new_chunks:
        compress_indexing.sweep_projection_files(root, projected)
    sweep_storage_files(root, storage)
    return {**info, "projection": projected}


def coded_field(snapshot: Snapshot) -> str | None:
    """The field global search reads as codes: ``global`` (quantised), ``compressed`` (the projected rows,
    quantised), or None (float32 rows)."""
    if field_info(snapshot.settings, "global"):
        return "global"
    if snapshot.projection_info and field_info(snapshot.settings, PROJECTED):
        return PROJECTED
    return None


# ------------------------------------------------------------------ reading the global field
class CodedRows:
    """Stored rows read as float32 joint-space rows: ``len``, ``rows[i]`` (decoded), ``rows @ q`` (block-wise,
    the int8 scale folded into the query), ``np.asarray(rows)`` (everything decoded: a copy)."""

    def __init__(self, rows: np.ndarray, codec: Codec):
        self.rows, self.codec = rows, codec
        self.shape = rows.shape
        self.ndim = 2
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.codec.decode(self.rows[index])

    def __matmul__(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, np.float32)
        out = self.codec.scores(self.rows, q.reshape(1, -1) if q.ndim == 1 else q.T)
        return out[:, 0] if q.ndim == 1 else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.codec.decode(self.rows)
        return out if dtype is None else out.astype(dtype)


def position_rows(snapshot: Snapshot, name: str) -> FieldRows:
    """The rows of one-row-per-image field ``name`` in position order (checked once per snapshot; no copy when
    the field is stored in that order, as after ``compact``)."""

    def build() -> FieldRows:
        rows = snapshot.field(name)
        if not np.array_equal(rows.owners, snapshot.ids):
            rows = rows.select(np.argsort(rows.owners, kind="stable"))
        if len(rows) != len(snapshot) or not np.array_equal(rows.owners, snapshot.ids):
            raise IndexFormatError(f"index at {snapshot.path} is inconsistent: {len(rows)} rows of field {name} "
                                   f"for {len(snapshot)} images; run `finegrain check`")
        return rows

    return snapshot.derived("rows:" + name, build)


def global_compact_rows(snapshot: Snapshot, field: str = "global") -> FieldRows:
    """The stored ``<field>-compact`` rows (``global`` or ``compressed``) in position order."""
    return position_rows(snapshot, compact_name(field))


def global_vectors(snapshot: Snapshot) -> np.ndarray:
    """What scores the global term (multi-vector modes): the float32 rows, or the quantised ones read through
    their codec (:class:`CodedRows`, duck-typed as the array: ``len``, ``[positions]``, ``@ query``)."""
    if not field_info(snapshot.settings, "global"):
        return _rows_in_memory(snapshot)
    coded = snapshot.derived("coded:global", lambda: CodedRows(global_compact_rows(snapshot).vectors,
                                                               snapshot_codec(snapshot, "global")))
    return cast(np.ndarray, coded)


def _rows_in_memory(snapshot: Snapshot) -> np.ndarray:
    """The float32 global rows, read from the HNSW graph's own copy when this snapshot has loaded one.

    Above 200,000 images the graph (which the candidate stage loads) holds every row in memory anyway,
    while reading the candidates' rows from the mapped rows file faults a 64 KiB run in per row: 2 GB of
    a 1M index's file ended up resident (docs/benchmarks.md, "Mapped pages and RSS at 1M"). The values
    are the same float32 rows. A snapshot that has not loaded the graph reads the mapped rows (it is
    never loaded, let alone built, only for this).
    """
    from ..store.ann import VectorIndex

    rows = snapshot.global_rows.vectors
    ann = snapshot.built("ann:global")
    if snapshot.projection_info or not isinstance(ann, VectorIndex) or ann.kind != "hnsw":
        return rows
    held = ann.stored_rows()
    return rows if held is None or held.shape != rows.shape else held


class CodedIndex(VectorIndex):
    """A :class:`~finegrain.store.ann.VectorIndex` over float16/int8 rows: FAISS scalar-quantizer indexes whose
    codes are the stored ones (int8: FAISS's per-dimension range set to the index's own quantiser)."""

    def __init__(self, codes: np.ndarray, codec: Codec, kind: str = "auto", cache_file: Path | None = None):
        import faiss

        if codec.dtype not in ("float16", "int8") or codec.projection is not None:
            raise ValueError("CodedIndex needs float16 or int8 rows without a projection")
        if kind not in ("auto", "flat", "hnsw", "ivf"):
            raise ValueError(f"unknown index kind {kind!r}; choose one of auto, flat, hnsw, ivf")
        self.n, self.dim = codes.shape
        self.kind = ("hnsw" if self.n >= AUTO_ANN_THRESHOLD else "flat") if kind == "auto" else kind
        if cache_file is not None and cache_file.exists() and self.kind != "flat":
            try:
                self.faiss = faiss.read_index(str(cache_file))
                if self.faiss.ntotal == self.n and self.faiss.d == self.dim:
                    return
            except RuntimeError:  # a damaged cache file: rebuilt below
                pass
        self.faiss = build_sq_index(codes, codec, self.kind)
        if cache_file is not None and self.kind != "flat":
            self._save(cache_file)


def build_sq_index(codes: np.ndarray, codec: Codec, kind: str, nlist: int | None = None, hnsw_m: int = 32,
                   train_rows: int = IVF_TRAIN_ROWS, what: str = "global") -> Any:
    """A FAISS scalar-quantizer index (inner product) holding exactly the stored float16/int8 ``codes``.

    ``kind``: ``flat`` (``IndexScalarQuantizer``), ``hnsw`` (``IndexHNSWSQ``) or ``ivf``
    (``IndexIVFScalarQuantizer`` on the raw values, ``nlist`` lists, default about 4 sqrt(n), trained on
    at most ``train_rows`` seeded rows). int8: FAISS's per-dimension range is set to ``codec``'s quantiser.
    ``what`` names the rows in the error raised when they hold NaN or inf.
    """
    import faiss as faiss_module

    faiss: Any = faiss_module  # the bundled type stubs lack the scalar-quantizer constructors' overloads
    n, dim = codes.shape
    qtype = faiss.ScalarQuantizer.QT_8bit if codec.dtype == "int8" else faiss.ScalarQuantizer.QT_fp16
    ip = faiss.METRIC_INNER_PRODUCT
    index: Any
    if kind == "flat" or n == 0:
        index = owner = faiss.IndexScalarQuantizer(dim, qtype, ip)
    elif kind == "hnsw":
        index = faiss.IndexHNSWSQ(dim, qtype, hnsw_m, ip)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
        owner = faiss.downcast_index(index.storage)
    else:  # ivf, on the raw values (not residuals) so the quantiser's ranges apply as they are
        nlist = max(1, min(int(4 * np.sqrt(n)) if nlist is None else int(nlist), n // 39))
        index = owner = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, qtype, ip, False)
        pick = np.sort(np.random.default_rng(0).choice(n, min(n, train_rows), replace=False))
        index.train(codec.decode(codes[pick]))
        index.nprobe = max(1, nlist // 16)
    if codec.dtype == "int8":
        assert codec.scale is not None and codec.offset is not None
        # FAISS 8-bit: x = vmin + (u + 0.5) / 255 * vdiff for u = c + 127 is offset + scale * c exactly.
        trained = np.concatenate([codec.offset - 127.5 * codec.scale, 255.0 * codec.scale]).astype(np.float32)
        faiss.copy_array_to_vector(trained, owner.sq.trained)
        owner.is_trained = True
        index.is_trained = True
    def blocks():
        for start in range(0, n, BLOCK_ROWS):
            part = codec.decode(codes[start:start + BLOCK_ROWS])
            if not np.isfinite(part).all():
                raise IndexFormatError(f"stored {what} rows hold NaN or inf: the index is damaged; run "
                                       "`finegrain check --index INDEX`")
            yield start, np.ascontiguousarray(part, np.float32)

    if kind == "ivf" and n:
        _add_reserved(index, blocks)
    else:
        for _, part in blocks():
            index.add(part)
    return index


def _add_reserved(index: Any, blocks) -> None:
    """Add to an IVF index with each inverted list allocated once at its final size.

    Adding block by block grows each list as a vector does (doubling), which held up to twice the codes'
    bytes: at 19.4M local descriptors the index took over 5 GB for 2.5 GB of codes. So the rows are
    assigned to their lists first (what ``add`` computes), each list is reserved, then the codes added
    with those assignments: the same index.
    """
    from faiss.contrib.ivf_tools import add_preassigned

    lists = np.concatenate([index.quantizer.search(part, 1)[1][:, 0] for _, part in blocks()])
    invlists = index.invlists
    for list_no, count in enumerate(np.bincount(lists, minlength=index.nlist).tolist()):
        if count:
            invlists.resize(list_no, count)  # allocates the list's final size ...
            invlists.resize(list_no, 0)  # ... and keeps that capacity while the codes are added
    for start, part in blocks():
        add_preassigned(index, part, np.ascontiguousarray(lists[start:start + len(part)], np.int64))


def coded_ann(snapshot: Snapshot, field: str = "global") -> CodedIndex:
    """The FAISS scalar-quantizer index over the stored codes of ``field`` (``global``, or ``compressed``: the
    projected rows), once per snapshot; cached on disk if ANN."""
    info = field_info(snapshot.settings, field) or {}
    return snapshot.derived(f"ann:{field}-coded", lambda: CodedIndex(
        global_compact_rows(snapshot, field).vectors, snapshot_codec(snapshot, field),
        snapshot.settings.get("ann", "auto"), snapshot.cache_file(f"{field}-{info.get('quantize')}")))


def search_global(snapshot: Snapshot, queries: np.ndarray, k: int, dim: int | None = None,
                  allowed: np.ndarray | None = None, rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`finegrain.retrieval.dense.search_vectors` on an index whose searched global rows are quantised
    (:func:`coded_field`).

    The first stage ranks the codes (FAISS, or the allowed rows' codes scored exactly); the best
    ``rescore`` of each query's hits (None: :data:`DEFAULT_RESCORE`; 0: none) are then scored again from
    the float32 rows the codes were made from (the originals, or the projected rows) and re-sorted. Hits
    after them keep their quantised scores. On a projected index queries are projected first; ``dim`` (an
    SS2D nested size) is not searched here (:func:`finegrain.retrieval.dense.search_vectors` scores the
    float32 projected rows for it).
    """
    from . import indexing as compress_indexing

    field = coded_field(snapshot) or "global"
    if compress_indexing.check_search_dim(snapshot.projection_info, dim) is not None:
        raise ValueError("a nested size is searched on the float32 projected rows, not the codes")
    if rescore is not None and (isinstance(rescore, bool) or not isinstance(rescore, (int, np.integer))
                                or rescore < 0):
        raise ValueError(f"rescore must be a non-negative integer, got {rescore!r}")
    depth = DEFAULT_RESCORE if rescore is None else int(rescore)
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if queries.shape[1] != snapshot.dim:
        raise ValueError(f"query dimension {queries.shape[1]} does not match the index's {snapshot.dim}-dim "
                         "embeddings")
    if field == PROJECTED:
        projection = snapshot.projection
        assert projection is not None  # coded_field: the index is projected
        queries = np.ascontiguousarray(projection.transform(queries), dtype=np.float32)
    fetch = max(int(k), depth)
    if allowed is None:
        scores, found = coded_ann(snapshot, field).search(queries, fetch)
    else:
        scores, found = _search_allowed(snapshot, field, queries, fetch, allowed)
    if depth > 0 and len(snapshot):
        originals = (snapshot.global_rows if field == "global" else position_rows(snapshot, field)).vectors
        for r in range(len(queries)):
            head = found[r, :depth]
            head = head[head >= 0]
            exact = np.asarray(originals[head], np.float32) @ queries[r]
            order = np.argsort(-exact, kind="stable")
            found[r, :len(head)], scores[r, :len(head)] = head[order], exact[order]
    found, scores = found[:, :k], scores[:, :k]
    ids = np.where(found >= 0, snapshot.ids[np.maximum(found, 0)], -1)
    return scores, ids


def _search_allowed(snapshot: Snapshot, field: str, queries: np.ndarray, k: int, allowed: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k positions among the allowed ones: FAISS with an ID selector when many, else the codes scored exactly."""
    from ..retrieval.dense import EXACT_ALLOWED_ROWS

    rows = np.flatnonzero(allowed)
    want = min(int(k), len(rows))
    if len(rows) > EXACT_ALLOWED_ROWS:
        scores, found = coded_ann(snapshot, field).search_rows(queries, k, rows)
        if bool(((found >= 0).sum(axis=1) >= want).all()):
            return scores, found
    codes = global_compact_rows(snapshot, field).vectors
    sims = snapshot_codec(snapshot, field).scores(codes[rows], queries).T  # (n queries, allowed rows)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    found = np.full((len(queries), k), -1, np.int64)
    if want:
        part = np.argsort(-sims, axis=1, kind="stable")[:, :want]
        scores[:, :want] = np.take_along_axis(sims, part, 1)
        found[:, :want] = rows[part]
    return scores, found


# ------------------------------------------------------------------ integrity
def storage_problems(root: Path, settings: dict[str, Any], dims: dict[str, set[int]]) -> list[tuple[str, str]]:
    """``(field, message)`` for every stored-compact field whose storage files are missing or do not fit its rows
    (``finegrain check``); ``dims``: the dimensions of each field's intact chunks."""
    from .storage import META_KEY, load_codec

    out: list[tuple[str, str]] = []
    for field, info in sorted((settings.get(META_KEY) or {}).items()):
        if not info:
            continue
        try:
            codec = load_codec(root, info)
        except FileNotFoundError as exc:
            out.append((field, f"field {field}: a storage file is missing ({exc}); undo or redo `finegrain "
                               f"compress --field {field}`"))
            continue
        except (OSError, ValueError, KeyError) as exc:
            out.append((field, f"field {field}: unreadable storage file ({exc})"))
            continue
        width = dims.get(compact_name(field))
        if codec.scale is not None and (codec.scale.shape != codec.offset.shape  # type: ignore[union-attr]
                                        or not np.all(np.isfinite(codec.scale)) or not np.all(codec.scale > 0)):
            out.append((field, f"field {field}: the int8 quantiser's scale is damaged"))
        elif width and codec.scale is not None and width != {int(codec.scale.shape[0])}:
            out.append((field, f"field {field}: the int8 quantiser has {codec.scale.shape[0]} dimensions, the "
                               f"stored rows {sorted(width)}"))
    return out
