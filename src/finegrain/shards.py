"""Sharded search: several indexes searched in parallel as one, top-k merged.

A shard set is a folder with a ``shards.json`` manifest naming member
indexes (paths relative to the folder, or absolute)::

    {"format": "finegrain-shards", "version": 1, "shards": ["part-0", "part-1"]}

Each shard is an ordinary finegrain index (built by ``finegrain index``,
locally or with ``--engine ray``), so shards are added, updated and
compacted independently. :class:`ShardedIndex` mirrors :class:`Index`'s
search interface, like FAISS's ``IndexShards``: each shard is searched in
its own thread for the top ``k``, and the union is re-ranked by score. A
result names its shard, since image ids are per shard.

All shards must use the same encoder (scores are then comparable); the
query text or image is embedded once for ``global`` mode. Multi-node:
:class:`finegrain.distributed.RayShardSet` runs the same search and merge with
Ray actors (replicas, failover; a shard with no live replica leaves the
answer ``partial``); see docs/scaling.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from . import retrieval
from .images import ImageSource
from .index import Index
from .retrieval import SearchResponse, SearchResult, SearchStats
from .store.catalog import IndexFormatError

T = TypeVar("T")

MANIFEST = "shards.json"
FORMAT = "finegrain-shards"
VERSION = 1


#: A hit from a shard set: ``id`` is the image id within shard number ``shard`` (kept for older imports).
ShardResult = SearchResult


class ShardUnavailable(RuntimeError):
    """No replica of a shard could answer (every one is down): the set answers without it, flagged ``partial``."""

    def __init__(self, shard: str, reason: str = "no replica is up"):
        super().__init__(f"shard {shard} is unavailable: {reason}")
        self.shard = shard


def is_shard_set(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a shard-set folder (has a ``shards.json``)."""
    return (Path(path) / MANIFEST).is_file()


