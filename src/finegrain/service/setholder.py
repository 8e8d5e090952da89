"""The service over a shard set: the same endpoints and page as over one index.

:class:`SetHolder` has :class:`~finegrain.service.holder.IndexHolder`'s
interface (``use``, ``catalog_access``, ``maybe_reload``, ``generation``,
``encoder``, ``reloads``, ``close``) and leases a :class:`ServedSet`, which
offers what the endpoints call on an index. Hits name their shard (image ids
are per shard); thumbnails are asked for with ``?shard=N``.

Locally (threads) the set is a :class:`~finegrain.shards.ShardedIndex`; when a
shard commits or the manifest changes, a new one is opened and swapped in, as
the index holder does. On Ray (:class:`~finegrain.distributed.RayShardSet`)
the set refreshes itself in place: new shards get actors, replicas reload,
dead replicas are replaced; a shard with no live replica leaves the answer
``partial``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import encoders, retrieval
from ..shards import MANIFEST, ShardedIndex, read_manifest
from ..store.catalog import CATALOG_NAME, Catalog
from .batching import BatchingEncoder
from .lease import ReloadingHolder

log = logging.getLogger("finegrain.service")


class _Meta:
    """The catalog settings the service reads from a shard set: its encoder, and the dimension of its embeddings."""

    def __init__(self, encoder: str, dim: Callable[[], int]):
        self.encoder = encoder
        self._dim = dim

    def get_meta(self, key: str, default: Any = None) -> Any:
        if key == "encoder":
            return self.encoder
        return self._dim() if key == "dim" else default


class ServedSet:
    """A shard set seen by one request: the parts of :class:`~finegrain.Index` the service's endpoints use."""

    def __init__(self, backend: ShardedIndex, encoder: BatchingEncoder, encoder_name: str):
        self.backend = backend
        self.encoder = encoder
        self.catalog = _Meta(encoder_name, self._dim)

    def __len__(self) -> int:
        return len(self.backend)

    @property
    def generation(self) -> int:
        """Sum of the shards' generations: moves whenever any shard commits (or a shard is added)."""
        return sum(int(getattr(s, "generation", 0)) for s in self.backend.shards)

    @property
    def segment_config(self):
        return self.backend.shards[0].segment_config

    def available_modes(self) -> list[str]:
        return self.backend.available_modes()

    def info(self) -> dict:
        info = self.backend.info()
        info["shard_status"] = self.shard_status()
        return info

    def shard_status(self) -> list[dict]:
        """Per shard: name, state (up, degraded, down), images, generation (and replicas on Ray)."""
        status = getattr(self.backend, "status", None)
        if status is not None:
            return status()
        return [{"name": name, "state": "up", "images": len(s), "generation": s.generation}
                for name, s in zip(self.backend.shard_names(), self.backend.shards)]

    def _dim(self) -> int:
        """The joint-space dimension of the set's embeddings (an ``embedding_input`` must have it)."""
        first = self.backend.shards[0]
        catalog = getattr(first, "catalog", None)  # a remote shard (Ray) reports it in its state instead
        dim = catalog.get_meta("dim") if catalog is not None else getattr(first, "state", {}).get("dim")
        return int(dim) if dim is not None else int(self.encoder.dim)

    def embed_query(self, text: str | None = None, image: Any = None, **_: Any):
        return self.backend.embed_query(retrieval.Query(text=text, image=image))

    def search_embedding(self, vector, k: int) -> retrieval.SearchResponse:
        """The best ``k`` images of the whole set for a joint-space vector (clip-retrieval's /knn-service); every
        hit names its shard, ``partial`` names shards that could not answer."""
        return self.backend.search_embedding(vector, k=k)

    def search(self, query: retrieval.Query, k: int, mode: str, **options: Any) -> retrieval.SearchResponse:
        response = self.backend.search(query=query, k=k, mode=mode, **options)
        response.generation = self.generation
        return response

    def explain(self, ids: Sequence[int], query: retrieval.Query | None = None, mode: str = "global", k: int = 10,
                response: retrieval.SearchResponse | None = None, **_: Any) -> list:
        if response is None:  # the /api/explain endpoints give an id alone, which is ambiguous across shards
            raise ValueError("explaining a single id is not available on a shard set; search with explain=true")
        assert query is not None
        return self.backend.explain(list(response.hits), query, mode=mode, k=k)

    def shard(self, n: int):
        """Shard ``n`` (an Index, or a remote shard on Ray); KeyError for no such shard."""
        if not 0 <= n < len(self.backend.shards):
            raise KeyError(f"no shard {n}")
        return self.backend.shards[n]

    def get(self, image_id: int):
        """Ids are per shard: the id-only image endpoints answer 404 on a set (thumbnails take ``?shard=N``)."""
        raise KeyError("a shard set needs the shard of an image (thumbnail?shard=N)")

    def like_path(self, like: int) -> str:
        raise ValueError("more like an image id is not available on a shard set (ids are per shard)")


