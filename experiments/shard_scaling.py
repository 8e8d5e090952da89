"""Throughput and latency of a shard set on a local Ray cluster: 1, 2, 4 shards x 1, 2 replicas.

Run on an idle multi-core machine (timings on a shared 2-core machine mean nothing)::

    python -m experiments.shard_scaling --source flickr8k.fg --images 100000 --shards 1,2,4 --replicas 1,2 \\
        --nodes 4 --cpus-per-node 4 --clients 16 --seconds 30 --mode global --out shard_scaling.json

Each configuration splits ``--images`` synthetic images (vectors drawn from the ``--source`` index of real
photos, as ``finegrain bench scale`` makes them) into S equal shards, serves them with R replicas per shard
(:class:`finegrain.distributed.RayShardSet`) on ``--nodes`` Ray nodes started on this machine
(``ray.cluster_utils.Cluster``), and runs ``--clients`` threads sending text queries for ``--seconds``.
It prints one row per configuration: queries per second, p50 and p99 latency (ms), and the ratios to
1 shard x 1 replica. Per-shard figures (latency of one shard of N images) are what docs/scaling.md's
100M-image plan needs.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

QUERIES = ["a dog running on the grass", "two children playing in the water", "a man riding a bicycle",
           "a black and white cat", "people walking in a city street", "a red car parked by the road",
           "a girl with a blue umbrella", "a boat on a lake at sunset"]


def build_sets(source: str, images: int, shard_counts: list[int], cache: Path, segments: bool) -> dict[int, Path]:
    from finegrain.bench.scale import Source, build_synthetic
    from finegrain.shards import ShardedIndex

    src = Source.from_index(source)
    sets = {}
    for count in shard_counts:
        folder = cache / f"{images}-{count}{'-seg' if segments else ''}"
        members = [folder / f"shard-{n}" for n in range(count)]
        for n, member in enumerate(members):
            if not (member / "finegrain.sqlite").exists():
                build_synthetic(member, src, images // count, seed=n, fields=("segments",) if segments else ())
        if not (folder / "set" / "shards.json").exists():
            ShardedIndex.create(folder / "set", members).close()
        sets[count] = folder / "set"
    return sets


def load(search, clients: int, seconds: float) -> dict:
    """``clients`` threads calling ``search(query)`` for ``seconds``: qps, p50, p99 (ms), errors, partial answers."""
    latencies: list[float] = []
    errors = [0, 0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(n: int) -> None:
        i = n
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                partial = bool(search(QUERIES[i % len(QUERIES)]).partial)
                failed = False
            except Exception:  # noqa: BLE001 - counted
                partial, failed = False, True
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(dt)
                errors[0] += failed
                errors[1] += partial
            i += clients

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {"queries": len(latencies), "qps": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "failed": errors[0], "partial": errors[1]}


def per_shard(set_path: Path, mode: str, rounds: int = 2) -> dict:
    """Each shard searched alone in this process (no Ray): its p50 (ms) and the slowest shard's.

    With the shards on separate nodes the set's latency is about the slowest shard's plus the merge,
    whatever the number of cores here; this is what the per-shard column shows.
    """
    from finegrain.index import Index
    from finegrain.shards import read_manifest

    p50s = []
    for name in read_manifest(set_path):
        with Index.open(set_path / name) as index:
            index.search(text=QUERIES[0], k=10, mode=mode)  # warm: model, memory maps
            times = []
            for _ in range(rounds):
                for q in QUERIES:
                    t0 = time.perf_counter()
                    index.search(text=q, k=10, mode=mode)
                    times.append((time.perf_counter() - t0) * 1000)
            p50s.append(round(float(np.percentile(times, 50)), 2))
    return {"shard_p50_ms": p50s, "slowest_shard_p50_ms": max(p50s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="an index of real photos to draw synthetic vectors from")
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--nodes", type=int, default=4, help="Ray worker nodes started on this machine")
    ap.add_argument("--cpus-per-node", type=float, default=4)
    ap.add_argument("--cpus-per-replica", type=float, default=1)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--mode", default="global")
    ap.add_argument("--cache-dir", default="shard_scaling_cache")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-per-shard", action="store_true", help="skip timing each shard alone")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from finegrain.distributed import RayShardSet

    shard_counts = [int(s) for s in args.shards.split(",")]
    sets = build_sets(args.source, args.images, shard_counts, Path(args.cache_dir), args.mode != "global")
    alone = {} if args.no_per_shard else {count: per_shard(sets[count], args.mode) for count in shard_counts}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for count in shard_counts:
            for replicas in (int(r) for r in args.replicas.split(",")):
                sset = RayShardSet(sets[count], replicas=replicas, cpus_per_replica=args.cpus_per_replica)
                try:
                    for q in QUERIES:  # warm every replica (encoders, memory maps)
                        for _ in range(replicas):
                            sset.search(text=q, k=10, mode=args.mode)
                    row = {"shards": count, "replicas": replicas, "images": args.images,
                           "images_per_shard": args.images // count, "mode": args.mode, **alone.get(count, {}),
                           **load(lambda q, s=sset: s.search(text=q, k=10, mode=args.mode), args.clients, args.seconds)}
                finally:
                    sset.close()
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    base = rows[0]
    for row in rows:
        row["qps_ratio"] = round(row["qps"] / base["qps"], 2) if base["qps"] else None
        row["p50_ratio"] = round(row["p50_ms"] / base["p50_ms"], 2) if base["p50_ms"] else None
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
