"""``l2g`` over a shard set, ranked as one index holding every image would rank it.

L2G re-ranks a shortlist by placing its images relative to each other: MDS over
their pairwise similarities, which come from each image's stored neighbour list
(its best images by approximate Chamfer). A shard alone knows only neighbours in
the same shard, and re-ranking each shard's shortlist separately places images
among the wrong company, so a set runs two rounds instead:

1. every shard returns its first-stage shortlist (image ids, local scores,
   global descriptors; :meth:`Index.l2g_candidates`) and the front end keeps
   the best ``shortlist`` images of the union, as one index would;
2. the front end re-ranks that shortlist once, with the **set's neighbour
   lists**: each image's best neighbours over all shards. They are built once
   per state of the set, like one index builds its own, by sending each
   image's descriptors to every shard (each answers for its own images) and
   merging; cached in ``SET/ann/`` (in memory only if the folder is read-only).

The result equals one index's wherever the first stage's scores do: the
approximate Chamfer search is per shard (each has its own descriptor index), so
on large shards the candidates can differ from one index's as they do in the
``local`` mode (docs/scaling.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import progress_bar
from ..rerank.mds import l2g_rerank
from ..retrieval import SearchResponse, SearchResult, SearchStats
from ..retrieval.local import L2GCandidates, LocalParams
from .search import split_options

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval.base import Query
    from ..retrieval.filters import Filters
    from ..shards import ShardedIndex

__all__ = ["SetGraph", "set_graph", "search"]

#: Neighbours kept per image (what one index keeps: ``LocalSearcher.graph_m``).
GRAPH_M = 50
#: Images whose descriptors are sent to the shards in one call.
BATCH = 64


@dataclass
class SetGraph:
    """Each image's best images over the whole set: ``keys`` (n, 2) ``[shard, image id]`` per row, ``ids``
    (n, m) rows of ``keys`` (-1 padded) best first, ``sims`` (n, m) their approximate Chamfer similarities."""

    keys: np.ndarray
    ids: np.ndarray
    sims: np.ndarray

    def rows(self, shards: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Row of each ``(shards[i], ids[i])``; ``KeyError`` if one is missing (the set changed since the build).

        ``keys`` are sorted by shard then id (the build's order), so one binary search finds them all.
        """
        packed = self.keys[:, 0] * (1 << 40) + self.keys[:, 1]
        want = np.asarray(shards, np.int64) * (1 << 40) + np.asarray(ids, np.int64)
        pos = np.minimum(np.searchsorted(packed, want), len(packed) - 1)
        if len(want) and (packed[pos] != want).any():
            raise KeyError("an image of the shortlist is not in the set's neighbour lists")
        return pos


def _key(sharded: ShardedIndex, m: int) -> str:
    state = [[name, int(s.generation), len(s)] for name, s in zip(sharded.shard_names(), sharded.shards)]
    return hashlib.sha256(json.dumps([state, m]).encode()).hexdigest()[:20]


def set_graph(sharded: ShardedIndex, m: int = GRAPH_M, show_progress: bool = False) -> SetGraph:
    """The set's neighbour lists for its current state (built, or read from ``SET/ann/``)."""
    key = _key(sharded, m)
    cached = sharded.derived.get("set-graph")
    if cached is not None and cached[0] == key:
        return cached[1]
    path = Path(sharded.path) / "ann" / f"setgraph-{key}.npz"
    graph = _read(path)
    if graph is None:
        graph = _build(sharded, m, show_progress)
        _write(path, graph)
    sharded.derived["set-graph"] = (key, graph)
    return graph


def _build(sharded: ShardedIndex, m: int, show_progress: bool) -> SetGraph:
    shards = sharded.shards
    ids_per_shard = [np.asarray(s.image_ids(), np.int64) for s in shards]
    keys = np.concatenate([np.stack([np.full(len(ids), n, np.int64), ids], axis=1)
                           for n, ids in enumerate(ids_per_shard)]) if shards else np.zeros((0, 2), np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in ids_per_shard])])
    nbr = np.full((len(keys), m), -1, np.int64)
    sims = np.zeros((len(keys), m), np.float32)
    with progress_bar(len(keys), "set neighbour lists", show_progress) as bar:
        for n, ids in enumerate(ids_per_shard):
            for start in range(0, len(ids), BATCH):
                part = ids[start:start + BATCH]
                desc = shards[n].local_descriptors(part.tolist())
                found_rows, found_sims = [], []
                for j, other in enumerate(shards):
                    exclude = part.tolist() if j == n else None  # an image is not its own neighbour
                    got, s = other.local_neighbours(desc, m, exclude)
                    rows = np.where(got >= 0, offsets[j] + np.searchsorted(ids_per_shard[j], np.maximum(got, 0)), -1)
                    found_rows.append(rows)
                    found_sims.append(np.where(got >= 0, s, -np.inf))
                rows = np.concatenate(found_rows, axis=1)
                s = np.concatenate(found_sims, axis=1)
                # the best m over every shard; ties by row, as one index orders equal scores by position
                order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -s), axis=1)[:, :m]
                rows = np.take_along_axis(rows, order, 1)
                s = np.take_along_axis(s, order, 1)
                at = offsets[n] + start
                nbr[at:at + len(part), :rows.shape[1]] = rows
                sims[at:at + len(part), :rows.shape[1]] = np.where(rows >= 0, s, 0.0)
                bar.advance(len(part))
    return SetGraph(keys, nbr, sims)


