"""Shard sets on a real multi-node Ray cluster (three Ray nodes on loopback): equal to one index, replicas,
failover under load, partial answers, shards added while serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
from shardset_helpers import SETTINGS, build, make_set, same_hits

from finegrain.index import Index
from finegrain.local.store import STATE_FILE
from finegrain.shards import read_manifest, register

ray = pytest.importorskip("ray", reason="distributed shard sets need Ray: pip install 'finegrain[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from finegrain.distributed import RayShardSet, index_shards  # noqa: E402
from finegrain.service import create_app  # noqa: E402
from finegrain.service.background import BackgroundServer  # noqa: E402

# Segments and objects (no local features: their CNN would load in every actor; threads test those modes).
RAY_SETTINGS = SETTINGS
RAY_MODES = {"global": ("text", "image"), "single": ("text",), "exhaustive": ("text", "image"),
             "hierarchical": ("text", "image"), "objects": ("image",), "objects-max": ("image",),
             "local": ("image",), "l2g": ("image",)}
STORE = 80 * 2**20  # object store per node: small, the machine is shared


@pytest.fixture(scope="module")
def world(tmp_path_factory, photos_dir):
    """Indexes, a head node that hosts no shard (the driver lives there) and two worker nodes, one set on it."""
    root = tmp_path_factory.mktemp("distributed")
    photos = sorted(photos_dir.iterdir())
    whole, shards = build(root, photos, settings=RAY_SETTINGS)
    extra = root / "part-extra"  # added to the set while serving
    Index.create(extra, **RAY_SETTINGS).close()
    (extra / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "whole" / STATE_FILE, extra / STATE_FILE)  # the set's local-feature whitening
    shutil.copy(photos[2], root / "chelsea-again.jpg")
    with Index.open(extra) as index:
        index.add([root / "chelsea-again.jpg"], show_progress=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE})
    workers = [cluster.add_node(num_cpus=4, object_store_memory=STORE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    sset = RayShardSet(make_set(root, shards), replicas=2, cpus_per_replica=0.5, timeout=60)
    try:
        yield {"root": root, "photos": photos, "whole": whole, "set": sset, "cluster": cluster, "workers": workers,
               "extra": extra}
    finally:
        sset.close()
        ray.shutdown()
        cluster.shutdown()


def _load(sset, whole, seconds: float, threads: int = 4) -> tuple[list[int], list[str], list[threading.Thread]]:
    """Searches from several threads for ``seconds``; (answers, problems, threads): problems are errors, partial
    answers or answers other than ``whole``'s."""
    expected = {mode: [h.path for h in whole.search(text="a cat", k=3, mode=mode)] for mode in ("global",
                                                                                               "hierarchical")}
    answers, problems = [0], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(n: int) -> None:
        mode = ("global", "hierarchical")[n % 2]
        while time.monotonic() < stop:
            try:
                got = sset.search(text="a cat", k=3, mode=mode)
                bad = got.partial or [h.path for h in got] != expected[mode]
            except Exception as exc:  # noqa: BLE001 - counted: the goal is none
                bad = f"{type(exc).__name__}: {exc}"
            with lock:
                answers[0] += 1
                if bad:
                    problems.append(str(bad))

    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    return answers, problems, pool


def test_placement_and_equality_with_one_index(world):
    sset, whole, photos = world["set"], world["whole"], world["photos"]
    status = sset.status()
    workers = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU", 0) > 0}
    for shard in status:  # two replicas per shard, on the two different worker nodes (never the head)
        assert shard["state"] == "up" and {r["node"] for r in shard["replicas"]} == workers
    for mode, kinds in RAY_MODES.items():
        for kind in kinds:
            query = {"text": "a cat"} if kind == "text" else {"image": str(photos[1])}
            got = sset.search(k=4, mode=mode, **query)
            same_hits(got, whole.search(k=4, mode=mode, **query), mode)
            assert got.partial == [] and {h.shard for h in sset.search(k=6, mode=mode, **query)} == {0, 1}
    # filters and pagination merge as on one index
    page = sset.search(text="a cat", k=2, offset=1, mode="global", filters={"glob": "c*"})
    same_hits(page, whole.search(text="a cat", k=2, offset=1, mode="global", filters={"glob": "c*"}))