class ShardedIndex:
    """Read-only search over a set of indexes. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, shards: list[Index], workers: int | None = None):
        self.path = path
        self.shards = shards
        encoders = {self._encoder_name(s) for s in shards}
        if len(encoders) != 1:
            raise IndexFormatError(f"the shards of {path} use different encoders "
                                   f"({', '.join(sorted(map(str, encoders)))}); "
                                   "their scores cannot be merged")
        self._pool = ThreadPoolExecutor(max_workers=workers or max(1, min(len(shards), os.cpu_count() or 1)))
        self.derived: dict[str, Any] = {}  # structures built from the shards' state (l2g's set neighbour lists)

    @staticmethod
    def _encoder_name(shard) -> str:
        """The encoder a shard's vectors come from (a remote shard, see distributed.py, knows it without a catalog)."""
        name = getattr(shard, "encoder_name", None)
        return str(name if name is not None else shard.catalog.get_meta("encoder"))

    @property
    def encoder_name(self) -> str:
        """The encoder every shard's vectors come from."""
        return self._encoder_name(self.shards[0])

    def shard_names(self) -> list[str]:
        """Each shard's name as the manifest lists it (a path relative to the set), in shard order."""
        names = [getattr(s, "name", None) for s in self.shards]
        return [n if isinstance(n, str) else os.path.relpath(os.path.abspath(s.path), os.path.abspath(self.path))
                for n, s in zip(names, self.shards)]

    def gather(self, call: Callable[[Any], T]) -> tuple[list[T | None], list[str]]:
        """``call(shard)`` on every shard in parallel: the answers (None for a shard that could not answer) and the
        names of those shards. A shard is only ever missing when all of its replicas are down (a Ray set)."""
        def run(shard):
            try:
                return call(shard)
            except ShardUnavailable as exc:
                return exc

        answers = list(self._pool.map(run, self.shards))
        missing = [a.shard for a in answers if isinstance(a, ShardUnavailable)]
        if len(missing) == len(answers):
            raise ShardUnavailable(", ".join(missing), "every shard of the set is down")
        return [None if isinstance(a, ShardUnavailable) else a for a in answers], missing

    @classmethod
    def create(cls, path: str | os.PathLike, shards: Sequence[str | os.PathLike]) -> ShardedIndex:
        """Write a shard-set manifest at ``path`` listing existing indexes (stored relative to ``path``).

        Every member is checked first (it opens, is listed once, uses the same encoder as the others): on any
        refusal nothing is created, neither the folder nor the manifest.
        """
        path = Path(path)
        if not shards:
            raise ValueError("a shard set needs at least one index")
        if (path / MANIFEST).exists() or (path / "finegrain.sqlite").exists():
            raise FileExistsError(f"{path} already holds a shard set or an index")
        seen: set[str] = set()
        encoders: dict[str, str] = {}
        for s in shards:  # fail now, not at search time, on a missing, repeated, bad or incompatible shard
            real = os.path.realpath(s)
            if real in seen:
                raise ValueError(f"{s} is listed twice")
            seen.add(real)
            with Index.open(s) as index:
                encoders.setdefault(str(index.catalog.get_meta("encoder")), str(s))
        if len(encoders) != 1:
            raise IndexFormatError(f"the shards of {path} use different encoders "
                                   f"({', '.join(f'{e} in {m}' for e, m in sorted(encoders.items()))}); "
                                   "their scores cannot be merged")
        names = [os.path.relpath(os.path.abspath(s), os.path.abspath(path)) for s in shards]
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "shards": names}, indent=1))
        tmp.replace(path / MANIFEST)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike, encoder=None) -> ShardedIndex:
        """Open every shard listed in ``path/shards.json`` (sharing ``encoder``, an already loaded one, if given)."""
        path = Path(path)
        return cls(path, [Index.open(path / n, encoder=encoder) for n in read_manifest(path)])

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for s in self.shards:
            s.close()

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def refresh(self) -> bool:
        """Pick up images added to any shard since opening; True if something changed."""
        return any([s.refresh() for s in self.shards])

    def search(self, text: str | None = None, image: ImageSource | None = None, k: int = 10, mode: str = "auto",
               bbox: Sequence[float] | None = None, *, negative=None, negative_image=None, terms=(), query=None,
               filters=None, threshold: float | None = None, offset: int = 0, sort: str = "score",
               **options) -> SearchResponse:
        """Search every shard in parallel; the best ``k`` overall, best first (see :meth:`Index.search`).

        Every hit names its shard. ``global`` embeds the query once and sends
        the vector to each shard; the other modes run their whole search on each shard.
        ``auto`` picks one mode for all shards from the modes they all support.
        ``filters``, ``threshold``, ``offset`` and ``sort`` apply to the merged ranking as on one index
        (each shard returns its best ``offset + k``, or its date-sort set, and the union is ordered and paged).
        """
        from .retrieval import filters as filtering
        from .retrieval.auto import AUTO, choose
        from .retrieval.terms import build_query

        k = retrieval.check_k(k)
        retrieval.get(mode)  # an unknown mode fails before any work
        query = build_query(text, image, bbox, negative, negative_image, terms, query)
        requested = mode
        if mode == AUTO:
            mode = choose(self.available_modes(), query)
        flt = filtering.Filters.from_options(filters)
        threshold, offset, sort = filtering.check_page(k, threshold, offset, sort)
        if mode == "l2g":  # its re-ranking needs the whole shortlist in one place: two rounds
            from .local import sharded

            two = sharded.search(self, query, k, options, flt, threshold, offset, sort)
            two.requested_mode = requested if requested != mode else None
            return two
        if not filtering.plain(flt, threshold, offset, sort):
            shaped = self._search_shaped(query, k, mode, flt, threshold, offset, sort, options)
            shaped.requested_mode = requested if requested != mode else None
            return shaped
        if mode == "global":
            from .retrieval.dense import DenseParams

            # an SS2D size: each shard applies its own projection
            dim = DenseParams.from_options(options, mode=mode).dim
            vector = self.embed_query(query)  # embedded once for all shards
            texts = [query.text] if query.text else []
            response = self.search_embedding(vector, k=k, dim=dim)
            response.subqueries = texts
            response.requested_mode = requested if requested != mode else None
            return response
        parts, missing = self.gather(lambda s: s.search(query=query, k=k, mode=mode, **options))
        return self._top(parts, missing, k, mode, requested_mode=requested if requested != mode else None)

    def search_embedding(self, query, k: int = 10, dim: int | None = None) -> SearchResponse:
        """Global search with a precomputed joint-space embedding (as :meth:`Index.search_embedding`) on every
        shard, merged: the best ``k`` overall, each hit naming its shard (``partial`` names shards that could not
        answer)."""
        k = retrieval.check_k(k)
        parts, missing = self.gather(lambda s: SearchResponse(s.search_embedding(query, k=k, dim=dim), "global",
                                                               SearchStats(sim_ops=len(s))))
        return self._top(parts, missing, k, "global")

    def _top(self, parts: list[SearchResponse | None], missing: list[str], k: int, mode: str,
             **extra) -> SearchResponse:
        """The best ``k`` of the shards' hits by score (ties: lower shard, then the shard's own rank)."""
        merged = sorted(((hit.score, n, hit) for n, part in enumerate(parts) for hit in part or ()),
                        key=lambda t: (-t[0], t[1], t[2].rank))[:k]
        hits = [SearchResult(hit.id, hit.path, hit.score, rank, shard=n) for rank, (_, n, hit) in enumerate(merged)]
        return self._merged(hits, mode, parts, missing, **extra)

    def _merged(self, hits: list[SearchResult], mode: str, parts: list[SearchResponse | None], missing: list[str],
                **extra) -> SearchResponse:
        """One response from the shards' answers: summed work, per-shard timings, missing shards as ``partial``."""
        answered = [(n, p) for n, p in enumerate(parts) if p is not None]
        stats = SearchStats(sim_ops=sum(p.stats.sim_ops for _, p in answered),
                            levels_visited=max((p.stats.levels_visited for _, p in answered), default=0))
        timings = {f"shard{n}_{key}": v for n, p in answered for key, v in p.timings.items()}
        return SearchResponse(hits, mode, stats, answered[0][1].subqueries, timings, partial=list(missing), **extra)

    def embed_query(self, query: retrieval.Query):
        """The query's joint-space embedding, computed once for every shard (``global`` mode)."""
        return self.shards[0].embed_query(query=query)

    def _search_shaped(self, query: retrieval.Query, k: int, mode: str, flt, threshold: float | None,
                       offset: int, sort: str, options: dict) -> SearchResponse:
        """Filters/threshold/pagination/date order over the shards: the same page as one index holding them all."""
        from .retrieval import filters as filtering

        depth = offset + k if sort == "score" else filtering.DATE_SORT_DEPTH
        parts, missing = self.gather(lambda s: s.search(query=query, k=depth, mode=mode, filters=flt,
                                                         threshold=threshold, sort=sort, **options))
        # The best `depth` by score over all shards (what one index would keep), then the requested order.
        pool = sorted(((hit.score, n, hit) for n, part in enumerate(parts) for hit in part or ()),
                      key=lambda t: (-t[0], t[1], t[2].rank))[:depth]
        if sort != "score":
            sign = -1 if sort == "-date" else 1

            def when(hit: SearchResult) -> tuple:
                if hit.taken is None:
                    return (1, 0.0)
                return (0, sign * datetime.fromisoformat(hit.taken).replace(tzinfo=UTC).timestamp())

            pool.sort(key=lambda t: (when(t[2]), -t[0], t[1]))
        page = pool[offset:offset + k]
        hits = [SearchResult(hit.id, hit.path, hit.score, offset + r, shard=n, taken=hit.taken)
                for r, (_, n, hit) in enumerate(page)]
        allowed = None if flt.empty else sum(p.allowed or 0 for p in parts if p is not None)
        return self._merged(hits, mode, parts, missing, allowed=allowed)

    def explain(self, hits: Sequence[SearchResult], query: retrieval.Query, mode: str = "global", k: int = 10,
                **options) -> list:
        """Why each hit of a shard-set search scored as it did: each shard explains its own hits (in hit order)."""
        out: list = [None] * len(hits)
        by_shard: dict[int, list[int]] = {}
        for i, hit in enumerate(hits):
            if hit.shard is None:
                raise ValueError("a shard-set explanation needs hits that name their shard")
            by_shard.setdefault(hit.shard, []).append(i)
        for n, rows in by_shard.items():
            for i, e in zip(rows, self.shards[n].explain([hits[i].id for i in rows], query=query, mode=mode, k=k,
                                                         **options)):
                out[i] = e
        return out

    def available_modes(self) -> list[str]:
        """Modes every shard supports."""
        common = set(self.shards[0].available_modes())
        for s in self.shards[1:]:
            common &= set(s.available_modes())
        return [m for m in self.shards[0].available_modes() if m in common]

    def info(self) -> dict:
        """Per-shard :meth:`Index.info` and totals."""
        infos = [s.info() for s in self.shards]
        return {"shards": len(infos), "images": len(self), "members": [str(s.path) for s in self.shards],
                "encoder": self._encoder_name(self.shards[0]), "per_shard": infos}


