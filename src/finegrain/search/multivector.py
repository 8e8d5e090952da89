"""HiMIR multi-vector scoring: "1+N" (``single``), "1+M+N" (``exhaustive``) and the scheduler (``hierarchical``).

Queries: the full text query (the "1") and its sub-queries (the "N"), all
embedded. Images: one global vector plus SLIC segments at M granularities.

Score of image d (every mode)::

    seg_j(d)  = max over visited levels l of  max over segments s of d at level l  <q_j, s>
    score(d)  = w * <q_0, g_d>  +  (1 - w) * mean_j seg_j(d)        (j = 0..N, q_0 = full query)

``single`` visits one level, ``exhaustive`` all of them, ``hierarchical``
runs the paper's Algorithm 1: levels coarse to fine; after each level the
lowest-ranked share of the remaining candidates is dropped (share T at the
first level, multiplied by alpha after each); the search stops early once
Kendall's tau between the top-K of two consecutive levels reaches tau;
levels can be skipped (granularity stride S_G, or an offline list of
redundant levels). Every mode counts its similarity operations (one query
vector against one stored vector).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..compress.storage import IDENTITY, Codec
from ..retrieval.base import SearchStats, number
from ..store.vectors import FieldRows

MODES = ("global", "single", "exhaustive", "hierarchical")


@dataclass(frozen=True)
class MultiVectorConfig:
    """Scoring and scheduling knobs (saved in the index by ``finegrain tune``; per-call overrides allowed).

    Parameters
    ----------
    weight_global:
        Weight w of the full query's global score against the segment scores.
    single_level:
        Level index used by ``single`` mode (None: the middle level).
    T, alpha:
        Share of candidates dropped after the first visited level, and its
        multiplier per level (``hierarchical``).
    tau, top_k:
        Early exit once Kendall's tau between the top-``top_k`` lists of two
        consecutive levels is at least ``tau`` (``hierarchical``).
    stride:
        Granularity stride S_G: visit levels 0, S_G, 2 S_G, ... (the finest is always visited).
    skip_levels:
        Levels judged redundant offline, never visited by ``hierarchical``.
    """

    weight_global: float = 0.5
    single_level: int | None = None
    T: float = 0.5
    alpha: float = 0.8
    tau: float = 0.9
    top_k: int = 10
    stride: int = 1
    skip_levels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_levels", tuple(int(v) for v in self.skip_levels))
        number("weight_global", self.weight_global, 0.0, 1.0)
        if self.single_level is not None:
            number("single_level", self.single_level, 0, integer=True)
        number("T", self.T, 0.0, 1.0)
        number("alpha", self.alpha, 0.0, 1.0)
        number("tau", self.tau, -1.0)  # above 1: never stop early
        number("top_k", self.top_k, 1, integer=True)
        number("stride", self.stride, 1, integer=True)
        if any(v < 0 for v in self.skip_levels):
            raise ValueError(f"skip_levels must be level numbers >= 0, not {self.skip_levels}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> MultiVectorConfig:
        d = dict(d or {})
        if "skip_levels" in d:
            d["skip_levels"] = tuple(d["skip_levels"])
        return cls(**d)


@dataclass
class _Piece:
    """Segments of the images at positions ``start .. stop - 1``, grouped by level then image (CSR offsets)."""

    start: int
    stop: int
    vectors: list[np.ndarray]  # per level: rows in position order (a view of the mapped chunk where possible)
    offsets: list[np.ndarray]  # per level: (stop - start + 1,) row offsets of each image

    @classmethod
    def build(cls, rows: FieldRows, positions: np.ndarray, start: int, stop: int, n_levels: int) -> _Piece:
        levels = np.asarray(rows.attrs["level"])
        vectors, offsets = [], []
        for level in range(n_levels):
            at = np.flatnonzero(levels == level)
            at = at[np.argsort(positions[at], kind="stable")]
            if len(at) and at[-1] - at[0] + 1 == len(at) and np.all(np.diff(at) == 1):
                vectors.append(rows.vectors[at[0]:at[-1] + 1])  # one run of the file: a view, no copy
            else:
                vectors.append(np.ascontiguousarray(rows.vectors[at]))
            offsets.append(np.searchsorted(positions[at], np.arange(start, stop + 1)))
        return cls(start, stop, vectors, offsets)

    def level_max(self, level: int, queries: np.ndarray, codec: Codec = IDENTITY) -> tuple[np.ndarray, int]:
        """Every image of the piece (its rows scored where they lie: no gather)."""
        off = self.offsets[level]
        return _max_per_image(self.vectors[level], np.diff(off), queries, codec)


class SegmentTable:
    """Segment vectors grouped by level, then by image, for fast per-image max.

    ``image_order`` gives the image ids in "position" order (the global
    field's row order); scores come back in that order. ``segments`` is one
    :class:`FieldRows` or a list of them (one per stored chunk). Chunks are
    written level-major and cover consecutive images, so each chunk becomes
    one *piece* whose per-level arrays are views of the memory-mapped file:
    no copy of the vectors is made. Rows that do not fit that shape are
    gathered into one piece (a copy).

    ``codec``: how the stored rows relate to the joint space when the field is stored compact
    (``finegrain compress --field segments``); :meth:`level_max` takes queries already passed
    through :meth:`project`, which :func:`search` does.
    """

    def __init__(self, segments: FieldRows | list[FieldRows], image_order: np.ndarray, n_levels: int,
                 codec: Codec = IDENTITY):
        self.n_images = len(image_order)
        self.n_levels = n_levels
        self.codec = codec
        parts = [segments] if isinstance(segments, FieldRows) else [p for p in segments if len(p)]
        sorter = np.argsort(image_order)
        positions = [sorter[np.searchsorted(image_order, p.owners, sorter=sorter)] for p in parts]
        if not _consecutive(positions):
            dim = parts[0].vectors.shape[1] if parts else 1
            merged = FieldRows.concat(parts, dim)
            parts, positions = [merged], [np.concatenate(positions) if positions else np.zeros(0, np.int64)]
        starts = [0] + [int(p.min()) for p in positions[1:]]
        stops = starts[1:] + [self.n_images]
        self.pieces = [_Piece.build(part, pos, a, b, n_levels)
                       for part, pos, a, b in zip(parts, positions, starts, stops)]
        # Per level, the pieces' rows numbered as if concatenated: ``bases`` (where each piece's rows begin)
        # and ``offsets`` (each image's first row, over all positions), so a candidate set's rows are found
        # with a few array operations whatever the number of chunks (one per commit in a large index).
        self._bases, self._offsets = [], []
        for level in range(n_levels):
            sizes = [len(p.vectors[level]) for p in self.pieces]
            bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            heads = [p.offsets[level][:-1] + base for p, base in zip(self.pieces, bases)]
            self._bases.append(bases)
            self._offsets.append(np.concatenate([*heads, bases[-1:]]).astype(np.int64))

    def level_max(self, level: int, queries: np.ndarray, candidates: np.ndarray | None = None
                  ) -> tuple[np.ndarray, int]:
        """(n_candidates, n_queries) best segment score per image at ``level``, and the ops spent.

        Images without segments at that level score -inf. ``candidates``: ascending positions.
        """
        if not self.pieces:  # no segment rows at all
            return np.full((self.n_images if candidates is None else len(candidates), len(queries)), -np.inf,
                           np.float32), 0
        if candidates is None:
            if len(self.pieces) == 1:
                return self.pieces[0].level_max(level, queries, self.codec)
            out = np.full((self.n_images, len(queries)), -np.inf, np.float32)
            ops = 0
            for piece in self.pieces:
                out[piece.start:piece.stop], spent = piece.level_max(level, queries, self.codec)
                ops += spent
            return out, ops
        # The candidates' rows, gathered from every piece into one array and scored in one call: one
        # scoring call and one reduceat per level, not one of each per chunk.
        off = self._offsets[level]
        counts = off[candidates + 1] - off[candidates]
        rows = np.repeat(off[candidates] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        bases = self._bases[level]
        cuts = np.searchsorted(rows, bases)  # rows ascend with the candidates: each piece's share is one slice
        first = self.pieces[0].vectors[level]
        vecs = np.empty((len(rows), first.shape[1]), first.dtype)
        for p in np.flatnonzero(cuts[1:] > cuts[:-1]):  # the pieces holding candidates' rows
            a, b = cuts[p], cuts[p + 1]  # mode="clip" lets take() write into vecs (rows in range by construction)
            np.take(self.pieces[p].vectors[level], rows[a:b] - bases[p], axis=0, out=vecs[a:b], mode="clip")
        return _max_per_image(vecs, counts, queries, self.codec)

    def project(self, queries: np.ndarray) -> np.ndarray:
        """Joint-space queries in the stored rows' space (the field's projection; identity when it has none)."""
        return self.codec.project(queries)

    def image_rows(self, level: int, position: int) -> np.ndarray:
        """The segment vectors of the image at ``position`` at ``level``."""
        piece = next(p for p in self.pieces if p.start <= position < p.stop)
        off = piece.offsets[level]
        i = position - piece.start
        return piece.vectors[level][off[i]:off[i + 1]]


def _max_per_image(vecs: np.ndarray, counts: np.ndarray, queries: np.ndarray, codec: Codec
                   ) -> tuple[np.ndarray, int]:
    """(len(counts), n_queries) best score of each image's run of ``counts[i]`` consecutive rows (-inf: none)."""
    out = np.full((len(counts), len(queries)), -np.inf, np.float32)
    if len(vecs):
        sims = codec.scores(vecs, queries)  # float32 rows as they are; float16/int8 in blocks
        nonempty = counts > 0
        out[nonempty] = np.maximum.reduceat(sims, (np.cumsum(counts) - counts)[nonempty], axis=0)
    return out, int(len(vecs) * len(queries))


