"""Shard sets searched and served with threads: every mode equal to one index; `finegrain serve` over a set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from shardset_helpers import EXACT_MODES, build, make_set, queries, same_hits

from finegrain.index import Index
from finegrain.service import create_app
from finegrain.service.background import BackgroundServer
from finegrain.shards import ShardedIndex, register
from finegrain.store.catalog import IndexFormatError


@pytest.fixture(scope="module")
def built(tmp_path_factory, photos_dir):
    root = tmp_path_factory.mktemp("shardserve")
    photos = sorted(photos_dir.iterdir())
    whole, shards = build(root, photos)
    return root, photos, whole, shards


def test_every_exact_mode_equals_one_index(built):
    root, photos, whole, shards = built
    sharded = ShardedIndex.open(make_set(root, shards, "set-modes"))
    assert set(EXACT_MODES) <= set(sharded.available_modes())
    for mode, kinds in EXACT_MODES.items():
        for query in queries(photos, kinds):
            got = sharded.search(k=4, mode=mode, **query)
            same_hits(got, whole.search(k=4, mode=mode, **query), mode)
            assert got.partial == [] and all(h.shard in (0, 1) for h in got)
    # l2g's two rounds keep filters, threshold, pagination and date order as one index does
    image = str(photos[1])
    ranked = whole.search(image=image, k=6, mode="l2g")
    cut = (ranked[2].score + ranked[3].score) / 2  # between two hits: float noise cannot move either across
    for shape in ({"filters": {"glob": "c*"}}, {"offset": 2}, {"sort": "-date"}, {"threshold": cut}):
        got = sharded.search(image=image, k=3, mode="l2g", **shape)
        same_hits(got, whole.search(image=image, k=3, mode="l2g", **shape), "l2g")
        assert {h.shard for h in sharded.search(image=image, k=6, mode="l2g", **shape)} <= {0, 1}
    with pytest.raises(ValueError, match="pairs='online' works on one index"):  # not silently the graph's pairs
        sharded.search(image=image, k=3, mode="l2g", pairs="online")
    # the hits' explanations come from the shard that holds each one
    response = sharded.search(text="a cat", k=6, mode="hierarchical")
    explained = sharded.explain(list(response), response_query := whole_query("a cat"), mode="hierarchical", k=6)
    expected = whole.explain([whole_id(whole, h.path) for h in response], query=response_query, mode="hierarchical",
                             k=6)
    assert [round(e.score, 5) for e in explained] == [round(e.score, 5) for e in expected]


def whole_query(text):
    from finegrain.retrieval import Query

    return Query(text=text)


def whole_id(whole: Index, path: str) -> int:
    return next(i for i, r in whole.records.items() if r.path == path)


def test_service_serves_a_shard_set(built, tmp_path):
    root, photos, whole, shards = built
    # a set of the first shard only: the second is added while serving
    sset = tmp_path / "served"
    ShardedIndex.create(sset, shards[:1]).close()
    with BackgroundServer(create_app(sset, reload_interval=0)) as base, httpx.Client(base_url=base) as client:
        health = client.get("/api/health").json()
        assert health["status"] == "ok" and health["images"] == 3
        assert [s["name"] for s in health["shards"]] == [os.path.relpath(shards[0], sset)]
        # register the second shard in the set: picked up without a restart
        register(sset, [shards[1]])
        health = client.get("/api/health").json()
        assert health["images"] == 6 and [s["state"] for s in health["shards"]] == ["up", "up"]
        for mode in ("global", "hierarchical", "exhaustive"):
            body = client.post("/api/search", json={"text": "a cat", "k": 4, "mode": mode, "explain": True}).json()
            expected = whole.search(text="a cat", k=4, mode=mode)
            assert [r["name"] for r in body["results"]] == [h.path.rsplit("/", 1)[-1] for h in expected]
            assert body["partial"] is False and body["missing"] == []
            assert all(r["explanation"] is not None for r in body["results"])
            assert {r["shard"] for r in client.post("/api/search", json={"text": "a cat", "k": 6}).json()["results"]} \
                == {0, 1}
        with open(photos[1], "rb") as fh:
            by_image = client.post("/api/search/image", files={"image": fh}, data={"k": "3", "mode": "objects"}).json()
        assert [r["name"] for r in by_image["results"]] == \
            [h.path.rsplit("/", 1)[-1] for h in whole.search(image=photos[1], k=3, mode="objects")]
        hit = body["results"][0]
        assert hit["thumbnail"].endswith(f"?shard={hit['shard']}")
        thumb = client.get(hit["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert client.get(f"/api/thumbnail/{hit['id']}?shard=7").status_code == 404
        # id-only endpoints cannot tell shards apart: a clear 404, never a 500; with the hit's shard they work
        assert client.get(f"/api/images/{hit['id']}").status_code == 404
        assert client.post("/api/search", json={"like": hit["id"], "k": 2}).status_code == 404
        for other in body["results"][:2]:
            where = f"?shard={other['shard']}"
            details = client.get(f"/api/images/{other['id']}{where}").json()
            assert details["name"] == other["name"] and details["file"].endswith(where)
            full = client.get(details["file"])
            assert full.status_code == 200 and full.content == open(details["path"], "rb").read()
            like = client.post("/api/search", json={"like": other["id"], "like_shard": other["shard"], "k": 2,
                                                    "mode": "global"}).json()
            assert like["results"][0]["name"] == other["name"]  # the image itself first, from its own shard
            assert like["results"][0]["shard"] == other["shard"]
        assert client.get(f"/api/images/{hit['id']}?shard=9").status_code == 404
        assert client.post("/api/search", json={"text": "a cat", "like_shard": 0}).status_code == 422
        assert client.post("/api/explain", json={"text": "a cat", "id": hit["id"]}).status_code == 400
        stats = client.get("/api/stats").json()
        assert stats["images"] == 6 and "hierarchical" in stats["modes"] and len(stats["shard_status"]) == 2
        assert client.get("/").status_code == 200  # the page
        # a shard re-indexed (an image added) is picked up as well
        with Index.open(shards[0]) as first:
            shutil.copy(photos[0], tmp_path / "extra.jpg")
            first.add([tmp_path / "extra.jpg"], show_progress=False)
        assert client.get("/api/health").json()["images"] == 7


def test_register_refuses_duplicates_and_other_encoders(built, tmp_path):
    root, _, _, shards = built
    sset = make_set(tmp_path, shards[:1])
    with pytest.raises(ValueError, match="already a shard"):
        register(sset, [shards[0]])
    other = Index.create(tmp_path / "other")
    other.catalog.set_meta("encoder", "clip:somewhere")
    other.close()
    with pytest.raises(IndexFormatError, match="cannot be merged"):
        register(sset, [tmp_path / "other"])
    cli = [sys.executable, "-m", "finegrain.cli", "shards", "--add", str(shards[1]), "--out", str(sset)]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((sset / "shards.json").read_text())["shards"] == [os.path.relpath(s, sset) for s in shards]


def test_cli_serve_refuses_ray_on_a_single_index(built):
    root, _, _, shards = built
    run = subprocess.run([sys.executable, "-m", "finegrain.cli", "serve", "--index", str(shards[0]), "--ray"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a shard set" in run.stderr and "Traceback" not in run.stderr
