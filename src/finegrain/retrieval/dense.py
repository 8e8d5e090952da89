"""``global``: one joint-space vector per image, FAISS top-k (exact below 200k images, HNSW above).

On an index compressed with ``finegrain compress`` the query is projected
with the stored projection and scored against the ``compressed`` field;
``dim`` picks a nested size of an SS2D projection (leading ``dim``
dimensions, re-normalised).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..images import load_image
from .base import Params, Query, Retriever, SearchResponse, SearchResult, SearchStats, number

if TYPE_CHECKING:  # pragma: no cover
    from ..store.ann import VectorIndex
    from ..store.snapshot import Snapshot


def embed_query(snapshot: Snapshot, query: Query) -> np.ndarray:
    """The (dim,) joint-space embedding of a query (an image query cropped to its box first).

    A combined query is the weighted sum of its normalised terms, re-normalised (:mod:`.terms`).
    """
    if query.combined:
        from .terms import embed_terms

        return embed_terms(query, snapshot.encoder.encode_texts, lambda q: embed_query(snapshot, q))
    if query.text is not None:
        return snapshot.encoder.encode_texts([query.text])[0]
    img = load_image(query.image)  # type: ignore[arg-type]
    box = query.clip_box(img.size)
    if box is not None:
        img = img.crop(tuple(int(round(v)) for v in box))  # type: ignore[arg-type]
    return snapshot.encoder.encode_images([img])[0]


def hits_from(snapshot: Snapshot, ids: np.ndarray, scores: np.ndarray) -> list[SearchResult]:
    """Hits for image ids and scores, best first (ids of -1 dropped)."""
    return [SearchResult(int(i), snapshot.records[int(i)].path, float(s), r)
            for r, (i, s) in enumerate((i, s) for i, s in zip(ids, scores) if i >= 0)]


@dataclass(frozen=True)
class DenseParams(Params):
    """``dim``: a nested size of an SS2D-compressed index (None: the stored size). ``rescore``: on an index
    whose global field is quantised (``compress --field global``), the best N hits scored again from the
    float32 originals (None: ``compress.coded.DEFAULT_RESCORE``; 0: off; ignored otherwise). ``breadth``: on an
    ANN index, how much of the structure one search explores (HNSW efSearch, at least k; IVF lists probed;
    None: the index's tuned breadth, else the built-in 128 / nlist/16): more is slower and closer to exact;
    exact indexes ignore it."""

    dim: int | None = None
    rescore: int | None = None
    breadth: int | None = None

    def __post_init__(self) -> None:
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer))):
            raise ValueError(f"dim must be an integer, got {self.dim!r}")  # its range depends on the index
        if self.rescore is not None:
            number("rescore", self.rescore, 0, integer=True)
        if self.breadth is not None:
            number("breadth", self.breadth, 1, integer=True)


class DenseRetriever(Retriever):
    name = "dense"
    modes = ("global",)
    combines_terms = True
    params_type = DenseParams
    descriptions: ClassVar[dict[str, str]] = {"global": "one vector per image (every index)"}

    def params(self, snapshot: Snapshot, mode: str, options: Any) -> Params:
        from ..compress import indexing as compress_indexing

        # a breadth saved by `finegrain tune --breadth-only` is the default; a search's own wins
        p = DenseParams.from_options(options, {"breadth": snapshot.search_settings.get("breadth")}, mode=mode)
        compress_indexing.check_search_dim(snapshot.projection_info, p.dim)  # a bad dim fails before encoding
        return p

    filterable = True

    def prepare(self, snapshot: Snapshot, mode: str, show_progress: bool = False) -> list[str]:
        return prepare_global(snapshot)

    def search(self, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params,
               allowed: np.ndarray | None = None) -> SearchResponse:
        assert isinstance(params, DenseParams)
        t0 = time.perf_counter()
        vector = embed_query(snapshot, query)
        t1 = time.perf_counter()
        scores, ids = search_vectors(snapshot, vector[None, :], k, params.dim, allowed, params.rescore,
                                     None if params.breadth is None else int(params.breadth))
        timings = {"encode_ms": (t1 - t0) * 1000, "search_ms": (time.perf_counter() - t1) * 1000}
        ops = len(snapshot) if allowed is None else int(allowed.sum())
        return SearchResponse(hits_from(snapshot, ids[0], scores[0]), mode, SearchStats(sim_ops=ops),
                              [query.text] if query.text else [], timings=timings, generation=snapshot.generation)


#: Allowed rows up to this many are scored exactly with numpy (cheap, and exact even on an ANN index).
EXACT_ALLOWED_ROWS = 20_000


def search_vectors(snapshot: Snapshot, queries: np.ndarray, k: int, dim: int | None = None,
                   allowed: np.ndarray | None = None, rescore: int | None = None,
                   breadth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS-style batch search of the global field: ``(scores, image ids)``, (n, k) each, -1 where empty.

    ``allowed``: a boolean mask over snapshot positions; only those images are ranked (filters).
    ``rescore``, ``breadth``: see :class:`DenseParams` (``breadth``: the unfiltered ANN search).
    """
    from ..compress import indexing as compress_indexing

    nested = compress_indexing.check_search_dim(snapshot.projection_info, dim)
    if nested is None and _coded_global(snapshot):
        from ..compress.coded import search_global  # quantised (`compress --field global`): the codes

        return search_global(snapshot, queries, k, dim, allowed, rescore)
    ann = global_ann(snapshot)
    projection = snapshot.projection
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if projection is not None:
        if queries.shape[1] != projection.input_dim_:
            raise ValueError(f"query dimension {queries.shape[1]} does not match the index's embeddings "
                             f"({projection.input_dim_}; they are projected to {projection.n_components_})")
        queries = projection.transform(queries)
        if nested is not None:
            queries = compress_indexing.truncate(queries, nested)
            ann = nested_ann(snapshot, nested)
    owners = snapshot.search_rows.owners
    if allowed is not None:
        scores, rows = _search_allowed(snapshot, ann, queries, k, nested, allowed)
    else:
        scores, rows = ann.search(queries, k, breadth)
    ids = np.where(rows >= 0, owners[np.maximum(rows, 0)], -1)
    return scores, ids


def prepare_global(snapshot: Snapshot) -> list[str]:
    """Build the top-k structure global search reads (:func:`search_vectors`); its name."""
    if len(snapshot) == 0:
        return []
    if _coded_global(snapshot):
        from ..compress.coded import coded_ann, coded_field

        field = coded_field(snapshot) or "global"
        return [f"{field} codes: {coded_ann(snapshot, field).kind}"]
    return [f"global: {global_ann(snapshot).kind}"]


def _coded_global(snapshot: Snapshot) -> bool:
    """Whether global search scores quantised codes (``compress --field global``) instead of float32 rows."""
    from ..compress import indexing as compress_indexing
    from ..compress import storage

    return bool(storage.field_info(snapshot.settings, "global")
                or storage.field_info(snapshot.settings, compress_indexing.FIELD))


def breadth_structure(snapshot: Snapshot) -> VectorIndex | None:
    """The ANN structure an unfiltered global search's ``breadth`` applies to; None where it does nothing
    (exact search, or a quantised global field, which is scanned code by code)."""
    if _coded_global(snapshot):
        return None
    ann = global_ann(snapshot)
    return None if ann.kind == "flat" else ann


def exact_ids(snapshot: Snapshot, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-``k`` image ids (nq, k) over the stored rows global search scores, for embedded
    ``queries`` (projected first on a compressed index): the reference ANN search is measured against."""
    from ..store.ann import exact_top_rows

    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if snapshot.projection is not None:
        queries = snapshot.projection.transform(queries)
    rows = snapshot.search_rows
    return np.asarray(rows.owners)[exact_top_rows(rows.vectors, queries, k)]


def global_ann(snapshot: Snapshot) -> VectorIndex:
    """The top-k structure over the rows global search scores (built once per snapshot; cached on disk if ANN)."""
    from ..store.ann import VectorIndex

    return snapshot.derived("ann:global", lambda: VectorIndex(snapshot.search_rows.vectors,
                                                              snapshot.settings.get("ann", "auto"),
                                                              snapshot.cache_file("global")))


def nested_ann(snapshot: Snapshot, dim: int) -> VectorIndex:
    """Top-k structure over the leading ``dim`` projected dimensions (one per snapshot and size)."""
    from ..compress import indexing as compress_indexing
    from ..store.ann import VectorIndex

    return snapshot.derived(f"ann:nested{dim}", lambda: VectorIndex(
        compress_indexing.truncate(snapshot.search_rows.vectors, dim), snapshot.settings.get("ann", "auto"),
        snapshot.cache_file(f"{compress_indexing.FIELD}{dim}")))


def _search_allowed(snapshot: Snapshot, ann: VectorIndex, queries: np.ndarray, k: int, nested: int | None,
                    allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the search rows whose images are allowed: exact below EXACT_ALLOWED_ROWS, else an ID selector."""
    from ..compress import indexing as compress_indexing

    owners = snapshot.search_rows.owners
    rows = np.flatnonzero(allowed[np.searchsorted(snapshot.ids, owners)])
    want = min(int(k), len(rows))
    if len(rows) > EXACT_ALLOWED_ROWS:
        scores, found = ann.search_rows(queries, k, rows)
        if bool(((found >= 0).sum(axis=1) >= want).all()):
            return scores, found
    # Few allowed rows (or a filtered ANN search that came back short): score them all exactly.
    vectors = np.asarray(snapshot.search_rows.vectors[rows], np.float32)
    if nested is not None:
        vectors = compress_indexing.truncate(vectors, nested)
    sims = queries @ vectors.T
    scores = np.full((len(queries), k), -np.inf, np.float32)
    found = np.full((len(queries), k), -1, np.int64)
    if want:
        part = np.argpartition(-sims, want - 1, axis=1)[:, :want] if want < len(rows) else \
            np.tile(np.arange(len(rows)), (len(queries), 1))
        top = np.take_along_axis(sims, part, 1)
        order = np.argsort(-top, axis=1, kind="stable")
        scores[:, :want] = np.take_along_axis(top, order, 1)
        found[:, :want] = rows[np.take_along_axis(part, order, 1)]
    return scores, found
