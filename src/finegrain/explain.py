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

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .images import ImageSource
from .local.search import LOCAL_MODES
from .objects.search import OBJECT_MODES
from .search import multivector
from .search.multivector import MultiVectorConfig

#: Label of the one "sub-query" of an example-image query.
IMAGE_QUERY_LABEL = "query image"

__all__ = ["RegionMatch", "SubQueryExplanation", "Explanation", "QueryEmbedding", "embed_query", "explain",
           "explain_many"]


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


@dataclass(frozen=True)
class QueryEmbedding:
    """A query as the search sees it: the texts (full query first) and their (n, dim) embeddings."""

    texts: tuple[str, ...]
    vectors: np.ndarray
    is_image: bool = False


def embed_query(index, mode: str = "global", text: str | None = None, image: ImageSource | None = None,
                bbox: Sequence[float] | None = None, decomposer=None) -> QueryEmbedding:
    """Embed a query like :meth:`finegrain.Index.search_detailed` does (sub-queries only outside ``global``)."""
    if (text is None) == (image is None):
        raise ValueError("give exactly one of text= or image=")
    if image is not None:
        return QueryEmbedding((IMAGE_QUERY_LABEL,), index.embed_query(image=image, bbox=bbox)[None, :], True)
    if mode == "global" or not _has_segments(index):
        return QueryEmbedding((text,), index.embed_query(text=text)[None, :])
    index._check_text(text)
    from .decompose.query import create_decomposer, decompose_query

    texts = decompose_query(text, decomposer or create_decomposer(index.search_config_dict().get("decomposer", "rules")))
    return QueryEmbedding(tuple(texts), index.encoder.encode_texts(texts))


def explain(index, image_id: int, text: str | None = None, image: ImageSource | None = None, mode: str = "global",
            bbox: Sequence[float] | None = None, decomposer=None, k: int = 10, **options) -> Explanation:
    """Explain how image ``image_id`` scores for a text or example-image query in ``mode``.

    ``k`` is the search's k and ``options`` override the index's
    :class:`MultiVectorConfig`, as in :meth:`finegrain.Index.search`. Raises ``KeyError`` for an unknown id and
    ``ValueError`` for a bad mode or query.
    """
    return explain_many(index, [image_id], text=text, image=image, mode=mode, bbox=bbox, decomposer=decomposer,
                        k=k, **options)[0]


def explain_many(index, image_ids: Sequence[int], text: str | None = None, image: ImageSource | None = None,
                 mode: str = "global", bbox: Sequence[float] | None = None, decomposer=None,
                 query: QueryEmbedding | None = None, k: int = 10, levels_visited: int | None = None,
                 **options) -> list[Explanation]:
    """:func:`explain` for several images of one query (the query is embedded once; or pass ``query``).

    ``k`` is the search's k (the hierarchical search's pruning keeps at least
    k candidates); ``levels_visited`` (from the search's ``SearchStats``)
    saves re-running a hierarchical search to learn where it stopped.
    """
    if mode in OBJECT_MODES:
        records = [index.get(i) for i in image_ids]
        return [_explain_objects(index, rec, mode, image, bbox) for rec in records]
    if mode in LOCAL_MODES:
        # Local-feature modes: the explanation shows the global score of the whole image only
        # (individual local matches are not drawn; see docs/service.md).
        if image is None:
            raise ValueError(f"search mode {mode!r} takes an image query")
        return explain_many(index, image_ids, image=image, mode="global", bbox=bbox, query=query, k=k)
    if mode not in multivector.MODES:
        raise ValueError(f"unknown search mode {mode!r}; available: {', '.join(multivector.MODES)}")
    if mode != "global" and not _has_segments(index):
        raise ValueError(f"search mode {mode!r} needs an index built with segments "
                         "(finegrain index ... --segments 4,9,16,25,36)")
    records = [index.get(i) for i in image_ids]  # KeyError for unknown ids, before any work
    if query is None:
        query = embed_query(index, mode, text=text, image=image, bbox=bbox, decomposer=decomposer)
    config = MultiVectorConfig.from_dict({**index.search_config_dict().get("multivector", {}), **options})
    levels = _visited_levels(index, mode, query, config, k, levels_visited)
    out = []
    for rec in records:
        row = int(np.flatnonzero(index.global_rows.owners == rec.id)[0])
        global_score = float(index.global_rows.vectors[row] @ query.vectors[0])
        if not levels:
            out.append(Explanation(rec.id, mode, global_score, global_score, 1.0, _size(rec), (), (
                SubQueryExplanation(query.texts[0], True, global_score, None, ()),)))
            continue
        out.append(_explain_segments(index, rec, query, mode, levels, global_score, config.weight_global))
    return out


def _explain_objects(index, rec, mode: str, image: ImageSource | None, bbox) -> Explanation:
    """Object modes: the stored object that matched the example image best (its box and score)."""
    if image is None:
        raise ValueError(f"search mode {mode!r} takes an image query")
    from .objects.search import explain_match

    match = explain_match(index, rec.id, image, bbox)
    whole = next((o["score"] for o in match["objects"] if o["box"] == [0, 0, *_size(rec)]), match["score"])
    best = RegionMatch("objects", 0, len(match["objects"]), tuple(match["box"]), float(match["score"])) \
        if match["box"] is not None else None
    return Explanation(rec.id, mode, float(match["score"]), float(whole), 0.0, _size(rec), (0,), (
        SubQueryExplanation("example image", True, float(match["score"]), best, (best,) if best else ()),))


def _explain_segments(index, rec, query: QueryEmbedding, mode: str, levels: list[int], global_score: float,
                      weight: float) -> Explanation:
    seg = index.fields["segments"]
    rows = np.flatnonzero(seg.owners == rec.id)
    sims = np.asarray(seg.vectors[rows], np.float32) @ query.vectors.T  # (S, Q)
    seg_levels = np.asarray(seg.attrs["level"])[rows]
    boxes = np.asarray(seg.attrs["box"], np.float32)[rows]
    width, height = _size(rec)
    granularity = index.segment_config.levels
    subqueries = []
    for j, qtext in enumerate(query.texts):
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


def _visited_levels(index, mode: str, query: QueryEmbedding, config: MultiVectorConfig, k: int,
                    levels_visited: int | None) -> list[int]:
    if mode == "global" or not _has_segments(index):
        return []
    n_levels = len(index.segment_config.levels)
    if mode == "single":
        return [config.single_level if config.single_level is not None else n_levels // 2]
    if mode == "exhaustive":
        return list(range(n_levels))
    if levels_visited is None:  # hierarchical: where the search stops depends on the whole collection
        _, _, stats = multivector.search(mode, index.segment_table, index.global_rows.vectors, query.vectors, k, config)
        levels_visited = stats.levels_visited
    return multivector.schedule(n_levels, config)[:levels_visited]


def _has_segments(index) -> bool:
    return index.segment_config is not None and "segments" in index.fields


def _size(rec) -> tuple[int, int]:
    return int(rec.width or 0), int(rec.height or 0)


def _pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised box in pixels (at least 1 px wide and high), as ``Segments.pixel_boxes``."""
    x0, y0, x1, y1 = (int(round(float(v) * s)) for v, s in zip(box, (width, height, width, height)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)