def test_cli_search_on_ray(world):
    """`finegrain search --index SET --ray --address ADDR`: a driver of its own joins the cluster, answers, leaves."""
    run = subprocess.run([sys.executable, "-m", "finegrain.cli", "search", "--index", str(world["set"].path), "--ray",
                          "--address", world["cluster"].address, "--text", "a cat", "-k", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    expected = world["whole"].search(text="a cat", k=3)
    assert [r["path"] for r in out["results"]] == [h.path for h in expected] and "partial" not in out
    assert all("shard" in r for r in out["results"])
    # `finegrain serve --index SET --ray --address ADDR` builds this app: its own actors, closed with it
    app = create_app(world["set"].path, ray=True, ray_address=world["cluster"].address, replicas=1, warm=False)
    with BackgroundServer(app) as base, httpx.Client(base_url=base, timeout=120) as c:
        assert [s["state"] for s in c.get("/api/health").json()["shards"]] == ["up", "up"]
        body = c.post("/api/search", json={"text": "a cat", "k": 3, "mode": "hierarchical"}).json()
        assert [r["name"] for r in body["results"]] == \
            [h.path.rsplit("/", 1)[-1] for h in world["whole"].search(text="a cat", k=3, mode="hierarchical")]


def test_a_replica_killed_under_load_fails_no_request(world):
    sset, whole = world["set"], world["whole"]
    answers, problems, pool = _load(sset, whole, seconds=6)
    time.sleep(2)
    victim = sset.shard(0).replicas[0]
    ray.kill(victim.handle)
    for t in pool:
        t.join()
    assert problems == [] and answers[0] > 10
    shard = sset.status()[0]
    assert shard["state"] == "degraded" and shard["failovers"] == 1
    assert [r["alive"] for r in shard["replicas"]] == [False, True]
    sset.refresh()  # heals: a new replica, on a node that holds the shard
    assert sset.status()[0]["state"] == "up"
    same_hits(sset.search(text="a cat", k=3, mode="global"), whole.search(text="a cat", k=3, mode="global"))


def test_service_on_ray_adds_a_shard_and_reports_a_shard_down(world):
    sset = world["set"]
    # No periodic refresh here (it would heal shard 1 at once): POST /api/reload refreshes when the test says so.
    app = create_app(sset, reload_interval=3600)
    with BackgroundServer(app) as base, httpx.Client(base_url=base, timeout=120) as c:
        health = c.get("/api/health").json()
        assert health["status"] == "ok" and [s["state"] for s in health["shards"]] == ["up", "up"]
        # a new shard registered in the set's manifest is served without a restart
        register(sset.path, [world["extra"]])
        assert c.post("/api/reload").json()["reloaded"] is True
        health = c.get("/api/health").json()
        assert health["images"] == 7 and len(health["shards"]) == 3
        body = c.post("/api/search", json={"text": "a cat", "k": 2, "mode": "global"}).json()
        assert {(r["name"], r["shard"]) for r in body["results"]} == {("chelsea.jpg", 0), ("chelsea-again.jpg", 2)}
        hit = body["results"][0]
        assert c.get(hit["thumbnail"]).headers["content-type"] == "image/jpeg"
        # every replica of shard 1 down: 200, the other shards' hits, flagged partial with shard 1's name
        name = sset.shard(1).name
        for replica in sset.shard(1).replicas:
            ray.kill(replica.handle)
        for mode in ("global", "hierarchical"):
            r = c.post("/api/search", json={"text": "a cat", "k": 6, "mode": mode})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["partial"] is True and body["missing"] == [name]
            assert {x["shard"] for x in body["results"]} == {0, 2} and len(body["results"]) == 4
        health = c.get("/api/health").json()
        assert health["status"] == "degraded" and [s["state"] for s in health["shards"]] == ["up", "down", "up"]
        assert len(c.get("/api/stats").json()["shard_status"]) == 3
        assert c.post("/api/reload").status_code == 200  # heals shard 1 (new actors on its holders)
        health = c.get("/api/health").json()
        assert [s["state"] for s in health["shards"]] == ["up", "up", "up"]


def test_ingestion_across_nodes_registers_new_shards(world, tmp_path):
    """`finegrain index --engine ray --into-set`: new shards built by tasks on the nodes, registered, then served."""
    sset, photos = world["set"], world["photos"]
    folder = tmp_path / "new"
    folder.mkdir()
    for p in photos[:2]:
        shutil.copy(p, folder / f"new-{p.name}")
    before = read_manifest(sset.path)
    reports = index_shards(sset.path, [folder], images_per_shard=1)
    assert sorted(r["indexed"] for r in reports) == [1, 1]
    assert len({r["node"] for r in reports}) == 2  # one shard built on each worker node
    after = read_manifest(sset.path)  # each shard is registered when its task ends: in either order
    assert after[:len(before)] == before and sorted(after[len(before):]) == ["shard-0000", "shard-0001"]
    assert sset.refresh() is True and len(sset.shards) == len(before) + 2
    assert all(s["state"] == "up" for s in sset.status())
    hits = sset.search(image=str(photos[0]), k=2, mode="global")
    assert {h.path for h in hits} == {str(photos[0]), str(folder / f"new-{photos[0].name}")}


def test_a_node_removed_under_load_fails_no_request(world):
    sset, cluster = world["set"], world["cluster"]
    answers, problems, pool = _load(sset, sset, seconds=8)  # the reference: the set's answers before the fault
    time.sleep(2)
    cluster.remove_node(world["workers"][0])  # the node and every replica on it die
    for t in pool:
        t.join()
    assert problems == [] and answers[0] > 10
    for shard in sset.status():  # each shard still has its replica on the other node
        assert shard["state"] == "degraded" and sum(r["alive"] for r in shard["replicas"]) == 1
