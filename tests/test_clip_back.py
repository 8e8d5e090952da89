"""clip-retrieval's own ClipClient against `finegrain serve`'s clip-compatible routes, over real HTTP on loopback.

The client comes from the `clip-retrieval` package, installed without its heavy dependencies
(`pip install --no-deps clip-retrieval`, as `make setup` does). Its package __init__ imports the
whole clip-retrieval stack (flask, h5py, open_clip, ...); `clip_retrieval/clip_client.py` itself
needs only `requests`, so the test loads that one file, unchanged, from the installed package.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from finegrain import Index
from finegrain.interop import import_embeddings
from finegrain.service import ServiceLimits, create_app
from finegrain.service.background import BackgroundServer
from finegrain.shards import ShardedIndex

LIMITS = ServiceLimits(max_k=20, max_query_chars=200, max_upload_bytes=400_000, max_json_bytes=4_096,
                       max_image_pixels=1_000_000)


def _clip_client_module():
    spec = importlib.util.find_spec("clip_retrieval")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed: pip install --no-deps clip-retrieval (make setup does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client_under_test", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_client():
    return _clip_client_module()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NETRC", "/nonexistent-netrc")  # no credentials unless a test gives some


@pytest.fixture(scope="module")
def photos(tmp_path_factory, photos_dir) -> Path:
    folder = tmp_path_factory.mktemp("clipback") / "photos"
    shutil.copytree(photos_dir, folder)
    shutil.copy(folder / "chelsea.jpg", folder / "chelsea-copy.jpg")  # an exact duplicate, for `deduplicate`
    return folder


@pytest.fixture(scope="module")
def index_path(photos) -> Path:
    path = photos.parent / "my-photos"
    with Index.create(path) as index:
        index.add([photos])
    return path


@pytest.fixture(scope="module")
def library(index_path):
    with Index.open(index_path) as index:
        yield index


@pytest.fixture(scope="module")
def url(index_path):
    with BackgroundServer(create_app(index_path, limits=LIMITS, reload_interval=0)) as base:
        yield base


def _ids(index) -> dict[str, int]:
    return {Path(r.path).name: r.id for r in index.records.values()}


def test_clip_client_text_image_and_embedding_queries(clip_client, url, library, photos):
    assert httpx.get(f"{url}/indices-list").json() == ["my-photos"]
    client = clip_client.ClipClient(url=f"{url}/knn-service", indice_name="my-photos", num_images=4,
                                    deduplicate=False)
    got = client.query(text="a cat")
    expected = library.search(text="a cat", k=4)
    assert [r["id"] for r in got] == [h.id for h in expected]
    assert [r["similarity"] for r in got] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert {r["caption"] for r in got[:2]} == {"chelsea.jpg", "chelsea-copy.jpg"}
    thumb = httpx.get(got[0]["url"])  # the url is the service's thumbnail of that image
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

    got = client.query(image=str(photos / "coins.jpg"))  # the client sends the file base64
    assert got[0]["id"] == _ids(library)["coins.jpg"] and got[0]["similarity"] == pytest.approx(1.0, abs=1e-3)

    coffee = library.embed_query(image=photos / "coffee.jpg")
    got = client.query(embedding_input=coffee.tolist())
    assert got[0]["id"] == _ids(library)["coffee.jpg"] and got[0]["caption"] == "coffee.jpg"

    # ClipClient's default deduplicate=True: the exact copy of chelsea is dropped, like clip_back does.
    dedup = clip_client.ClipClient(url=f"{url}/knn-service", indice_name="my-photos", num_images=4)
    got = dedup.query(text="a cat")
    assert len({r["caption"] for r in got} & {"chelsea.jpg", "chelsea-copy.jpg"}) == 1
    assert [r["id"] for r in got] == [h.id for h in expected if h.id != expected[1].id][:len(got)]


def test_metadata_and_response_shape(url, library):
    ids = _ids(library)
    body = {"text": "a rocket", "modality": "image", "num_images": 2, "num_result_ids": 5,
            "indice_name": "my-photos", "deduplicate": False, "use_safety_model": True, "aesthetic_score": 9,
            "aesthetic_weight": 0.5}
    response = httpx.post(f"{url}/knn-service", content=json.dumps(body))  # no content type, like ClipClient
    assert response.status_code == 200, response.text
    assert response.headers["x-finegrain-ignored"] == "use_safety_model,aesthetic_score,aesthetic_weight"
    results = response.json()
    assert len(results) == 5 and set(results[0]) == {"id", "similarity", "url", "caption"}
    assert set(results[2]) == {"id", "similarity"}  # metadata for the first num_images only, as clip_back
    assert [r["id"] for r in results] == [h.id for h in library.search(text="a rocket", k=5)]
    meta = httpx.post(f"{url}/metadata", json={"ids": [ids["coins.jpg"], ids["camera.jpg"]],
                                               "indice_name": "my-photos"}).json()
    assert [m["id"] for m in meta] == [ids["coins.jpg"], ids["camera.jpg"]]
    assert meta[0]["metadata"]["caption"] == "coins.jpg" and meta[0]["metadata"]["url"].endswith(
        f"/api/thumbnail/{ids['coins.jpg']}")
    assert "/" not in meta[0]["metadata"]["caption"]  # no server folders published


@pytest.mark.parametrize("body, status, code", [
    ({"image_url": "http://example.com/cat.jpg"}, 400, "image_url_refused"),
    ({"text": "a cat", "modality": "text"}, 400, "modality_unavailable"),
    ({"text": "a cat", "use_mclip": True}, 400, "mclip_unavailable"),
    ({}, 400, "bad_query"),
    ({"text": "a cat", "embedding_input": [0.1, 0.2]}, 400, "bad_query"),
    ({"text": "a cat", "num_images": 0}, 400, "bad_k"),
    ({"text": "a cat", "num_images": 5, "num_result_ids": 10_000}, 400, "bad_k"),
    ({"text": "a cat", "indice_name": "laion5B"}, 400, "unknown_index"),
    ({"text": "a cat " * 50}, 413, "query_too_long"),
    ({"image": "not base64!!"}, 400, "bad_image"),
    ({"image": base64.b64encode(b"GIF89a not really").decode()}, 400, "bad_image"),
    ({"embedding_input": [0.5] * 7}, 400, "bad_embedding"),
    ({"embedding_input": ["x"]}, 422, "invalid_request"),
    ({"text": "a cat", "aesthetic_score": 42}, 400, "bad_option"),
    ({"text": "a cat", "modality": "video"}, 422, "invalid_request"),
])
def test_bad_requests_get_clear_errors(url, body, status, code):
    body = {"modality": "image", "num_images": 3, **body}
    response = httpx.post(f"{url}/knn-service", content=json.dumps(body))
    assert response.status_code == status, response.text
    assert response.json()["error"] == code and "Traceback" not in response.text


def test_more_bad_requests(url):
    nan = httpx.post(f"{url}/knn-service", content='{"embedding_input": [NaN, 1.0], "num_images": 2}')
    assert nan.status_code == 400 and nan.json()["error"] == "bad_embedding"
    assert httpx.post(f"{url}/knn-service", content=b"{not json").json()["error"] == "bad_json"
    assert httpx.post(f"{url}/metadata", json={"ids": [123456], "indice_name": "my-photos"}).status_code == 404
    big = httpx.post(f"{url}/metadata", content=json.dumps({"ids": list(range(5000))}))
    assert big.status_code == 413  # past the JSON body limit of the service
    huge = httpx.post(f"{url}/knn-service", json={"image": "A" * 600_000, "num_images": 1})
    assert huge.status_code == 413 and huge.json()["error"] == "body_too_large"


def test_api_key_is_required_and_clip_client_can_send_it_from_netrc(clip_client, index_path, tmp_path, monkeypatch):
    with BackgroundServer(create_app(index_path, api_key="s3cret", limits=LIMITS, reload_interval=0)) as base:
        client = clip_client.ClipClient(url=f"{base}/knn-service", indice_name="my-photos", num_images=2)
        refused = client.query(text="a cat")
        assert refused["error"] == "unauthorized"
        assert httpx.get(f"{base}/indices-list").status_code == 401
        assert httpx.get(f"{base}/indices-list", headers={"X-API-Key": "s3cret"}).json() == ["my-photos"]
        assert httpx.get(f"{base}/indices-list", headers={"Authorization": "Bearer wrong"}).status_code == 401
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login finegrain password s3cret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        assert next(r["caption"] for r in client.query(text="a cat")) in ("chelsea.jpg", "chelsea-copy.jpg")


def test_an_imported_index_answers_embedding_queries_and_refuses_text(clip_client, tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 8)).astype(np.float32)
    (tmp_path / "src" / "img_emb").mkdir(parents=True)
    (tmp_path / "src" / "metadata").mkdir()
    np.save(tmp_path / "src" / "img_emb" / "img_emb_0.npy", emb)
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"https://example.com/img/{i}.jpg?x=1" for i in range(5)]
    pq.write_table(pa.table({"url": urls}), tmp_path / "src" / "metadata" / "metadata_0.parquet")
    import_embeddings(tmp_path / "src", tmp_path / "laion", encoder="ViT-L-14")
    with BackgroundServer(create_app(tmp_path / "laion", limits=LIMITS, reload_interval=0)) as base:
        client = clip_client.ClipClient(url=f"{base}/knn-service", indice_name="laion", num_images=2)
        got = client.query(embedding_input=emb[3].tolist())
        assert got[0]["url"] == urls[3] and got[0]["caption"] == "3.jpg"
        refused = client.query(text="a cat")
        assert refused["error"] == "bad_query" and "vector queries only" in refused["message"]


# ------------------------------------------------------------------ a shard set
@pytest.fixture(scope="module")
def set_path(photos) -> Path:
    """The same photos as `my-photos` in a real 2-shard set; chelsea and its exact copy in different shards."""
    root = photos.parent / "split"
    files = sorted(photos.iterdir())
    parts: list[list[Path]] = [[], []]
    for n, f in enumerate(f for f in files if f.name != "chelsea-copy.jpg"):
        parts[n % 2].append(f)
    parts[1 - next(n for n, p in enumerate(parts) if photos / "chelsea.jpg" in p)].append(photos / "chelsea-copy.jpg")
    for n, part in enumerate(parts):
        with Index.create(root / f"part-{n}") as index:
            index.add(part)
    ShardedIndex.create(root / "photos.set", [root / "part-0", root / "part-1"]).close()
    return root / "photos.set"


def _names_in_shards(set_path: Path) -> list[dict[int, str]]:
    out = []
    for n in range(2):
        with Index.open(set_path.parent / f"part-{n}") as shard:
            out.append({r.id: Path(r.path).name for r in shard.records.values()})
    return out


def test_clip_routes_over_a_shard_set(clip_client, set_path, library, photos, monkeypatch):
    """`finegrain serve --index SET`: /knn-service answers from the whole set (the set's merged search, each result
    naming its shard); /metadata, which takes bare ids, answers a one-line 400 instead of a 500."""
    names = _names_in_shards(set_path)
    key = "s3cret"
    with BackgroundServer(create_app(set_path, api_key=key, limits=LIMITS, reload_interval=0)) as base:
        auth = ("finegrain", key)  # curl -u finegrain:KEY
        assert httpx.get(f"{base}/indices-list", auth=auth).json() == ["photos.set"]
        body = {"text": "a cat", "num_images": 2, "num_result_ids": 5, "deduplicate": False}
        response = httpx.post(f"{base}/knn-service", content=json.dumps(body), auth=auth)
        assert response.status_code == 200, response.text
        got = response.json()
        expected = library.search(text="a cat", k=5)  # one index holding the same images
        def same(name: str) -> str:  # chelsea and its exact copy tie: either may come first
            return name.replace("-copy", "")

        assert [same(names[r["shard"]][r["id"]]) for r in got] == [same(Path(h.path).name) for h in expected]
        assert [r["similarity"] for r in got] == pytest.approx([h.score for h in expected], abs=1e-5)
        assert {r["shard"] for r in got} == {0, 1}
        assert set(got[0]) == {"id", "similarity", "shard", "url", "caption"} and set(got[2]) == {"id", "similarity",
                                                                                                  "shard"}
        for r in got[:2]:
            assert r["caption"] == names[r["shard"]][r["id"]]
            assert r["url"] == f"{base}/api/thumbnail/{r['id']}?shard={r['shard']}"
            thumb = httpx.get(r["url"], headers={"X-API-Key": key})
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

        meta = httpx.post(f"{base}/metadata", json={"ids": [got[0]["id"]]}, auth=auth)
        assert meta.status_code == 400 and meta.json()["error"] == "metadata_unavailable", meta.text
        message = meta.json()["message"]
        assert "shard set" in message and "/knn-service" in message and "\n" not in message
        assert "Traceback" not in meta.text

        # clip-retrieval's own client: text, image (base64), embedding queries and deduplicate across shards
        client = clip_client.ClipClient(url=f"{base}/knn-service", indice_name="photos.set", num_images=4,
                                        deduplicate=False)
        netrc = set_path.parent / "netrc"  # how ClipClient sends the key (through requests)
        netrc.write_text(f"machine 127.0.0.1 login finegrain password {key}\n")
        monkeypatch.setenv("NETRC", str(netrc))
        got = client.query(image=str(photos / "coins.jpg"))
        assert got[0]["caption"] == "coins.jpg" and got[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
        coffee = library.embed_query(image=photos / "coffee.jpg")
        got = client.query(embedding_input=coffee.tolist())
        assert got[0]["caption"] == "coffee.jpg" and names[got[0]["shard"]][got[0]["id"]] == "coffee.jpg"
        cats = client.query(text="a cat")
        assert {r["caption"] for r in cats[:2]} == {"chelsea.jpg", "chelsea-copy.jpg"}
        assert {r["shard"] for r in cats[:2]} == {0, 1}  # the exact copy is in the other shard
        dedup = clip_client.ClipClient(url=f"{base}/knn-service", indice_name="photos.set", num_images=4)
        got = dedup.query(text="a cat")  # ClipClient's default deduplicate=True drops it, across shards
        assert len({r["caption"] for r in got} & {"chelsea.jpg", "chelsea-copy.jpg"}) == 1
        assert [r["caption"] for r in got] == [r["caption"] for r in cats if r is not cats[1]][:len(got)]
