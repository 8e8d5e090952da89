"""Shard sets served by Ray actors: each shard opened on nodes that hold its files, replicas, failover.

:class:`RayShardSet` is a :class:`~finegrain.shards.ShardedIndex` whose shards
are :class:`RemoteShard` proxies instead of open indexes; the search, merge and
paging code is the same. Per shard, ``replicas`` actors (:class:`ShardServer`,
plain Ray actors) each open the shard's index with ``Index.open``. Placement:
at open, one zero-CPU task per live node reports which shard folders that node
can read; replica ``r`` of shard ``s`` is pinned (hard node affinity) to holder
``(s + r) mod len(holders)``, so the replicas of a shard land on different nodes
when there are enough of them and shards spread over the cluster.

A query is embedded once on the front end for ``global`` mode (the vector goes
to every shard); the other modes run their full search on each shard (their
sub-queries and re-ranking need the shard's own fields). An image given as a
path is read into bytes first, so remote nodes need not see the front end's
files.

Faults: a call goes to one replica (round robin over those alive); if that
replica's actor or node dies, or it does not answer within ``timeout`` seconds,
it is marked down and the call is retried on the next replica. A shard whose
every replica is down raises :class:`~finegrain.shards.ShardUnavailable`; the
set then answers with the other shards' hits and names it in
``SearchResponse.partial``. :meth:`RayShardSet.refresh` re-reads the manifest
(new shards get actors), has every replica reload its index if a commit
happened, and replaces dead replicas on live nodes that hold the files.

Why plain actors rather than Ray Serve: Serve needs extra packages (gRPC
among them) and brings its own HTTP proxy, which would duplicate the
service's hardening (auth, limits, host checks); what a shard set needs from
Ray is placement by node, a handle per replica and actor-death errors, which
plain actors give directly. See docs/scaling.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from . import retrieval
from .index import Index
from .shards import ShardedIndex, ShardUnavailable, read_manifest
from .store.catalog import CATALOG_NAME, IndexFormatError

log = logging.getLogger("finegrain.distributed")


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("serving a shard set on Ray needs Ray: pip install 'finegrain[ray]'") from exc
    return ray


class ShardServer:
    """A Ray actor's body: one shard's index, opened on the node the actor runs on."""

    def __init__(self, path: str, threads: int = 1):
        try:
            import torch

            torch.set_num_threads(max(1, threads))
        except ImportError:  # pragma: no cover - torch comes with finegrain
            pass
        self.path = path
        self.index = Index.open(path)
        self.file = _file_id(path)

    def state(self) -> dict:
        import ray

        seg = self.index.segment_config
        return {"generation": self.index.generation, "images": len(self.index),
                "modes": self.index.available_modes(), "encoder": str(self.index.catalog.get_meta("encoder")),
                "dim": self.index.catalog.get_meta("dim"),
                "segments": None if seg is None else {"levels": list(seg.levels), "embed": seg.embed},
                "file": list(self.file), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def refresh(self) -> dict:
        """Load committed changes; a shard rebuilt in place (a new catalog file) is opened anew."""
        file = _file_id(self.path)
        if file != self.file:
            self.index = Index.open(self.path)  # searches running on the old one finish on it
            self.file = file
        else:
            self.index.refresh()
        return self.state()

    def search(self, query: retrieval.Query, k: int, mode: str, options: dict) -> retrieval.SearchResponse:
        return self.index.search(query=query, k=k, mode=mode, **options)

    def search_embedding(self, vector: np.ndarray, k: int, dim: int | None) -> list[retrieval.SearchResult]:
        return self.index.search_embedding(vector, k=k, dim=dim)

    def explain(self, ids: list[int], query: retrieval.Query, mode: str, k: int, options: dict) -> list:
        return self.index.explain(ids, query=query, mode=mode, k=k, **options)

    def get(self, image_id: int):
        return self.index.get(image_id)

    # l2g's two rounds (finegrain.local.sharded)
    def l2g_candidates(self, query: retrieval.Query, k: int, filters, options: dict):
        return self.index.l2g_candidates(query, k, filters=filters, **options)

    def image_ids(self) -> np.ndarray:
        return self.index.image_ids()

    def local_descriptors(self, ids: list[int]) -> list[np.ndarray]:
        return self.index.local_descriptors(ids)

    def local_neighbours(self, descriptors: list[np.ndarray], m: int | None, exclude) -> tuple[np.ndarray, np.ndarray]:
        return self.index.local_neighbours(descriptors, m, exclude)

    def info(self) -> dict:
        return self.index.info()


def _file_id(path: str) -> tuple[int, int]:
    """(device, inode) of an index's catalog: changes when the index is deleted and built anew."""
    st = os.stat(os.path.join(path, CATALOG_NAME))
    return st.st_dev, st.st_ino