def read_manifest(path: str | os.PathLike) -> list[str]:
    """The shard names ``path/shards.json`` lists (paths relative to ``path``, or absolute); IndexFormatError if bad."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"no shard set at {path} (missing {MANIFEST})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path / MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path / MANIFEST} is not a finegrain shard-set manifest")
    if manifest.get("version") != VERSION:
        raise IndexFormatError(f"{path / MANIFEST} has version {manifest.get('version')!r}; "
                               f"this finegrain reads version {VERSION}")
    names = manifest.get("shards")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise IndexFormatError(f"{path / MANIFEST} lists no shards")
    return list(names)


def register(path: str | os.PathLike, members: Sequence[str | os.PathLike], verify: bool = True) -> list[str]:
    """Append existing indexes to the shard set at ``path`` (the manifest is the set's commit point).

    ``path`` must hold a set (IndexFormatError otherwise). Each new member must open and use the set's
    encoder; one already listed is refused; on any refusal the manifest is left as it was. The manifest is
    rewritten under an exclusive lock (concurrent registrations from several ingestion jobs queue) and
    replaced atomically, so a service serving the set sees the old list or the new one, and picks the new
    shards up on its next reload. Returns the manifest's names after the change. ``verify=False`` skips
    opening the members here (shards built and checked on other nodes' disks, see distributed.py).
    """
    import fcntl

    path = Path(path)
    read_manifest(path)  # IndexFormatError for no set at path, before the lock file is made
    with open(path / (MANIFEST + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        names = read_manifest(path)
        listed = {os.path.realpath(path / n) for n in names}
        encoder = None
        if verify:
            with Index.open(path / names[0]) as first:
                encoder = first.catalog.get_meta("encoder")
        for member in members:
            if os.path.realpath(member) in listed:
                raise ValueError(f"{member} is already a shard of {path}")
            if verify:
                _check_member(member, encoder, path)
            names.append(os.path.relpath(os.path.abspath(member), os.path.abspath(path)))
            listed.add(os.path.realpath(member))
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "shards": names}, indent=1))
        tmp.replace(path / MANIFEST)
    return names


def _check_member(member: str | os.PathLike, encoder, path: Path) -> None:
    with Index.open(member) as index:  # fails on a missing or damaged index
        if index.catalog.get_meta("encoder") != encoder:
            raise IndexFormatError(f"{member} uses encoder {index.catalog.get_meta('encoder')}, the shards "
                                   f"of {path} use {encoder}; their scores cannot be merged")


def open_index(path: str | os.PathLike) -> Index | ShardedIndex:
    """Open an index or a shard set, whichever ``path`` holds."""
    return ShardedIndex.open(path) if is_shard_set(path) else Index.open(path)
