"""HiMIR modes ``single``, ``exhaustive``, ``hierarchical``: the global vector plus SLIC segments per image.

A text query is decomposed into sub-queries (rules, or an LLM; see
:mod:`finegrain.decompose.query`); an image query is one vector. Scoring
and the hierarchical scheduler are in :mod:`finegrain.search.multivector`.
The index's saved settings (``finegrain tune``) are the defaults; per-call
options override them for that call only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..search import multivector as mv
from .base import Params, Query, Retriever, SearchResponse
from .dense import embed_query, hits_from

if TYPE_CHECKING:  # pragma: no cover
    from ..explain import Explanation
    from ..store.snapshot import Snapshot

__all__ = ["MultiVectorParams", "MultiVectorRetriever", "segment_table", "query_vectors"]


@dataclass(frozen=True)
class MultiVectorParams(mv.MultiVectorConfig, Params):
    """:class:`~finegrain.search.multivector.MultiVectorConfig`'s knobs (validated by it)
    plus the text decomposer: a spec (``rules``, ``llm:<url>#<model>``) or a ``QueryDecomposer``."""

    decomposer: Any = "rules"

    def __post_init__(self) -> None:
        from ..decompose.query import QueryDecomposer, create_decomposer

        super().__post_init__()  # the knobs' ranges
        if isinstance(self.decomposer, str):
            create_decomposer(self.decomposer)  # a bad spec fails now, with the valid forms
        elif not isinstance(self.decomposer, QueryDecomposer):
            raise ValueError(f"decomposer must be a spec string or a QueryDecomposer, not {self.decomposer!r}")

    def config(self) -> mv.MultiVectorConfig:
        """The scoring knobs alone."""
        return mv.MultiVectorConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(mv.MultiVectorConfig)})


def segment_table(snapshot: Snapshot) -> mv.SegmentTable:
    """Segments grouped by level and image (views of the mapped chunk when stored level-major); one per snapshot."""
    cfg = snapshot.segment_config
    assert cfg is not None
    return snapshot.derived("segment-table", lambda: mv.SegmentTable(snapshot.field_parts("segments"), snapshot.ids,
                                                                     len(cfg.levels)))


def query_vectors(snapshot: Snapshot, query: Query, params: MultiVectorParams) -> tuple[list[str], np.ndarray]:
    """The query's texts (full query first, then sub-queries; empty for an image) and their (n, dim) embeddings.

    A combined query is one vector, its terms' weighted sum (like an image query; no decomposition).
    """
    if query.text is None:
        return [], embed_query(snapshot, query)[None, :]
    from ..decompose.query import create_decomposer, decompose_query

    d = params.decomposer
    texts = decompose_query(query.text, create_decomposer(d) if isinstance(d, str) else d)
    return texts, snapshot.encoder.encode_texts(texts)


class MultiVectorRetriever(Retriever):
    name = "multivector"
    modes = ("single", "exhaustive", "hierarchical")
    combines_terms = True
    params_type = MultiVectorParams
    descriptions: ClassVar[dict[str, str]] = {
        "single": "HiMIR 1+N: global + one segment level (index with --segments)",
        "exhaustive": "HiMIR 1+M+N: global + every segment level (index with --segments)",
        "hierarchical": "HiMIR scheduler: levels coarse to fine with pruning and early exit (index with --segments)",
    }

    def missing(self, snapshot: Snapshot, mode: str) -> str | None:
        if snapshot.segment_config is None or not snapshot.has_field("segments"):
            return (f"search mode {mode!r} needs an index built with segments "
                    "(finegrain index ... --segments 4,9,16,25,36)")
        return None

    def params(self, snapshot: Snapshot, mode: str, options: Any) -> Params:
        saved = snapshot.search_settings
        defaults = {**saved.get("multivector", {}), "decomposer": saved.get("decomposer", "rules")}
        p = MultiVectorParams.from_options(options, defaults, mode=mode)
        cfg = snapshot.segment_config
        n_levels = len(cfg.levels) if cfg else 0
        if p.single_level is not None and not 0 <= p.single_level < max(1, n_levels):
            raise ValueError(f"single_level must be from 0 to {n_levels - 1} for this index, not {p.single_level}")
        return p

    filterable = True

    def search(self, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params,
               allowed: np.ndarray | None = None) -> SearchResponse:
        assert isinstance(params, MultiVectorParams)
        texts, queries = query_vectors(snapshot, query, params)
        candidates = None if allowed is None else np.flatnonzero(allowed)  # the scheduler starts from these
        scores, positions, stats = mv.search(mode, segment_table(snapshot), snapshot.global_rows.vectors, queries, k,
                                             params.config(), candidates)
        return SearchResponse(hits_from(snapshot, snapshot.ids[positions], scores), mode, stats, texts,
                              generation=snapshot.generation)

    def explain(self, snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int], k: int, params: Params,
                response: SearchResponse | None = None) -> list[Explanation]:
        from ..explain import explain_segments

        assert isinstance(params, MultiVectorParams)
        return explain_segments(snapshot, mode, query, ids, k, params, response)
