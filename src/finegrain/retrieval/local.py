"""L2G modes over local features: ``instance``, ``global+local``, ``local``, ``l2g`` (image queries).

``instance`` is global search over the stored instance descriptor
(multi-scale GeM of the local-feature CNN); the other three are described
in :mod:`finegrain.local.search`, which does the work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..local.search import LocalSearcher, split_options
from ..rerank.mds import L2GConfig
from .base import IMAGE_ONLY, Params, Query, Retriever, SearchResponse, SearchStats, number
from .dense import hits_from

if TYPE_CHECKING:  # pragma: no cover
    from ..store.snapshot import Snapshot

__all__ = ["L2GCandidates", "LocalParams", "LocalRetriever", "l2g_candidates", "local_searcher"]


@dataclass(frozen=True)
class LocalParams(Params):
    """Options of the local modes: the first stage's knobs and the L2G re-ranking (:class:`L2GConfig`, flat keys).

    ``shortlist`` is the number of images re-ranked (L2GConfig's ``k``); the
    re-ranking keys (``mds_dim``, ``smacof_iter``, ``w``, ...) are given flat,
    as on the command line.
    """

    shortlist: int | None = None
    knn: int | None = None
    nprobe: int | None = None
    query_features: int | None = None
    exact_rerank: int | None = None
    global_field: str = "instance"
    rerank: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("shortlist", "knn", "nprobe", "query_features"):
            value = getattr(self, name)
            if value is not None:
                number(name, value, 1, integer=True)
        if self.exact_rerank is not None:
            number("exact_rerank", self.exact_rerank, 0, integer=True)
        if self.global_field not in ("instance", "joint"):
            raise ValueError("global_field must be 'instance' or 'joint'")
        L2GConfig(**dict(self.rerank))  # its own checks

    @classmethod
    def names(cls) -> list[str]:
        keys = {f.name for f in dataclasses.fields(L2GConfig)} - {"k"}
        return sorted((set(super().names()) - {"rerank"}) | keys)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                     mode: str | None = None) -> LocalParams:
        given = {k: v for k, v in (options or {}).items() if v is not None}
        try:
            cfg, rest = split_options(given)  # unknown keys raise, naming the known ones
        except TypeError as exc:
            raise ValueError(f"bad search option: {exc}") from None
        rerank = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(L2GConfig)
                  if f.name != "k" and f.name in given}
        return cls(rerank=rerank, **rest)

    def options(self) -> dict[str, Any]:
        """Flat keyword options for :meth:`LocalSearcher.search` (unset ones left out)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "rerank" and v is not None}
        return {**d, **dict(self.rerank)}


def local_searcher(snapshot: Snapshot) -> LocalSearcher:
    """The snapshot's local-feature searcher (built once per snapshot; ``ValueError`` without local features)."""
    return snapshot.derived("local-searcher", lambda: LocalSearcher(snapshot))


class LocalRetriever(Retriever):
    name = "local"
    modes = ("instance", "global+local", "local", "l2g")
    query_kinds: ClassVar[dict[str, frozenset[str]]] = {m: IMAGE_ONLY for m in modes}
    params_type = LocalParams
    descriptions: ClassVar[dict[str, str]] = {
        "instance": "global search over the instance descriptor (index with --local cnn)",
        "global+local": "global shortlist re-ranked by exact Chamfer similarity (index with --local)",
        "local": "approximate Chamfer search over local features, verified exactly (index with --local)",
        "l2g": "L2G: local search, then MDS embeddings fused with the global descriptor (index with --local)",
    }

    def missing(self, snapshot: Snapshot, mode: str) -> str | None:
        if snapshot.local_config is None:
            return (f"search mode {mode!r} needs an index with local features; create it with "
                    "`finegrain index ... --local cnn` (or Index.create(..., local=\"cnn\"))")
        from ..compress import storage

        if mode == "instance" and not storage.has_rows(snapshot, "instance") and len(snapshot):  # or int8 rows
            return (f"search mode {mode!r} needs instance descriptors, which the {snapshot.local_config.extractor!r} "
                    "local features do not make (use --local cnn)")
        return None

    filterable = True

    def prepare(self, snapshot: Snapshot, mode: str, show_progress: bool = False) -> list[str]:
        if mode not in ("local", "l2g") or len(snapshot) == 0:
            return []
        searcher = local_searcher(snapshot)
        approx = searcher.approx()
        kind = approx.built_kind  # what was built: below FLAT_BELOW rows an exact (flat) index, whatever was asked
        built = [f"local descriptors: {'flat (exact)' if kind == 'flat' else kind} over {len(approx.rows):,} of "
                 f"{approx.db.n_rows:,} rows"]
        if mode == "l2g":
            ids, _ = searcher.graph(show_progress=show_progress)
            queries, features = searcher.graph_policy()
            built.append(f"l2g neighbour lists: {ids.shape[0]:,} x {ids.shape[1]} (queries: {queries}"
                         + (f", strongest {features}" if features else "") + ")")
        return built

    def search(self, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params,
               allowed: np.ndarray | None = None) -> SearchResponse:
        assert isinstance(params, LocalParams)
        searcher = local_searcher(snapshot)
        image = query.image
        bbox = query.bbox
        if bbox is not None:  # decoded once here: the box is clipped to the image like every mode's
            from ..images import load_image

            image = load_image(image)  # type: ignore[arg-type]
            bbox = query.clip_box(image.size)
        scores, ids, timings = searcher.search("global" if mode == "instance" else mode, image, bbox, k, allowed,
                                               **params.options())
        ops = len(snapshot) if allowed is None else int(allowed.sum())
        return SearchResponse(hits_from(snapshot, ids, scores), mode, SearchStats(sim_ops=ops), [],
                              timings, generation=snapshot.generation)


