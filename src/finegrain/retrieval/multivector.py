"""HiMIR modes ``single``, ``exhaustive``, ``hierarchical``: the global vector plus SLIC segments per image.

A text query is decomposed into sub-queries (rules, or an LLM; see
:mod:`finegrain.decompose.query`); an image query is one vector. Scoring
and the hierarchical scheduler are in :mod:`finegrain.search.multivector`.
The index's saved settings (``finegrain tune``) are the defaults; per-call
options override them for that call only.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..search import multivector as mv
from .base import Params, Query, Retriever, SearchResponse, SearchStats, number
from .dense import embed_query, hits_from, search_vectors

if TYPE_CHECKING:  # pragma: no cover
    from ..explain import Explanation
    from ..store.snapshot import Snapshot

__all__ = ["MultiVectorParams", "MultiVectorRetriever", "segment_table", "query_vectors"]


@dataclass(frozen=True)
class MultiVectorParams(mv.MultiVectorConfig, Params):
    """:class:`~finegrain.search.multivector.MultiVectorConfig`'s knobs (validated by it),
    the text decomposer (a spec: ``rules``, ``llm:<url>#<model>``, or a ``QueryDecomposer``), and
    ``candidates``: how many images the candidate stage passes to the segment scoring (see
    :func:`candidate_positions`; 0: every image, None: :func:`stage_for`); ``rescore``: on an
    index whose segments are stored compact with the originals kept, the best ``rescore`` images are
    scored again, same mode, from the float32 originals (0: off; see :func:`rescore`); ``stage``: how the
    candidate stage asks the global field, one of :data:`STAGES` (see :func:`candidate_positions`; None:
    see :func:`stage_for`)."""

    decomposer: Any = "rules"
    candidates: int | None = None
    rescore: int = 0
    stage: str | None = None

    def __post_init__(self) -> None:
        from ..decompose.query import QueryDecomposer, create_decomposer

        super().__post_init__()  # the knobs' ranges
        if self.candidates is not None:
            number("candidates", self.candidates, 0, integer=True)
        number("rescore", self.rescore, 0, integer=True)
        if self.stage is not None and self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if isinstance(self.decomposer, str):
            create_decomposer(self.decomposer)  # a bad spec fails now, with the valid forms
        elif not isinstance(self.decomposer, QueryDecomposer):
            raise ValueError(f"decomposer must be a spec string or a QueryDecomposer, not {self.decomposer!r}")

    def config(self) -> mv.MultiVectorConfig:
        """The scoring knobs alone."""
        return mv.MultiVectorConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(mv.MultiVectorConfig)})


def segment_table(snapshot: Snapshot) -> mv.SegmentTable:
    """Segments grouped by level and image (views of the mapped chunk when stored level-major); one per snapshot."""
    from ..compress import storage

    cfg = snapshot.segment_config
    assert cfg is not None

    def build() -> mv.SegmentTable:
        parts, codec = storage.scoring_parts(snapshot, "segments")  # compact rows when stored compact
        return mv.SegmentTable(parts, snapshot.ids, len(cfg.levels), codec)

    return snapshot.derived("segment-table", build)


def original_table(snapshot: Snapshot) -> mv.SegmentTable | None:
    """The float32 original segments when the field is stored compact with its originals kept, else None."""
    from ..compress import storage

    cfg = snapshot.segment_config
    if cfg is None or not storage.field_info(snapshot.settings, "segments") or not snapshot.has_field("segments"):
        return None
    return snapshot.derived("segment-table-originals", lambda: mv.SegmentTable(
        snapshot.field_parts("segments"), snapshot.ids, len(cfg.levels)))


def rescore(snapshot: Snapshot, mode: str, queries: np.ndarray, positions: np.ndarray, k: int,
            config: mv.MultiVectorConfig) -> tuple[np.ndarray, np.ndarray, SearchStats] | None:
    """The same mode run again on ``positions`` only (a short list), from the original float32 segments.

    None when there is nothing to re-score from (segments stored as they are, or originals dropped).
    Only the short list's rows of the originals are read (memory-mapped), so they cost disk, not memory.
    """
    table = original_table(snapshot)
    if table is None:
        return None
    return mv.search(mode, table, snapshot.global_rows.vectors, queries, k, config, np.sort(positions))


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


#: Candidate-stage policies (:func:`candidate_positions`).
STAGES = ("union", "fused")

#: Below this many images the multi-vector modes score every image (exact); above it, :data:`AUTO_CANDIDATES`.
AUTO_EXACT_UP_TO = 20_000
AUTO_CANDIDATES = 2_000


def auto_candidates(n_images: int) -> int:
    """The default candidate count: 0 (every image, exact) for small indexes, else :data:`AUTO_CANDIDATES`."""
    return 0 if n_images <= AUTO_EXACT_UP_TO else AUTO_CANDIDATES


#: The multi-vector modes' stage when neither a call nor the index (``finegrain tune``) gives a size, above
#: :data:`AUTO_EXACT_UP_TO` images: one fused search of this many images. Chosen on Flickr8k train captions
#: at 1M images (docs/benchmarks.md, "The fused candidate stage at 1M"): it agreed as well as the union of
#: 1,600 per query vector (0.987 against 0.986) at 0.6x its time.
AUTO_FUSED_CANDIDATES = 3_200


def stage_for(params: MultiVectorParams, n_images: int) -> tuple[int, str]:
    """The candidate stage a search runs: (size, policy); size 0 is no stage (every image scored).

    A size given (per call or saved by ``finegrain tune``) without a policy keeps ``union``, which is what
    such a size meant before policies existed; no size at all: :data:`AUTO_FUSED_CANDIDATES` fused images
    (or :data:`AUTO_CANDIDATES` per vector for an explicit ``union``) above :data:`AUTO_EXACT_UP_TO`.
    """
    if params.candidates is not None:
        return params.candidates, params.stage or "union"
    if n_images <= AUTO_EXACT_UP_TO:
        return 0, params.stage or "union"
    if params.stage == "union":
        return AUTO_CANDIDATES, "union"
    return AUTO_FUSED_CANDIDATES, "fused"


def candidate_positions(snapshot: Snapshot, queries: np.ndarray, n: int, allowed: np.ndarray | None = None,
                        stage: str = "union", weight_global: float = 0.5) -> np.ndarray:
    """The candidate stage: ascending positions of the images the scheduler then scores on their segments.

    ``stage="union"``: every query vector (the full query and each sub-query) takes its own top ``n``
    from the global field's top-k structure (FAISS: exact below 200k images, HNSW above), so an image
    that only a sub-query finds is still scored on its segments. ``stage="fused"``: the top ``n`` of one
    vector, ``w q_0 + (1 - w) mean_j q_j`` (``w``: ``weight_global``), which ranks images by the
    multi-vector score with each sub-query's best segment replaced by the whole image's global vector:
    one search of ``n`` instead of one per query vector (finegrain's own; HiMIR itself scores every image).
    ``allowed`` (filters): a boolean mask over positions; candidates are drawn from those images only.
    """
    queries = np.atleast_2d(queries)
    if stage == "fused":
        fused = weight_global * queries[0] + (1.0 - weight_global) * queries.mean(axis=0)
        queries = np.asarray(fused, np.float32)[None, :]
    elif stage != "union":
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    rows = _exact_stage_rows(snapshot)
    if rows is None:
        _, ids = search_vectors(snapshot, queries, n, allowed=allowed)
        ids = np.unique(ids[ids >= 0])
        return np.sort(snapshot.positions(ids))
    # Exact (flat) stage: one pass over the global rows for every query vector at once. FAISS's flat search
    # scans the rows once per query vector below 20 of them (and keeps a heap of n per vector), which made
    # this stage cost several times the scoring it feeds at 100,000 images.
    from ..compress.storage import dot_rows

    scores = dot_rows(rows, queries)  # (images, query vectors), rows in position order
    if allowed is not None:
        scores[~allowed] = -np.inf
    n = min(int(n), len(scores))
    if n <= 0:
        return np.zeros(0, np.int64)
    top = np.argpartition(-scores, n - 1, axis=0)[:n] if n < len(scores) else np.arange(len(scores))
    top = np.unique(top)  # ascending
    return top if allowed is None else top[allowed[top]]  # fewer allowed images than n: no filler


def _exact_stage_rows(snapshot: Snapshot) -> np.ndarray | None:
    """The float32 global rows, in position order, when global search is an exact flat scan of them.

    None when global search runs on something else (HNSW or IVF above :data:`~finegrain.store.ann.
    AUTO_ANN_THRESHOLD` images or when the index asks for it, a projected or quantised global field):
    the candidate stage then asks :func:`~finegrain.retrieval.dense.search_vectors`, so it uses that structure.
    """
    from ..compress import storage
    from ..store.ann import resolve_kind

    if snapshot.projection_info or storage.field_info(snapshot.settings, "global"):
        return None
    if resolve_kind(str(snapshot.settings.get("ann", "auto")), len(snapshot)) != "flat":
        return None
    rows = snapshot.global_rows.vectors  # kept in image id order, that is in position order
    # Refused as the FAISS index refuses them (NaN or inf rows are never a ranking); checked once per snapshot.
    snapshot.derived("finite:global", lambda: _checked(rows))
    return rows


def _checked(rows: np.ndarray) -> bool:
    from ..store.ann import check_finite

    check_finite(rows)
    return True


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
        from ..compress import storage

        if snapshot.segment_config is None or not storage.has_rows(snapshot, "segments"):
            return (f"search mode {mode!r} needs an index built with segments "
                    "(finegrain index ... --segments 4,9,16,25,36)")
        return None

    def params(self, snapshot: Snapshot, mode: str, options: Any) -> Params:
        saved = snapshot.search_settings
        defaults = {**saved.get("multivector", {}), "decomposer": saved.get("decomposer", "rules"),
                    "candidates": saved.get("candidates"),  # chosen by `finegrain tune` (None: stage_for)
                    "stage": saved.get("stage")}
        p = MultiVectorParams.from_options(options, defaults, mode=mode)
        cfg = snapshot.segment_config
        n_levels = len(cfg.levels) if cfg else 0
        if p.single_level is not None and not 0 <= p.single_level < max(1, n_levels):
            raise ValueError(f"single_level must be from 0 to {n_levels - 1} for this index, not {p.single_level}")
        return p

    filterable = True

    def prepare(self, snapshot: Snapshot, mode: str, show_progress: bool = False) -> list[str]:
        from .dense import prepare_global

        return prepare_global(snapshot)  # the candidate stage searches the global field

    def search(self, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params,
               allowed: np.ndarray | None = None) -> SearchResponse:
        assert isinstance(params, MultiVectorParams)
        t_start = time.perf_counter()
        texts, queries = query_vectors(snapshot, query, params)
        timings = {"encode_ms": (time.perf_counter() - t_start) * 1000}  # decomposition included
        n_allowed = len(snapshot) if allowed is None else int(allowed.sum())
        n_candidates, stage = stage_for(params, n_allowed)
        candidates: np.ndarray | None
        if 0 < n_candidates < n_allowed:  # filters first, then the candidate stage among what they allow
            t0 = time.perf_counter()
            candidates = candidate_positions(snapshot, queries, n_candidates, allowed, stage, params.weight_global)
            timings["candidates_ms"] = (time.perf_counter() - t0) * 1000
        else:
            candidates = None if allowed is None else np.flatnonzero(allowed)  # the scheduler starts from these
        shortlist = max(k, params.rescore)
        from ..compress.coded import global_vectors  # the quantised rows when `compress --field global`

        scores, positions, stats = mv.search(mode, segment_table(snapshot), global_vectors(snapshot), queries,
                                             shortlist, params.config(), candidates)
        if params.rescore:
            again = rescore(snapshot, mode, queries, positions, k, params.config())
            if again is not None:
                scores, positions, extra = again
                stats.sim_ops += extra.sim_ops
            else:
                scores, positions = scores[:k], positions[:k]
        timings["search_ms"] = (time.perf_counter() - t_start) * 1000 - timings["encode_ms"]
        return SearchResponse(hits_from(snapshot, snapshot.ids[positions], scores), mode, stats, texts,
                              timings=timings, generation=snapshot.generation)

    def explain(self, snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int], k: int, params: Params,
                response: SearchResponse | None = None) -> list[Explanation]:
        from ..explain import explain_segments

        assert isinstance(params, MultiVectorParams)
        return explain_segments(snapshot, mode, query, ids, k, params, response)
