"""Why did an image match? Per sub-query, the regions that scored, with their boxes.

For a query (text or example image), an image id and a search mode,
:func:`explain` recomputes the image's score the way the search does
(see :mod:`finegrain.search.multivector`)::

    seg_j(d) = max over visited levels of max over the level's segments <q_j, segment>
    score(d) = w * <q_0, global(d)> + (1 - w) * mean over j = 0..N of seg_j(d)

and reports, for each (sub-)query q_j, the best segment at every visited
level (its box in pixels of the original, upright image, and its score) and
the best one overall. In ``global`` mode, or for an index without segments,
only the global score is reported and the subquery list holds the full query.

Visited levels follow the mode: ``single`` one level, ``exhaustive`` all of
them, ``hierarchical`` the scheduler's levels up to where the search stopped
(the search is re-run on the query to know that). An image the hierarchical
search pruned is explained over the same levels as the results, so its
explained score is what it would have scored had it survived.

Typical use::

    from finegrain.explain import explain
    e = explain(index, image_id=3, text="a dog with a red ball", mode="hierarchical")
    for sq in e.subqueries:
        print(sq.text, sq.score, sq.best.box if sq.best else None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .images import ImageSource
from .retrieval.base import Query
from .search import multivector
from .search.multivector import MultiVectorConfig

if TYPE_CHECKING:  # pragma: no cover
    from .index import Index
    from .retrieval.base import SearchResponse
    from .retrieval.multivector import MultiVectorParams
    from .store.snapshot import Snapshot

#: Label of the one "sub-query" of an example-image query.
IMAGE_QUERY_LABEL = "query image"

__all__ = ["RegionMatch", "SubQueryExplanation", "Explanation", "explain", "explain_many", "explain_global",
           "explain_segments", "explain_objects"]


@dataclass(frozen=True)
class RegionMatch:
    """The best region of one field at one level for one (sub-)query."""

    field: str  # vector field: "segments" (objects and local features later)
    level: int  # index into the index's segment levels, coarse to fine
    granularity: int  # superpixels requested at that level
    box: tuple[int, int, int, int]  # x0 y0 x1 y1, pixels of the original upright image
    score: float  # cosine similarity with the (sub-)query


@dataclass(frozen=True)
class SubQueryExplanation:
    """One (sub-)query: its score seg_j(d), its best region and the best region of every visited level."""

    text: str
    full_query: bool
    score: float  # seg_j(d); the global score when no region was visited
    best: RegionMatch | None
    levels: tuple[RegionMatch, ...]


@dataclass(frozen=True)
class Explanation:
    """Why image ``id`` scored ``score`` for a query in ``mode``."""

    id: int
    mode: str
    score: float
    global_score: float
    weight_global: float
    image_size: tuple[int, int]  # width, height of the original upright image (boxes are in these pixels)
    levels_visited: tuple[int, ...]
    subqueries: tuple[SubQueryExplanation, ...]

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("score", "global_score"):
            d[key] = round(d[key], 6)
        d["subqueries"] = list(d["subqueries"])
        for sq in d["subqueries"]:
            sq["score"] = round(sq["score"], 6)
            sq["levels"] = list(sq["levels"])
            for region in ([sq["best"]] if sq["best"] else []) + sq["levels"]:
                region["score"] = round(region["score"], 6)
                region["box"] = list(region["box"])
        d["image_size"] = list(d["image_size"])
        d["levels_visited"] = list(d["levels_visited"])
        return d


def explain(index: Index, image_id: int, text: str | None = None, image: ImageSource | None = None,
            mode: str = "global", bbox: Sequence[float] | None = None, k: int = 10, **options: Any) -> Explanation:
    """Explain how image ``image_id`` scores for a text or example-image query in ``mode``.

    ``k`` is the search's k and ``options`` the search's options, as in
    :meth:`finegrain.Index.search`. Raises ``KeyError`` for an unknown id and
    ``ValueError`` for a bad mode or query.
    """
    return explain_many(index, [image_id], text=text, image=image, mode=mode, bbox=bbox, k=k, **options)[0]


def explain_many(index: Index, image_ids: Sequence[int], text: str | None = None, image: ImageSource | None = None,
                 mode: str = "global", bbox: Sequence[float] | None = None, k: int = 10,
                 response: SearchResponse | None = None, **options: Any) -> list[Explanation]:
    """:func:`explain` for several images of one query (the query is embedded once).

    ``response``: the search's own response, which saves re-running a
    hierarchical search to learn where it stopped.
    """
    return index.explain(image_ids, text=text, image=image, mode=mode, bbox=bbox, k=k, response=response, **options)


# ------------------------------------------------------------------ per family (called by the retrievers)
def explain_global(snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int]) -> list[Explanation]:
    """The global score of the whole image (modes without regions to show)."""
    from .retrieval.dense import embed_query

    vector = embed_query(snapshot, query)
    label = query.text if query.text is not None else query.describe() if query.combined else IMAGE_QUERY_LABEL
    out = []
    for image_id in ids:
        rec = snapshot.records[int(image_id)]
        score = float(snapshot.global_rows.vectors[int(snapshot.positions([rec.id])[0])] @ vector)
        out.append(Explanation(rec.id, mode, score, score, 1.0, _size(rec), (), (
            SubQueryExplanation(label, True, score, None, ()),)))
    return out


def explain_objects(snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int]) -> list[Explanation]:
    """Object modes: the stored object that matched the query best (its box and score)."""
    from .objects.search import explain_match
    from .retrieval.objects import embed_object_query

    vector = embed_object_query(snapshot, query)
    out = []
    for image_id in ids:
        rec = snapshot.records[int(image_id)]
        match = explain_match(snapshot, rec.id, vector)
        whole = next((o["score"] for o in match["objects"] if o["box"] == [0, 0, *_size(rec)]), match["score"])
        best = RegionMatch("objects", 0, len(match["objects"]), tuple(match["box"]), float(match["score"])) \
            if match["box"] is not None else None
        out.append(Explanation(rec.id, mode, float(match["score"]), float(whole), 0.0, _size(rec), (0,), (
            SubQueryExplanation(query.text if query.text is not None else query.describe() if query.combined
                                else "example image", True, float(match["score"]),
                                best, (best,) if best else ()),)))
    return out


def explain_segments(snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int], k: int,
                     params: MultiVectorParams, response: SearchResponse | None = None) -> list[Explanation]:
    """Multi-vector modes: per (sub-)query the best segment of every visited level (see the module docstring)."""
    from .compress.coded import global_vectors
    from .retrieval.multivector import query_vectors, segment_table

    texts, vectors = query_vectors(snapshot, query, params)
    labels = tuple(texts) if texts else (query.describe(),) if query.combined else (IMAGE_QUERY_LABEL,)
    config = params.config()
    levels = _visited_levels(snapshot, mode, vectors, config, k, response)
    table = segment_table(snapshot)
    out = []
    for image_id in ids:
        rec = snapshot.records[int(image_id)]
        pos = int(snapshot.positions([rec.id])[0])
        global_score = float(global_vectors(snapshot)[pos] @ vectors[0])  # as the search scored it
        out.append(_explain_segments(snapshot, table, rec, pos, labels, vectors, mode, levels, global_score,
                                     config.weight_global))
    return out


def _explain_segments(snapshot: Snapshot, table: multivector.SegmentTable, rec, pos: int, labels: tuple[str, ...],
                      vectors: np.ndarray, mode: str, levels: list[int], global_score: float,
                      weight: float) -> Explanation:
    from .compress import storage

    seg, codec = storage.scoring(snapshot, "segments")  # compact rows and their codec when stored compact
    rows = np.flatnonzero(seg.owners == rec.id)
    sims = codec.scores(seg.vectors[rows], codec.project(vectors))  # (S, Q)
    seg_levels = np.asarray(seg.attrs["level"])[rows]
    boxes = np.asarray(seg.attrs["box"], np.float32)[rows]
    width, height = _size(rec)
    cfg = snapshot.segment_config
    assert cfg is not None
    granularity = cfg.levels
    subqueries = []
    for j, qtext in enumerate(labels):
        per_level = []
        for level in levels:
            at = np.flatnonzero(seg_levels == level)
            if len(at) == 0:
                continue
            r = at[int(np.argmax(sims[at, j]))]
            per_level.append(RegionMatch("segments", int(level), int(granularity[level]),
                                         _pixel_box(boxes[r], width, height), float(sims[r, j])))
        best = max(per_level, key=lambda m: m.score) if per_level else None
        # As multivector.combine: a query with no visited region falls back to the global score.
        subqueries.append(SubQueryExplanation(qtext, j == 0, best.score if best else global_score, best,
                                              tuple(per_level)))
    total = weight * global_score + (1.0 - weight) * float(np.mean([sq.score for sq in subqueries]))
    return Explanation(rec.id, mode, total, global_score, weight, (width, height), tuple(levels), tuple(subqueries))


def _visited_levels(snapshot: Snapshot, mode: str, vectors: np.ndarray, config: MultiVectorConfig, k: int,
                    response: SearchResponse | None) -> list[int]:
    from .compress.coded import global_vectors
    from .retrieval.multivector import segment_table

    cfg = snapshot.segment_config
    assert cfg is not None
    n_levels = len(cfg.levels)
    if mode == "single":
        return [config.single_level if config.single_level is not None else n_levels // 2]
    if mode == "exhaustive":
        return list(range(n_levels))
    if response is not None:
        levels_visited = response.stats.levels_visited
    else:  # hierarchical: where the search stops depends on the whole collection
        _, _, stats = multivector.search(mode, segment_table(snapshot), global_vectors(snapshot), vectors, k,
                                         config)
        levels_visited = stats.levels_visited
    return multivector.schedule(n_levels, config)[:levels_visited]


def _size(rec) -> tuple[int, int]:
    return int(rec.width or 0), int(rec.height or 0)


def _pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised box in pixels (at least 1 px wide and high), as ``Segments.pixel_boxes``."""
    x0, y0, x1, y1 = (int(round(float(v) * s)) for v, s in zip(box, (width, height, width, height)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)