@dataclass
class L2GCandidates:
    """One index's ``l2g`` shortlist before the re-ranking, for a shard set to merge and re-rank once.

    ``ids``/``scores``: the first stage's images (image ids) and local similarities, best first;
    ``paths``: their files; ``vectors``: their global descriptors (unit rows, ``global_field``'s space);
    ``query_vector``: the query's; ``taken``: capture times (seconds, NaN unknown) for date order;
    ``allowed``: images the filters allowed (None without filters).
    """

    ids: np.ndarray
    scores: np.ndarray
    paths: list[str]
    vectors: np.ndarray
    query_vector: np.ndarray
    taken: np.ndarray
    allowed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


def l2g_candidates(snapshot: Snapshot, query: Query, k: int, options: Mapping[str, Any] | None = None,
                   filters: Any = None) -> L2GCandidates:
    """The first ``k`` images of ``l2g``'s first stage for an image query (see :class:`L2GCandidates`)."""
    from ..images import load_image
    from . import filters as filtering

    retriever = LocalRetriever()
    missing = retriever.missing(snapshot, "l2g")
    if missing:
        raise ValueError(missing)
    if query.image is None or query.text or query.terms:
        raise ValueError("search mode 'l2g' takes one example image")
    params = LocalParams.from_options(options, mode="l2g")
    flt = filtering.Filters.from_options(filters)
    allowed = flt.allowed(snapshot)
    searcher = local_searcher(snapshot)
    t0 = time.perf_counter()
    image, bbox = query.image, query.bbox
    if bbox is not None:
        image = load_image(image)
        bbox = query.clip_box(image.size)
    opts = params.options()
    q, gq = searcher.query_features(image, bbox, opts.get("global_field", "instance"))
    timings = {"extract_ms": (time.perf_counter() - t0) * 1e3}
    if allowed is not None and not allowed.any():
        scores, positions = np.zeros(0, np.float32), np.zeros(0, np.int64)
    else:
        scores, positions, more = searcher.rank_timed("l2g", q, gq, allowed=allowed, shortlist_only=True, **opts)
        timings.update(more)
    scores, positions = scores[:k], positions[:k]
    G = searcher.global_matrix(opts.get("global_field", "instance"))
    gq = np.asarray(gq, np.float32)
    table = filtering.photo_table(snapshot)
    ids = snapshot.ids[positions]
    paths = [snapshot.records[int(i)].path for i in ids]
    return L2GCandidates(ids, np.asarray(scores, np.float32), paths, G[positions],
                         gq / max(float(np.linalg.norm(gq)), 1e-12), table.taken[positions].astype(np.float64),
                         None if allowed is None else int(allowed.sum()), timings)


def local_descriptors(snapshot: Snapshot, ids: Sequence[int]) -> list[np.ndarray]:
    """The stored local descriptors of each image id (``KeyError`` for an unknown id)."""
    return local_searcher(snapshot).descriptors(_positions(snapshot, ids))


def local_neighbours(snapshot: Snapshot, descriptors: Sequence[np.ndarray], m: int | None = None,
                     exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each descriptor set's best images here by approximate Chamfer, as ``l2g``'s stored neighbour lists find
    them: ``(image ids (n, m), -1 padded; sims (n, m))``. ``exclude[r]``: an image id left out of row r (-1: none).
    """
    searcher = local_searcher(snapshot)
    skip = None
    if exclude is not None:
        skip = np.array([-1 if int(i) < 0 else int(_positions(snapshot, [int(i)])[0]) for i in exclude], np.int64)
    positions, sims = searcher.neighbours(descriptors, m, skip)
    ids = np.where(positions >= 0, snapshot.ids[np.maximum(positions, 0)], -1)
    return ids.astype(np.int64), sims


def _positions(snapshot: Snapshot, given: Sequence[int]) -> np.ndarray:
    ids = np.asarray(given, np.int64)
    pos = np.searchsorted(snapshot.ids, ids)
    bad = (pos >= len(snapshot.ids)) | (snapshot.ids[np.minimum(pos, len(snapshot.ids) - 1)] != ids)
    if len(ids) and bad.any():
        raise KeyError(f"unknown image id {int(ids[bad][0])}")
    return pos
