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
query text or image is embedded once for ``global`` mode. Multi-node: run
one Ray actor per shard holding the open :class:`Index` (shards on node-local
disks), send the query embedding to every actor, and merge the per-shard
top-k on the driver, exactly as :meth:`ShardedIndex.search_detailed` does
with threads; see docs/scaling.md.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .images import ImageSource
from .index import Index, SearchResult, _check_k
from .search.multivector import SearchStats
from .store.catalog import IndexFormatError

MANIFEST = "shards.json"
FORMAT = "finegrain-shards"
VERSION = 1


@dataclass(frozen=True)
class ShardResult(SearchResult):
    """A hit from a shard set: ``id`` is the image id within shard number ``shard``."""

    shard: int = 0

    def as_dict(self) -> dict:
        return {**super().as_dict(), "shard": self.shard}


def is_shard_set(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a shard-set folder (has a ``shards.json``)."""
    return (Path(path) / MANIFEST).is_file()


class ShardedIndex:
    """Read-only search over a set of indexes. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, shards: list[Index]):
        self.path = path
        self.shards = shards
        encoders = {s.catalog.get_meta("encoder") for s in shards}
        if len(encoders) != 1:
            raise IndexFormatError(f"the shards of {path} use different encoders ({', '.join(sorted(map(str, encoders)))}); "
                                   "their scores cannot be merged")
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(len(shards), os.cpu_count() or 1)))

    @classmethod
    def create(cls, path: str | os.PathLike, shards: Sequence[str | os.PathLike]) -> "ShardedIndex":
        """Write a shard-set manifest at ``path`` listing existing indexes (stored relative to ``path``)."""
        path = Path(path)
        if not shards:
            raise ValueError("a shard set needs at least one index")
        path.mkdir(parents=True, exist_ok=True)
        if (path / MANIFEST).exists() or (path / "finegrain.sqlite").exists():
            raise FileExistsError(f"{path} already holds a shard set or an index")
        names = [os.path.relpath(os.path.abspath(s), os.path.abspath(path)) for s in shards]
        for s in shards:
            Index.open(s).close()  # fail now, not at search time, on a missing or bad shard
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "shards": names}, indent=1))
        tmp.replace(path / MANIFEST)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ShardedIndex":
        """Open every shard listed in ``path/shards.json``."""
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
        return cls(path, [Index.open(path / n) for n in names])

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for s in self.shards:
            s.close()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def refresh(self) -> bool:
        """Pick up images added to any shard since opening; True if something changed."""
        return any([s.refresh() for s in self.shards])

    def search(self, text: str | None = None, image: ImageSource | None = None, k: int = 10, mode: str = "global",
               bbox: Sequence[float] | None = None, **options) -> list[ShardResult]:
        """Search every shard in parallel; the best ``k`` overall, best first (see :meth:`Index.search`)."""
        return self.search_detailed(text=text, image=image, k=k, mode=mode, bbox=bbox, **options)[0]

    def search_detailed(self, text: str | None = None, image: ImageSource | None = None, k: int = 10,
                        mode: str = "global", bbox: Sequence[float] | None = None,
                        **options) -> tuple[list[ShardResult], SearchStats, list[str]]:
        """Like :meth:`search`, also returning summed work and the (sub-)queries used."""
        _check_k(k)
        if mode == "global":
            query = self.shards[0].embed_query(text=text, image=image, bbox=bbox)  # embedded once for all shards
            dim = options.get("dim")  # an SS2D size: each shard applies its own stored projection
            parts = list(self._pool.map(lambda s: (s.search_embedding(query, k=k, dim=dim), SearchStats(sim_ops=len(s)),
                                                   [text] if text else []), self.shards))
        else:
            parts = list(self._pool.map(lambda s: s.search_detailed(text=text, image=image, k=k, mode=mode, bbox=bbox,
                                                                    **options), self.shards))
        merged = sorted(((hit.score, n, hit) for n, (hits, _, _) in enumerate(parts) for hit in hits),
                        key=lambda t: (-t[0], t[1], t[2].rank))[:k]
        results = [ShardResult(hit.id, hit.path, hit.score, rank, shard=n) for rank, (_, n, hit) in enumerate(merged)]
        stats = SearchStats(sim_ops=sum(p[1].sim_ops for p in parts),
                            levels_visited=max((p[1].levels_visited for p in parts), default=0))
        return results, stats, parts[0][2]

    def info(self) -> dict:
        """Per-shard :meth:`Index.info` and totals."""
        infos = [s.info() for s in self.shards]
        return {"shards": len(infos), "images": len(self), "members": [str(s.path) for s in self.shards],
                "encoder": self.shards[0].catalog.get_meta("encoder"), "per_shard": infos}


def open_index(path: str | os.PathLike) -> "Index | ShardedIndex":
    """Open an index or a shard set, whichever ``path`` holds."""
    return ShardedIndex.open(path) if is_shard_set(path) else Index.open(path)