def _consecutive(positions: list[np.ndarray]) -> bool:
    """Whether each part's images come after all images of the parts before it (chunks in commit order)."""
    last = -1
    for pos in positions:
        if len(pos) == 0:
            return False
        if int(pos.min()) <= last:
            return False
        last = int(pos.max())
    return True


def combine(global_scores: np.ndarray, segment_scores: np.ndarray, weight_global: float) -> np.ndarray:
    """w * global + (1 - w) * mean over queries of their best segment score (unvisited -> global)."""
    seg = np.where(np.isfinite(segment_scores), segment_scores, global_scores[:, None])
    return weight_global * global_scores + (1.0 - weight_global) * seg.mean(axis=1)


def schedule(n_levels: int, config: MultiVectorConfig) -> list[int]:
    """Levels the hierarchical mode visits, coarse to fine (stride, skips; the finest always kept)."""
    stride = max(1, int(config.stride))
    levels = [lv for lv in range(0, n_levels, stride) if lv not in config.skip_levels]
    if (n_levels - 1) not in levels and (n_levels - 1) not in config.skip_levels:
        levels.append(n_levels - 1)
    return levels or [n_levels - 1]


def topk_tau(previous: np.ndarray, current: np.ndarray) -> float:
    """Kendall's tau between two top-K lists (items missing from a list rank just after it)."""
    items = np.unique(np.concatenate([previous, current]))
    k = max(len(previous), len(current))
    a, b = _ranks_in(previous, items, k), _ranks_in(current, items, k)
    # tau-b over all pairs (ties from the shared "missing" rank handled as scipy does);
    # a few dozen items, so the O(n^2) sign matrices are cheaper than a scipy call.
    sa, sb = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    norm = math.sqrt(float((sa * sa).sum()) * float((sb * sb).sum()))
    if norm == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float((sa * sb).sum()) / norm