def _close_set(served: ServedSet) -> None:
    served.backend.close()


def _keep_open(served: ServedSet) -> None:
    """A set handed in to the holder stays open, with its encoder: its owner closes it."""


class SetHolder(ReloadingHolder[ServedSet]):
    """The service's shard set, kept current: locally re-opened when a shard or the manifest changes; on Ray
    refreshed in place (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, reload_interval: float = 1.0, text_workers: int | None = None,
                 ray: bool = False, ray_address: str | None = None, replicas: int = 1,
                 cpus_per_replica: float = 1.0, backend: ShardedIndex | None = None):
        self.path = Path(path)
        self.ray = ray or (backend is not None and type(backend) is not ShardedIndex)  # refreshed in place
        self._probes: dict[Path, Catalog] = {}
        self._signature: object = None
        owned = backend is None
        if backend is None and ray:
            from ..distributed import RayShardSet

            backend = RayShardSet(self.path, address=ray_address, replicas=replicas,
                                  cpus_per_replica=cpus_per_replica)
        if backend is not None:  # the encoder's name from the set itself (a Ray front end may not see shard files)
            name = backend.encoder_name
        else:
            with Catalog(self.path / read_manifest(self.path)[0]) as probe:
                name = str(probe.get_meta("encoder"))
        self._encoder_name = name
        self.encoder = BatchingEncoder(lambda: encoders.create(name), workers=text_workers)
        if backend is None:
            self._signature = self._local_signature()
            backend = ShardedIndex.open(self.path, encoder=self.encoder)
        elif not self.ray:
            self._signature = self._local_signature()
        else:
            from ..distributed import RayShardSet

            if owned and isinstance(backend, RayShardSet):
                backend.encoder = self.encoder  # global queries embedded by the service's batching encoder
        super().__init__(ServedSet(backend, self.encoder, name), _close_set if owned else _keep_open,
                         reload_interval)

    @property
    def generation(self) -> int:
        return self._leases.current.generation

    def _local_signature(self) -> tuple:
        """What changes when the set must be re-opened: the manifest, each shard's catalog file and generation."""
        sig: list = [(self.path / MANIFEST).read_bytes()]
        for name in read_manifest(self.path):
            shard = self.path / name
            st = os.stat(shard / CATALOG_NAME)
            probe = self._probes.get(shard)
            if probe is None:
                probe = self._probes[shard] = Catalog(shard)
            sig.append((name, st.st_dev, st.st_ino, probe.generation()))
        return tuple(sig)

    def _reload(self) -> bool:
        """Pick up commits to any shard, added shards and (on Ray) replace dead replicas."""
        try:
            if self.ray:
                changed = self._leases.current.backend.refresh()
                self.reloads += int(changed)
                return changed
            signature = self._local_signature()
            if signature == self._signature:
                return False
            backend = ShardedIndex.open(self.path, encoder=self.encoder)
        except Exception as exc:  # noqa: BLE001 - keep serving what is loaded
            log.warning("could not reload the shard set at %s: %s", self.path, exc)
            return False
        assert self.encoder is not None
        self._leases.swap(ServedSet(backend, self.encoder, self._encoder_name), _close_set)  # opened here
        self._signature = signature
        self.reloads += 1
        log.info("re-opened the shard set at %s: %d shards, %d images", self.path, len(backend.shards), len(backend))
        return True

    def _close_probes(self) -> None:
        for probe in self._probes.values():
            probe.close()
