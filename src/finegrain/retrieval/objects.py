"""MaO modes over per-object descriptors: ``objects``, ``objects-max``, ``objects-refined`` (docs/mao.md).

``objects`` scores the fused multi-object descriptor of each image,
``objects-max`` the best of an image's object crops, ``objects-refined`` the
Stage B descriptor. The object space is the image tower's raw features
(image queries only) unless the index was built with ``space="joint"``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..images import load_image
from ..objects import search as object_search
from .base import IMAGE_ONLY, Params, Query, Retriever, SearchResponse, SearchStats, number

if TYPE_CHECKING:  # pragma: no cover
    from ..explain import Explanation
    from ..store.snapshot import Snapshot

__all__ = ["ObjectParams", "ObjectRetriever", "object_table", "embed_object_query"]


@dataclass(frozen=True)
class ObjectParams(Params):
    """``candidates`` (``objects-max`` only): how many images the candidate stage passes to the object scoring
    (:mod:`.object_candidates`; 0: every image, None: the multi-vector modes' default rule)."""

    candidates: int | None = None

    def __post_init__(self) -> None:
        if self.candidates is not None:
            number("candidates", self.candidates, 0, integer=True)


def object_table(snapshot: Snapshot) -> object_search.ObjectTable:
    """Per-object rows grouped by image (one per snapshot)."""
    from ..compress import storage

    def build() -> object_search.ObjectTable:
        rows, codec = storage.scoring(snapshot, "objects")  # compact rows and their codec when stored compact
        return object_search.ObjectTable(rows, snapshot.ids, codec)

    return snapshot.derived("object-table", build)


def embed_object_query(snapshot: Snapshot, query: Query) -> np.ndarray:
    """A query vector in the index's object space (image queries; text only with ``space="joint"``)."""
    from .dense import embed_query

    cfg = snapshot.object_config
    if cfg is None:
        raise ValueError("this index stores no objects (finegrain index ... --objects regions)")
    if query.combined:  # each term in the object space, summed by weight (text terms only in the joint space)
        from .terms import combine

        return combine(np.stack([embed_object_query(snapshot, t.query()) for t in query.terms]),
                       [t.weight for t in query.terms])
    if query.text is not None:
        if cfg.space != "joint":
            raise ValueError("the object modes of this index search by example image only: its object "
                             "descriptors are raw image features (space 'raw'); use mode 'global' for text")
        return embed_query(snapshot, query)
    from ..objects.descriptor import embed_query as embed_object

    img = load_image(query.image)  # type: ignore[arg-type]
    box = query.clip_box(img.size)
    if box is not None:
        img = img.crop(tuple(int(round(v)) for v in box))  # type: ignore[arg-type]
    adapter = None
    if cfg.adapter is not None:  # the index stores adapted crops: the query goes through the same adapter
        from ..objects.adapter import index_adapter

        adapter = index_adapter(snapshot.path, cfg.adapter)
    return embed_object(snapshot.encoder, img, cfg, adapter)


class ObjectRetriever(Retriever):
    name = "objects"
    modes = object_search.OBJECT_MODES
    combines_terms = True
    params_type = ObjectParams
    descriptions: ClassVar[dict[str, str]] = {
        "objects": "MaO: one fused descriptor of each image's objects (index with --objects)",
        "objects-max": "MaO variant: the best single object crop of each image (index with --objects)",
        "objects-refined": "MaO Stage B refined descriptor (index with --objects --refine-iters N)",
    }

    def missing(self, snapshot: Snapshot, mode: str) -> str | None:
        cfg = snapshot.object_config
        if cfg is None:
            return f"search mode {mode!r} needs an index built with objects (finegrain index ... --objects regions)"
        if mode == "objects-refined" and not cfg.refine:
            return ("search mode 'objects-refined' needs an index built with refinement "
                    "(finegrain index ... --objects regions --refine-iters 80)")
        return None

    def accepts_on(self, snapshot: Snapshot, mode: str) -> frozenset[str]:
        cfg = snapshot.object_config  # raw object descriptors are image features: no text queries
        return self.accepts(mode) if cfg is None or cfg.space == "joint" else IMAGE_ONLY

    def params(self, snapshot: Snapshot, mode: str, options: Any) -> Params:
        p = ObjectParams.from_options(options, mode=mode)
        if p.candidates is not None and mode != "objects-max":
            raise ValueError(f"candidates applies to mode objects-max only ({mode!r} scores one row per image)")
        return p

    filterable = True

    def prepare(self, snapshot: Snapshot, mode: str, show_progress: bool = False) -> list[str]:
        from . import object_candidates

        return object_candidates.prepare(snapshot) if mode == "objects-max" else []

    def search(self, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params,
               allowed: np.ndarray | None = None) -> SearchResponse:
        fieldname = object_search.FIELDS[mode]
        t0 = time.perf_counter()
        vector = embed_object_query(snapshot, query)
        t1 = time.perf_counter()
        texts = [query.text] if query.text else []
        from ..compress import storage

        def timings(**more: float) -> dict[str, float]:  # the same names as the other modes' (encode, search)
            return {"encode_ms": (t1 - t0) * 1000, "search_ms": (time.perf_counter() - t1) * 1000, **more}

        if not storage.has_rows(snapshot, fieldname):  # an empty index
            return SearchResponse([], mode, SearchStats(), texts, timings=timings(), generation=snapshot.generation)
        if mode == "objects-max":
            staged = _staged_max(snapshot, vector, k, params, allowed)
            if staged is not None:
                return SearchResponse(staged[0], mode, staged[1], texts, timings=timings(**staged[2]),
                                      generation=snapshot.generation)
            scores, _ = object_table(snapshot).max_scores(vector)
        else:
            rows, codec = storage.scoring(snapshot, fieldname)  # compact rows when stored compact
            scores = object_search.field_scores(rows, snapshot.ids, vector, codec)
        if allowed is not None:  # images outside the filters never enter the top-k selection
            scores = np.where(allowed, scores, -np.inf)
        best, positions = object_search.top(scores, k)
        from .dense import hits_from

        return SearchResponse(hits_from(snapshot, snapshot.ids[positions], best), mode,
                              SearchStats(sim_ops=len(storage.scoring(snapshot, fieldname)[0])), texts,
                              timings=timings(), generation=snapshot.generation)

    def explain(self, snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int], k: int, params: Params,
                response: SearchResponse | None = None) -> list[Explanation]:
        from ..explain import explain_objects

        return explain_objects(snapshot, mode, query, ids)


def _staged_max(snapshot: Snapshot, vector: np.ndarray, k: int, params: Params, allowed: np.ndarray | None
                ) -> tuple[list, SearchStats, dict[str, float]] | None:
    """``objects-max`` through the candidate stage (:mod:`.object_candidates`); None when it does not apply."""
    from . import object_candidates
    from .dense import hits_from
    from .multivector import auto_candidates

    given = getattr(params, "candidates", None)  # a caller's bare Params: the default
    n_allowed = len(snapshot) if allowed is None else int(allowed.sum())
    n = auto_candidates(n_allowed) if given is None else given
    if not 0 < n < n_allowed or not object_candidates.available(snapshot):
        return None
    t0 = time.perf_counter()
    candidates = object_candidates.candidate_positions(snapshot, vector, n, allowed)
    timings = {"candidates_ms": (time.perf_counter() - t0) * 1000}
    scores, rows_read = object_table(snapshot).max_scores_at(vector, candidates)
    best, at = object_search.top(scores, k)
    stats = SearchStats(sim_ops=rows_read, candidates_per_level=[len(candidates)])
    return hits_from(snapshot, snapshot.ids[candidates[at]], best), stats, timings