def _read(path: Path) -> SetGraph | None:
    import zipfile

    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return SetGraph(z["keys"], z["ids"], z["sims"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a damaged cache file: rebuild it
        return None


def _write(path: Path, graph: SetGraph) -> None:
    import os
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
        os.close(fd)
        np.savez(tmp, keys=graph.keys, ids=graph.ids, sims=graph.sims)
        os.replace(tmp, path)
    except OSError:  # a read-only set: kept in memory for this process only
        pass


def search(sharded: ShardedIndex, query: Query, k: int, options: dict[str, Any], filters: Filters,
           threshold: float | None, offset: int, sort: str) -> SearchResponse:
    """``l2g`` over the set in two rounds (module docstring); hits name their shard."""
    from ..retrieval import filters as filtering

    LocalParams.from_options(options, mode="l2g")  # bad options fail before any shard works
    cfg, _ = split_options({key: v for key, v in options.items() if v is not None})
    if cfg.pairs != "graph":  # the shortlist's descriptors live on the shards; the set's graph is the one path
        raise ValueError("pairs='online' works on one index; a shard set re-ranks with its stored neighbour graph "
                         "(pairs='graph')")
    depth = max(int(cfg.k or 0), offset + k if sort == "score" else filtering.DATE_SORT_DEPTH)
    flt = None if filters.empty else filters
    parts, missing = sharded.gather(lambda s: s.l2g_candidates(query, depth, filters=flt, **options))
    answered = [(n, p) for n, p in enumerate(parts) if p is not None]
    pool = sorted(((float(p.scores[r]), n, r) for n, p in answered for r in range(len(p.ids))),
                  key=lambda t: (-t[0], t[1], t[2]))
    head, tail = pool[:cfg.k], pool[cfg.k:depth]
    first = answered[0][1]
    timings = {f"shard{n}_{key}": v for n, p in answered for key, v in p.timings.items()}
    ranked: list[tuple[float, int, int]] = []  # (score, shard, row in that shard's candidates)
    if head:
        graph = set_graph(sharded)
        shortlist = graph.rows(np.array([n for _, n, _ in head]),
                               np.array([_part(parts, n).ids[r] for _, n, r in head]))
        G = np.stack([_part(parts, n).vectors[r] for _, n, r in head])
        res = l2g_rerank(np.array([s for s, _, _ in head], np.float32), shortlist, first.query_vector, G, cfg,
                         graph=(graph.ids, graph.sims))
        where = {int(row): i for i, row in enumerate(shortlist)}
        ranked = [(float(score), head[where[int(row)]][1], head[where[int(row)]][2])
                  for row, score in zip(res.ids, res.scores)]
        timings.update({f"rerank_{key}": v for key, v in res.timings.items()})
    ranked += tail
    hits = [(score, n, r) for score, n, r in ranked if threshold is None or score >= threshold]
    if sort != "score":
        sign = -1.0 if sort == "-date" else 1.0

        def when(t: tuple[float, int, int]) -> tuple:
            taken = float(_part(parts, t[1]).taken[t[2]])
            return (not math.isfinite(taken), sign * taken if math.isfinite(taken) else 0.0, -t[0])

        hits.sort(key=when)
    page = hits[offset:offset + k]
    results = []
    for rank, (score, n, r) in enumerate(page):
        part = _part(parts, n)
        taken = None
        if sort != "score":
            t = float(part.taken[r])
            taken = filtering.iso(t) if math.isfinite(t) else None
        results.append(SearchResult(int(part.ids[r]), part.paths[r], score, offset + rank, shard=n, taken=taken))
    allowed = None if flt is None else sum(p.allowed or 0 for _, p in answered)
    return SearchResponse(results, "l2g", SearchStats(sim_ops=sum(len(sharded.shards[n]) for n, _ in answered)),
                          [], timings, partial=list(missing), allowed=allowed)


def _part(parts: list[L2GCandidates | None], n: int) -> L2GCandidates:
    part = parts[n]
    assert part is not None  # only answered shards' rows enter the pool
    return part