def _ranks_in(ranking: np.ndarray, items: np.ndarray, missing: int) -> np.ndarray:
    """Rank of each of ``items`` in ``ranking`` (``missing`` where absent)."""
    ranks = np.full(len(items), missing, dtype=np.int64)
    ranks[np.searchsorted(items, ranking)] = np.arange(len(ranking))
    return ranks


def search(mode: str, table: SegmentTable, global_vectors: np.ndarray, queries: np.ndarray, k: int,
           config: MultiVectorConfig, candidates: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Rank images; returns (scores, positions, stats), best first, at most ``k``.

    ``queries`` is (1 + N, dim): the full query first, then sub-queries.
    Positions index ``global_vectors`` (the global field's row order).
    ``candidates``: ascending positions, the only images scored (filters); None: all.
    """
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}; available: {', '.join(MODES)}")
    stats = SearchStats()
    n = len(global_vectors)
    if candidates is None:
        positions = np.arange(n)
        global_scores = global_vectors @ queries[0]
    else:
        positions = np.asarray(candidates, np.int64)
        global_scores = np.asarray(global_vectors[positions], np.float32) @ queries[0]
    m = len(positions)
    stats.sim_ops += m
    if mode == "global" or m == 0:
        return _top(positions, global_scores, k) + (stats,)
    subset = None if m == n else positions
    queries = table.project(queries)  # segment scores in the stored rows' space (compact fields); global done
    if mode in ("single", "exhaustive"):
        if mode == "single":
            levels = [config.single_level if config.single_level is not None else table.n_levels // 2]
        else:
            levels = list(range(table.n_levels))
        best = np.full((m, len(queries)), -np.inf, np.float32)
        for level in levels:
            scores, ops = table.level_max(level, queries, subset)
            best = np.maximum(best, scores)
            stats.sim_ops += ops
            stats.candidates_per_level.append(m)
        stats.levels_visited = len(levels)
        return _top(positions, combine(global_scores, best, config.weight_global), k) + (stats,)
    return _hierarchical(table, positions, global_scores, queries, k, config, stats)


def _hierarchical(table, candidates, global_scores, queries, k, config, stats):
    # global_scores is aligned with candidates (ascending positions); both shrink together as levels prune.
    best = np.full((len(candidates), len(queries)), -np.inf, np.float32)  # aligned with candidates
    drop, previous = config.T, None
    combined = global_scores
    for level in schedule(table.n_levels, config):
        everyone = len(candidates) == table.n_images  # nothing pruned yet: no gather needed
        scores, ops = table.level_max(level, queries, None if everyone else candidates)
        stats.sim_ops += ops
        stats.levels_visited += 1
        stats.candidates_per_level.append(len(candidates))
        best = np.maximum(best, scores)
        combined = combine(global_scores, best, config.weight_global)
        order = np.argsort(-combined, kind="stable")
        top = candidates[order[:config.top_k]]
        if previous is not None and topk_tau(previous, top) >= config.tau:
            break
        previous = top
        keep = max(k, config.top_k, int(math.ceil(len(candidates) * (1.0 - drop))))
        # Kept in position order: each image's segments are contiguous, so the next
        # level's gather reads memory in runs instead of jumping around.
        keep_idx = np.sort(order[:keep])
        candidates, best, combined = candidates[keep_idx], best[keep_idx], combined[keep_idx]
        global_scores = global_scores[keep_idx]
        drop *= config.alpha
    return _top(candidates, combined, k) + (stats,)


def _top(positions: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the ``k`` best, best first."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
    order = part[np.argsort(-scores[part], kind="stable")]
    return scores[order].astype(np.float32), positions[order]