def _readable(paths: list[str]) -> list[bool]:
    """Run on one node: which of these index folders that node can open."""
    return [os.path.isfile(os.path.join(p, CATALOG_NAME)) for p in paths]


@dataclasses.dataclass
class Replica:
    """One actor serving a shard, and what the front end knows about it."""

    handle: Any
    node: str
    alive: bool = True
    served: int = 0
    error: str | None = None


class RemoteShard:
    """The front end's view of one shard: its replicas, with the search interface of an :class:`Index`."""

    def __init__(self, owner: RayShardSet, name: str, path: Path):
        self.owner = owner
        self.name = name
        self.path = path
        self.replicas: list[Replica] = []
        self.state: dict = {}
        self.failovers = 0
        self._turn = itertools.count()
        self._lock = threading.Lock()

    # what ShardedIndex reads
    @property
    def encoder_name(self) -> str:
        return str(self.state.get("encoder"))

    @property
    def generation(self) -> int:
        return int(self.state.get("generation", -1))

    def __len__(self) -> int:
        return int(self.state.get("images", 0))

    def available_modes(self) -> list[str]:
        return list(self.state.get("modes", []))

    @property
    def segment_config(self):
        from .decompose.segments import SegmentConfig

        seg = self.state.get("segments")
        return None if seg is None else SegmentConfig(levels=tuple(seg["levels"]), embed=seg["embed"])

    def search(self, query: retrieval.Query, k: int = 10, mode: str = "auto", **options) -> retrieval.SearchResponse:
        return self.call("search", query, k, mode, options)

    def search_embedding(self, vector: np.ndarray, k: int = 10, dim: int | None = None) -> list:
        return self.call("search_embedding", vector, k, dim)

    def explain(self, ids: Sequence[int], query: retrieval.Query, mode: str = "global", k: int = 10,
                **options) -> list:
        return self.call("explain", list(ids), query, mode, k, options)

    def get(self, image_id: int):
        return self.call("get", int(image_id))

    def l2g_candidates(self, query: retrieval.Query, k: int, filters=None, **options):
        return self.call("l2g_candidates", query, k, filters, options)

    def image_ids(self) -> np.ndarray:
        return self.call("image_ids")

    def local_descriptors(self, ids: Sequence[int]) -> list[np.ndarray]:
        return self.call("local_descriptors", [int(i) for i in ids])

    def local_neighbours(self, descriptors: Sequence[np.ndarray], m: int | None = None,
                         exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        skip = None if exclude is None else [int(i) for i in exclude]
        return self.call("local_neighbours", list(descriptors), m, skip)

    def info(self) -> dict:
        return {**self.call("info"), "path": str(self.path)}

    # replicas and failover
    def call(self, method: str, *args):
        """``method(*args)`` on a live replica; on a dead or silent one, the next. ShardUnavailable if none left."""
        ray = self.owner.ray
        for _ in range(len(self.replicas)):
            replica = self._pick()
            if replica is None:
                break
            try:
                result = ray.get(getattr(replica.handle, method).remote(*args), timeout=self.owner.timeout)
            except ray.exceptions.RayTaskError:
                raise  # the shard's own answer (a bad query, an unknown id): not a fault of the replica
            except ray.exceptions.RayError as exc:  # the actor or its node died, or it did not answer in time
                self._down(replica, exc)
                continue
            replica.served += 1
            return result
        raise ShardUnavailable(self.name)

    def _pick(self) -> Replica | None:
        with self._lock:
            alive = [r for r in self.replicas if r.alive]
            return alive[next(self._turn) % len(alive)] if alive else None

    def _down(self, replica: Replica, exc: BaseException) -> None:
        with self._lock:
            if not replica.alive:
                return
            replica.alive = False
            replica.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            self.failovers += 1
        log.warning("shard %s: replica on node %s is down (%s); trying another", self.name, replica.node[:12],
                    replica.error)
        try:
            self.owner.ray.kill(replica.handle, no_restart=True)  # a silent one must not answer later
        except Exception:  # noqa: BLE001 - already gone
            pass

    def status(self) -> dict:
        """Per-shard health: up (every replica alive), degraded (some), down (none)."""
        alive = sum(r.alive for r in self.replicas)
        return {"name": self.name, "state": "up" if alive == len(self.replicas) else "degraded" if alive else "down",
                "images": len(self), "generation": self.generation, "failovers": self.failovers,
                "replicas": [{"node": r.node, "alive": r.alive, "served": r.served,
                              **({"error": r.error} if r.error else {})} for r in self.replicas]}


class RayShardSet(ShardedIndex):
    """A shard set whose shards are served by Ray actors; searches like :class:`ShardedIndex` (and one index).

    ``address``: the Ray cluster (``auto``, ``ray://host:10001``), or None to use the runtime already
    initialised in this process or start a local one. ``replicas``: actors per shard. ``cpus_per_replica``:
    the CPU each actor reserves (also its torch threads, at least one). ``timeout``: seconds a replica
    may take to answer before it is treated as down. ``encoder``: an already loaded encoder for
    embedding ``global`` queries on the front end (else loaded on first use).
    """

    def __init__(self, path: str | os.PathLike, address: str | None = None, replicas: int = 1,
                 cpus_per_replica: float = 1.0, timeout: float = 60.0, encoder=None, workers: int = 32):
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        ray = require_ray()
        self.ray = ray
        self.replicas = int(replicas)
        self.cpus_per_replica = float(cpus_per_replica)
        self.timeout = float(timeout)
        self._front_encoder = encoder
        self._encoder_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            logging.getLogger("ray").setLevel(logging.WARNING)
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        path = Path(path)
        self.path = path
        try:
            shards = self._start(read_manifest(path))
            super().__init__(path, cast(list[Index], shards), workers=workers)
        except BaseException:
            self._stop_ray()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, encoder=None, **kwargs) -> RayShardSet:
        """:class:`RayShardSet` ``(path, encoder=encoder, **kwargs)``."""
        return cls(path, encoder=encoder, **kwargs)

    # ------------------------------------------------------------- placement
    def _nodes(self) -> list[str]:
        """Live nodes that can host a replica (enough CPU), in a stable order."""
        return sorted(n["NodeID"] for n in self.ray.nodes()
                      if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= self.cpus_per_replica)

    def _holders(self, paths: list[Path]) -> dict[Path, list[str]]:
        """For each shard folder, the live nodes that can read it (one zero-CPU task per node)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(num_cpus=0)(_readable)
        nodes = self._nodes()
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                .remote([str(p) for p in paths]) for n in nodes]
        holders: dict[Path, list[str]] = {p: [] for p in paths}
        for node, ref in zip(nodes, refs):
            try:
                readable = self.ray.get(ref, timeout=self.timeout)
            except self.ray.exceptions.RayError:  # a node dying now: not a holder
                continue
            for p, ok in zip(paths, readable):
                if ok:
                    holders[p].append(node)
        return holders

    def _actor(self, path: Path, node: str) -> Replica:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        server = self.ray.remote(ShardServer).options(
            num_cpus=self.cpus_per_replica, max_concurrency=4, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        return Replica(server.remote(str(path), threads=max(1, int(self.cpus_per_replica))), node)

    def _start(self, names: list[str], first: int = 0) -> list[RemoteShard]:
        """Actors for these shards (numbered from ``first``), placed on holders; waits until each has opened."""
        paths = [(self.path / n).resolve() for n in names]
        holders = self._holders(paths)
        shards = []
        for s, (name, path) in enumerate(zip(names, paths), start=first):
            nodes = holders[path]
            if not nodes:
                raise IndexFormatError(f"no node of the Ray cluster can read shard {name} ({path})")
            shard = RemoteShard(self, name, path)
            shard.replicas = [self._actor(path, nodes[(s + r) % len(nodes)]) for r in range(self.replicas)]
            shards.append(shard)
        for shard in shards:  # all actors start at once; then each reports its state
            states = []
            for replica in shard.replicas:
                try:
                    states.append(self.ray.get(replica.handle.state.remote(), timeout=max(self.timeout, 120)))
                except self.ray.exceptions.RayTaskError as exc:
                    self._kill(shards)
                    raise IndexFormatError(f"shard {shard.name} cannot be opened: "
                                           f"{str(exc.cause) if exc.cause else exc}") from None
                except self.ray.exceptions.RayError as exc:
                    shard._down(replica, exc)
            if not states:
                self._kill(shards)
                raise IndexFormatError(f"no replica of shard {shard.name} could start")
            shard.state = states[0]
        return shards

    def _kill(self, shards: list[RemoteShard]) -> None:
        for shard in shards:
            for replica in shard.replicas:
                try:
                    self.ray.kill(replica.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    # ------------------------------------------------------------- searching
    @property
    def encoder(self):
        """The front end's encoder (embeds ``global`` queries once for every shard)."""
        if self._front_encoder is None:
            with self._encoder_lock:
                if self._front_encoder is None:
                    from . import encoders

                    self._front_encoder = encoders.create(self.encoder_name)
        return self._front_encoder

    @encoder.setter
    def encoder(self, encoder) -> None:
        self._front_encoder = encoder

    def embed_query(self, query: retrieval.Query) -> np.ndarray:
        from .retrieval.dense import embed_query

        return embed_query(cast(Any, SimpleNamespace(encoder=self.encoder)), query)  # only the encoder is read

    def search(self, text=None, image=None, k: int = 10, mode: str = "auto", bbox=None, *, negative=None,
               negative_image=None, terms=(), query=None, **kwargs) -> retrieval.SearchResponse:
        """As :meth:`ShardedIndex.search`; an image given as a path is sent as its bytes (other nodes' disks)."""
        from .retrieval.terms import build_query

        q = build_query(text, image, bbox, negative, negative_image, terms, query)
        if q.image is not None and isinstance(q.image, (str, os.PathLike)):
            q = dataclasses.replace(q, image=Path(q.image).read_bytes())
        return super().search(k=k, mode=mode, query=q, **kwargs)

    def shard(self, n: int) -> RemoteShard:
        return cast(RemoteShard, self.shards[n])

    # ------------------------------------------------------------- state
    def status(self) -> list[dict]:
        """Per-shard health (state, replicas and their nodes, failovers)."""
        return [cast(RemoteShard, s).status() for s in self.shards]

    def refresh(self) -> bool:
        """New shards in the manifest get actors; replicas reload committed changes; dead replicas are replaced.

        Returns whether the searchable state changed (a shard added, a generation moved).
        """
        with self._refresh_lock:
            changed = False
            names = read_manifest(self.path)
            known = [cast(RemoteShard, s).name for s in self.shards]
            if names[:len(known)] != known:
                raise IndexFormatError(f"{self.path}: shards were removed or reordered in the manifest; "
                                       "restart the service to serve the new set")
            if len(names) > len(known):
                added = self._start(names[len(known):], first=len(known))
                self.shards = self.shards + cast(list[Index], added)  # one assignment: searches see old or new
                changed = True
            shards = cast(list[RemoteShard], self.shards)
            # every live replica reloads at once; then their answers are collected
            calls = [[(r, r.handle.refresh.remote()) for r in shard.replicas if r.alive] for shard in shards]
            for shard, pending in zip(shards, calls):
                before = (shard.generation, shard.state.get("file"))
                states = []
                for replica, ref in pending:
                    try:
                        states.append(self.ray.get(ref, timeout=self.timeout))
                    except self.ray.exceptions.RayError as exc:
                        shard._down(replica, exc)
                if states:
                    shard.state = states[0]
                    changed |= (shard.generation, shard.state.get("file")) != before
                self._heal(shard)
            return changed

    def _heal(self, shard: RemoteShard) -> None:
        """Replace dead replicas by new actors on live nodes that hold the shard (others' nodes first)."""
        dead = [r for r in shard.replicas if not r.alive]
        if not dead:
            return
        nodes = self._holders([shard.path])[shard.path]
        if not nodes:
            return
        busy = {r.node for r in shard.replicas if r.alive}
        order = [n for n in nodes if n not in busy] + [n for n in nodes if n in busy]
        for i, old in enumerate(dead):
            new = self._actor(shard.path, order[i % len(order)])
            try:
                self.ray.get(new.handle.state.remote(), timeout=max(self.timeout, 120))
            except self.ray.exceptions.RayError as exc:
                log.warning("shard %s: could not start a replacement replica: %s", shard.name, exc)
                continue
            with shard._lock:
                shard.replicas = [new if r is old else r for r in shard.replicas]
            log.info("shard %s: replica replaced on node %s", shard.name, new.node[:12])

    def info(self) -> dict:
        """As :meth:`ShardedIndex.info`; a shard with no live replica is listed by what the front end knows."""
        infos = []
        for shard in cast(list[RemoteShard], self.shards):
            try:
                infos.append(shard.info())
            except ShardUnavailable as exc:
                infos.append({"path": str(shard.path), "images": len(shard), "unavailable": str(exc)})
        info = {"shards": len(infos), "images": len(self), "members": [str(s.path) for s in self.shards],
                "encoder": self.encoder_name, "per_shard": infos}
        info["replicas"] = self.replicas
        info["per_shard_status"] = self.status()
        return info

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._kill(cast(list[RemoteShard], self.shards))
        self._stop_ray()

    def _stop_ray(self) -> None:
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()


# ------------------------------------------------------------------ ingestion across nodes
def create_options(settings: dict) -> dict:
    """:meth:`Index.create` keyword arguments that make an index with these stored settings (a shard's twin)."""
    from .decompose.segments import SegmentConfig
    from .local.store import LocalConfig
    from .objects.config import ObjectConfig

    return {"encoder": settings["encoder"], "ann": settings.get("ann") or "auto",
            "segments": SegmentConfig.from_dict(settings["segments"]) if settings.get("segments") else None,
            "local": LocalConfig.from_dict(settings.get("local")),
            "objects": ObjectConfig.from_dict(settings["objects"]) if settings.get("objects") else None}


def _index_shard(path: str, files: list[str], create: dict, state: str | None, batch_size: int,
                 commit_every: int) -> dict:
    """Ray task, on the node that will hold the shard: create it, index ``files`` with the local engine."""
    import ray

    from .local.store import STATE_FILE

    index = Index.create(path, **create, exist_ok=True)  # a re-run resumes: committed files are skipped
    try:
        if state is not None and not (Path(path) / STATE_FILE).exists():
            # learned state shared by every shard (else their local descriptors are not comparable)
            (Path(path) / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
            Path(path, STATE_FILE).write_bytes(Path(state).read_bytes())
            index.close()
            index = Index.open(path)
        report = index.add(files, batch_size=batch_size, commit_every=commit_every, show_progress=False)
        return {"path": path, "node": ray.get_runtime_context().get_node_id(), "images": len(index),
                **report.as_dict()}
    finally:
        index.close()


def index_shards(set_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, address: str | None = None,
                 images_per_shard: int | None = None, create: dict | None = None, batch_size: int = 32,
                 commit_every: int = 512, cpus_per_task: float = 1.0, show_progress: bool = False) -> list[dict]:
    """Index ``inputs`` into new shards of the set at ``set_path``, built on the cluster's nodes.

    The files (walked on the driver) are split into one shard per live node, or ``images_per_shard`` each;
    each shard is created under the set folder and indexed by a Ray task pinned to a node, with the local
    engine (the shard's own catalog is its commit point: a lost task leaves a shard that a re-run resumes).
    Every finished shard is registered in the set's manifest at once (the set is created with the first
    one), so a service serving the set picks it up on its next reload. ``create``: :meth:`Index.create`
    options for the new shards (default: those of the set's first shard, whose learned local-feature state
    every new shard also gets). Returns one report per shard (path, node, images, indexed, failures...).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .indexer import collect_files
    from .local.store import STATE_FILE
    from .shards import ShardedIndex, is_shard_set, register

    ray = require_ray()
    set_path = Path(set_path)
    files, problems = collect_files(inputs)
    if not files:
        raise ValueError("no image files found in the inputs")
    started = not ray.is_initialized()
    if started:
        logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        state: str | None = None
        names: list[str] = []
        if is_shard_set(set_path):
            names = read_manifest(set_path)
            with Index.open(set_path / names[0]) as first:
                create = create if create is not None else create_options(first.snapshot.settings)
                if (first.path / STATE_FILE).exists():
                    state = str((first.path / STATE_FILE).resolve())
        if create is None:
            raise ValueError(f"{set_path} is not a shard set yet: give the new shards' settings")
        nodes = sorted(n["NodeID"] for n in ray.nodes()
                       if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= cpus_per_task)
        if not nodes:
            raise RuntimeError(f"no live Ray node has {cpus_per_task} CPU for an indexing task")
        if images_per_shard:
            chunks = [files[i:i + images_per_shard] for i in range(0, len(files), images_per_shard)]
        else:
            chunks = [list(c) for c in np.array_split(np.array(files, dtype=object), min(len(nodes), len(files)))]
        taken = {os.path.basename(os.path.normpath(n)) for n in names}
        numbers = (n for n in itertools.count() if f"shard-{n:04d}" not in taken)
        paths = [set_path / f"shard-{next(numbers):04d}" for _ in chunks]
        set_path.mkdir(parents=True, exist_ok=True)
        task = ray.remote(_index_shard)
        first_local = create.get("local") is not None and state is None
        reports: list[dict] = []

        def launch(i: int, learned: str | None):
            return task.options(num_cpus=cpus_per_task, max_retries=0, scheduling_strategy=(
                NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False))).remote(
                str(paths[i]), chunks[i], create, learned, batch_size, commit_every)

        def finish(i: int, ref) -> None:
            try:
                report = ray.get(ref)
            except ray.exceptions.RayError as exc:
                reports.append({"path": str(paths[i]), "error": str(exc).splitlines()[0] if str(exc) else
                                type(exc).__name__, "files": len(chunks[i])})
                return
            if is_shard_set(set_path):
                register(set_path, [paths[i]], verify=False)  # built and checked on its node
            else:
                ShardedIndex.create(set_path, [paths[i]]).close()
            reports.append(report)
            if show_progress:
                log.warning("shard %s: %d images indexed on node %s", paths[i].name, report["indexed"],
                            report["node"][:12])

        pending: dict = {}
        start = 0
        if first_local:  # the first shard fits the local-feature whitening; the others reuse its state
            finish(0, launch(0, None))
            state = str(paths[0] / STATE_FILE) if (paths[0] / STATE_FILE).exists() else None
            start = 1
        for i in range(start, len(chunks)):
            pending[launch(i, state)] = i
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            finish(pending.pop(done[0]), done[0])
        if problems:
            reports.append({"path": None, "failures": [{"path": p, "reason": r} for p, r in problems]})
        return reports
    finally:
        if started:
            ray.shutdown()
