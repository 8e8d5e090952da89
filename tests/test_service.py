"""The HTTP service, through real HTTP on loopback: contract, search modes, explanations, limits, auth, reload."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from finegrain import Index
from finegrain.decompose.segments import SegmentConfig
from finegrain.explain import explain
from finegrain.service import ServiceLimits, create_app
from finegrain.service.background import BackgroundServer

FIRST = ("astronaut", "coffee", "chelsea", "rocket")  # indexed up front; camera and coins come later
LIMITS = ServiceLimits(max_k=50, max_query_chars=200, max_upload_bytes=300_000, max_json_bytes=4_096,
                       max_image_pixels=1_000_000)


@pytest.fixture(scope="module")
def seg_index(tmp_path_factory, photos_dir) -> Path:
    root = tmp_path_factory.mktemp("service")
    (root / "photos").mkdir()
    for name in FIRST:
        shutil.copy(photos_dir / f"{name}.jpg", root / "photos")
    index = Index.create(root / "index", segments=SegmentConfig(levels=(4, 9, 16)))
    index.add([root / "photos"])
    index.close()
    return root / "index"


@pytest.fixture(scope="module")
def url(seg_index):
    with BackgroundServer(create_app(seg_index, limits=LIMITS, reload_interval=0)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def library(seg_index):
    index = Index.open(seg_index)
    yield index
    index.close()


def _ids(index: Index) -> dict[str, int]:
    return {Path(r.path).stem: r.id for r in index.records.values()}


def _jpeg(path: Path) -> bytes:
    return path.read_bytes()


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error", "message"} and "Traceback" not in response.text
    if code:
        assert body["error"] == code, body
    return body


def test_health_stats_and_openapi(client):
    assert client.get("/api/health").json() == {"status": "ok", "images": len(FIRST)}
    stats = client.get("/api/stats").json()
    assert stats["images"] == len(FIRST)
    assert stats["modes"] == ["auto", "global", "single", "exhaustive", "hierarchical"]
    assert stats["segments"]["levels"] == [4, 9, 16] and stats["limits"]["max_k"] == 50
    assert "path" not in stats and stats["failures"] == 0  # no server paths are published
    schema = client.get("/openapi.json").json()
    for path in ("/api/health", "/api/search", "/api/search/image", "/api/explain", "/api/explain/image",
                 "/api/thumbnail/{image_id}", "/api/stats", "/api/reload"):
        assert path in schema["paths"], path
    page = client.get("/")
    assert page.status_code == 200 and "drop-zone" in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_text_search_matches_the_library_and_thumbnails_are_served(client, library):
    body = client.post("/api/search", json={"text": "a cat", "k": 3, "mode": "global"}).json()
    expected = library.search(text="a cat", k=3, mode="global")
    assert [r["id"] for r in body["results"]] == [h.id for h in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert body["results"][0]["name"] == "chelsea.jpg" and body["subqueries"] == []
    thumb = client.get(body["results"][0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(thumb.content))
    assert max(img.size) == LIMITS.thumbnail_size and img.size[0] > img.size[1]  # chelsea is landscape
    assert client.get(body["results"][0]["thumbnail"]).content == thumb.content  # cached, same bytes


@pytest.mark.parametrize("mode", ["global", "single", "exhaustive", "hierarchical"])
def test_explanations_reproduce_the_scores(client, library, mode):
    text = "a cat next to a cup of coffee"
    body = client.post("/api/search", json={"text": text, "k": 4, "mode": mode, "explain": True}).json()
    assert len(body["results"]) == 4
    for hit in body["results"]:
        e = hit["explanation"]
        assert e["id"] == hit["id"] and e["score"] == pytest.approx(hit["score"], abs=1e-4)
        width, height = e["image_size"]
        assert [sq["text"] for sq in e["subqueries"]][0] == text
        if mode == "global":
            assert len(e["subqueries"]) == 1 and e["subqueries"][0]["best"] is None and e["levels_visited"] == []
            continue
        assert [sq["text"] for sq in e["subqueries"]][1:] == body["subqueries"] == ["a cat", "a cup of coffee"]
        assert len(e["levels_visited"]) == (1 if mode == "single" else body["stats"]["levels_visited"])
        for sq in e["subqueries"]:
            x0, y0, x1, y1 = sq["best"]["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert sq["score"] == max(r["score"] for r in sq["levels"]) == sq["best"]["score"]
    # The explain endpoint agrees with the search's inline explanation, and with the library.
    top = body["results"][0]
    alone = client.post("/api/explain", json={"text": text, "id": top["id"], "mode": mode, "k": 4}).json()
    assert alone == top["explanation"]
    assert explain(library, top["id"], text=text, mode=mode, k=4).as_dict() == alone


def test_image_search_with_box_and_image_explain(client, photos_dir, library):
    ids = _ids(library)
    files = {"image": ("q.jpg", _jpeg(photos_dir / "chelsea.jpg"), "image/jpeg")}
    body = client.post("/api/search/image", files=files, data={"k": "2"}).json()
    assert body["results"][0]["id"] == ids["chelsea"] and body["mode"] == "global"
    # A box around the rocket of the astronaut photo (right edge) finds the rocket photo first.
    files = {"image": ("q.jpg", _jpeg(photos_dir / "astronaut.jpg"), "image/jpeg")}
    boxed = client.post("/api/search/image", files=files,
                        data={"k": "4", "mode": "exhaustive", "box": "360,0,512,280", "explain": "true"}).json()
    whole = client.post("/api/search/image", files=files, data={"k": "4", "mode": "exhaustive"}).json()
    assert whole["results"][0]["id"] == ids["astronaut"]
    assert [r["id"] for r in boxed["results"]] != [r["id"] for r in whole["results"]]
    e = boxed["results"][0]["explanation"]
    assert [sq["text"] for sq in e["subqueries"]] == ["query image"] and e["subqueries"][0]["best"] is not None
    again = client.post("/api/explain/image", files=files, data={"id": str(e["id"]), "mode": "exhaustive",
                                                                  "box": "360 0 512 280", "k": "4"}).json()
    assert again == e


def test_bad_requests_get_clear_json_errors(client, photos_dir):
    search = lambda payload: client.post("/api/search", json=payload)  # noqa: E731
    _assert_error(client.post("/api/search", content=b'{"text": "a cat", ', headers={"content-type": "application/json"}), 422, "invalid_request")
    _assert_error(client.post("/api/search", content=b"text=a+cat", headers={"content-type": "text/plain"}), 422)
    _assert_error(search({"text": 42}), 422, "invalid_request")
    _assert_error(search({"k": 3}), 422, "invalid_request")
    _assert_error(search({"text": "   "}), 400, "bad_query")
    _assert_error(search({"text": "a cat " * 40}), 413, "query_too_long")
    _assert_error(search({"text": "a cat", "k": 0}), 400, "bad_k")
    _assert_error(search({"text": "a cat", "k": 10**12}), 400, "bad_k")
    _assert_error(search({"text": "a cat", "k": "many"}), 422)
    _assert_error(search({"text": "a cat", "mode": "psychic"}), 422)
    _assert_error(client.post("/api/search", json={"text": "x" * 5_000}), 413, "body_too_large")
    _assert_error(client.get("/api/search"), 405)
    # Ids only, never paths.
    _assert_error(client.get("/api/thumbnail/99999"), 404, "not_found")
    _assert_error(client.get("/api/thumbnail/abc"), 422)
    _assert_error(client.get("/api/thumbnail/-1"), 422)
    for raw in ("/api/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd", "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                "/api/thumbnail/%2Fetc%2Fpasswd"):
        response = client.get(httpx.URL(client.base_url.join("/").copy_with(raw_path=raw.encode())))
        assert response.status_code in (404, 422) and "root:" not in response.text
    _assert_error(client.post("/api/explain", json={"text": "a cat", "id": 99999}), 404, "not_found")
    # Uploads: too big, too many pixels, not an image, missing, bad box.
    image = lambda data: {"image": ("q.jpg", data, "image/jpeg")}  # noqa: E731
    _assert_error(client.post("/api/search/image", files=image(b"\xff" * 400_000)), 413, "body_too_large")

    def chunked():  # no Content-Length: cut off while it streams
        yield b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(40):
            yield b"\xff" * 10_000
        yield b"\r\n--xx--\r\n"

    multipart = {"content-type": "multipart/form-data; boundary=xx"}
    _assert_error(client.post("/api/search/image", content=chunked(), headers=multipart), 413, "body_too_large")
    big = io.BytesIO()
    Image.new("L", (1500, 1000)).save(big, "PNG")
    _assert_error(client.post("/api/search/image", files=image(big.getvalue())), 413, "image_too_large")
    _assert_error(client.post("/api/search/image", files=image(b"GIF89a not really")), 400, "bad_image")
    _assert_error(client.post("/api/search/image", files=image(b"")), 400, "bad_image")
    _assert_error(client.post("/api/search/image", data={"k": "3"}), 422, "invalid_request")
    _assert_error(client.post("/api/search/image", json={"image": "x"}), 422)
    _assert_error(client.post("/api/search/image", content=b"--xx\r\nbroken", headers=multipart), 422)
    jpeg = _jpeg(photos_dir / "coffee.jpg")
    _assert_error(client.post("/api/search/image", files=image(jpeg), data={"box": "1,2,3"}), 400, "bad_box")
    _assert_error(client.post("/api/search/image", files=image(jpeg), data={"box": "1,2,3,nan"}), 400, "bad_box")
    _assert_error(client.post("/api/search/image", files=image(jpeg), data={"box": "5000,5000,6000,6000"}), 400, "bad_query")
    _assert_error(client.post("/api/search/image", files=image(jpeg), data={"k": "51"}), 400, "bad_k")
    assert client.get("/api/health").status_code == 200  # still serving


def test_unknown_fields_are_refused_on_every_search_and_explain_endpoint(client, photos_dir):
    """A misspelt field ("treshold", "filter") is a 422 invalid_request naming it, never silently ignored."""
    def refused(response: httpx.Response, *names: str) -> str:
        message = _assert_error(response, 422, "invalid_request")["message"]
        assert "\n" not in message and all(repr(n) in message for n in names), message
        return message

    search = {"text": "dog", "k": 2, "filter": {"orientation": "portrait"}, "treshold": 0.9}
    message = refused(client.post("/api/search", json=search), "filter", "treshold")
    assert message.startswith("unknown fields 'filter', 'treshold'") and "filters" in message and "threshold" in message
    refused(client.post("/api/explain", json={"text": "a cat", "id": 1, "mode": "global", "limit": 3}), "limit")
    jpeg = {"image": ("q.jpg", _jpeg(photos_dir / "coffee.jpg"), "image/jpeg")}
    message = refused(client.post("/api/search/image", files=jpeg, data={"k": "2", "treshold": "0.9"}), "treshold")
    assert "threshold" in message and "image" in message  # what the endpoint does take
    refused(client.post("/api/search/image", files=jpeg, data={"k": "2", "filter": '{"glob": "*.png"}',
                                                                "Mode": "global"}), "filter", "Mode")
    refused(client.post("/api/search/image", files={**jpeg, "picture": ("p.jpg", b"x", "image/jpeg")}), "picture")
    refused(client.post("/api/explain/image", files=jpeg, data={"id": "1", "mode": "global", "kk": "3"}), "kk")
    # Every declared field is still taken (the page and the docs send these).
    full = {"text": "a cat", "k": 2, "mode": "global", "explain": True, "negative": ["a dog"],
            "filters": {"glob": "*.jpg"}, "threshold": -1.0, "offset": 0, "sort": "score"}
    assert client.post("/api/search", json=full).status_code == 200
    assert client.post("/api/search", json={"like": 1, "k": 2, "mode": "global"}).status_code == 200
    assert client.post("/api/search", json={"query": '"a cat" - "coffee"', "k": 2}).status_code == 200
    form = {"k": "2", "mode": "global", "explain": "true", "text": "a cup", "negative": ["a dog", "a cat"],
            "filters": '{"glob": "*.jpg"}', "threshold": "-1", "offset": "0", "sort": "score", "box": "0,0,200,200"}
    assert client.post("/api/search/image", files=jpeg, data=form).status_code == 200
    # variant is a declared field: refused for what it says (it needs mode l2g), not as unknown
    _assert_error(client.post("/api/search/image", files=jpeg, data={"variant": "paper"}), 400, "bad_query")
    assert client.post("/api/explain/image", files=jpeg, data={"id": "1", "mode": "global", "box": "0,0,200,200",
                                                               "k": "3"}).status_code == 200
    assert client.post("/api/explain", json={"text": "a cat", "id": 1, "mode": "global", "k": 3}).status_code == 200


def test_the_page_sends_only_fields_the_endpoints_declare(client):
    """The web page's requests (app.js) name only declared fields: unknown ones are refused (422) now."""
    import re

    script = client.get("/static/app.js").text
    schema = client.get("/openapi.json").json()

    def declared(path: str, content_type: str) -> set[str]:
        ref = schema["paths"][path]["post"]["requestBody"]["content"][content_type]["schema"]["$ref"]
        return set(schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"])

    form_fields = set(re.findall(r'body\.append\("(\w+)"', script))
    literal = re.search(r"const body = \{([^}]*)\}", script)
    assert literal and form_fields >= {"image", "k", "mode", "threshold", "filters"}
    json_fields = set(re.findall(r"(\w+):", literal.group(1))) | set(re.findall(r"\bbody\.(\w+) =", script))
    assert json_fields >= {"k", "mode", "text", "query", "like", "like_shard", "threshold", "filters"}
    assert form_fields <= declared("/api/search/image", "multipart/form-data"), form_fields
    assert json_fields <= declared("/api/search", "application/json"), json_fields
    assert "api/explain" not in script  # the page explains through search (explain: true) only


def test_upload_endpoints_refuse_an_unknown_mode_as_the_json_endpoints_do(client, photos_dir):
    jpeg = {"image": ("q.jpg", _jpeg(photos_dir / "coffee.jpg"), "image/jpeg")}
    expected = _assert_error(client.post("/api/search", json={"text": "a cat", "mode": "globl"}), 422,
                             "invalid_request")["message"]
    assert "unknown search mode 'globl'" in expected
    assert _assert_error(client.post("/api/explain", json={"text": "a cat", "id": 1, "mode": "globl"}), 422,
                         "invalid_request")["message"] == expected
    for path, data in (("/api/search/image", {"mode": "globl"}), ("/api/explain/image", {"id": "1", "mode": "globl"})):
        assert _assert_error(client.post(path, files=jpeg, data=data), 422, "invalid_request")["message"] == expected


def test_concurrent_searches_are_answered_correctly(client, url):
    queries = ["a cat", "a rocket on a launch pad", "a cup of coffee", "an astronaut", "a flag", "a saucer",
               "a night sky", "a woman smiling"]
    modes = ["global", "hierarchical"]
    expected = {(q, m): client.post("/api/search", json={"text": q, "k": 4, "mode": m}).json()["results"]
                for q in queries for m in modes}
    errors, got = [], {}

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for j in range(6):
                q, m = queries[(i + j) % len(queries)], modes[(i + j) % 2]
                try:
                    r = c.post("/api/search", json={"text": q, "k": 4, "mode": m})
                    got[(i, j)] = (q, m, r.status_code, r.json()["results"])
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 48
    for q, m, status, results in got.values():
        assert status == 200
        assert [r["id"] for r in results] == [r["id"] for r in expected[(q, m)]]
        assert [r["score"] for r in results] == pytest.approx([r["score"] for r in expected[(q, m)]], abs=1e-5)


def test_api_key_protects_the_api(seg_index):
    app = create_app(seg_index, api_key="s3cret-key", warm=False)
    with BackgroundServer(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert c.get("/api/health").status_code == 200  # liveness stays open
        body = _assert_error(c.get("/api/stats"), 401, "unauthorized")
        assert "Bearer" in body["message"]
        _assert_error(c.get("/api/stats", headers={"Authorization": "Bearer wrong"}), 401)
        _assert_error(c.get("/api/stats", headers={"X-API-Key": "s3cret-ke"}), 401)
        _assert_error(c.post("/api/search", json={"text": "a cat"}), 401)
        _assert_error(c.get("/api/thumbnail/1"), 401)
        assert c.get("/api/stats", headers={"Authorization": "Bearer s3cret-key"}).json()["server"]["auth"] is True
        assert c.get("/api/stats", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]


def test_index_is_reopened_after_images_are_added(seg_index, photos_dir, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(seg_index, copy)
    with BackgroundServer(create_app(copy, reload_interval=0)) as base, httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/api/health").json()["images"] == len(FIRST)
        before = c.get("/api/stats").json()["generation"]
        new = tmp_path / "new"
        new.mkdir()
        for name in ("camera", "coins"):
            shutil.copy(photos_dir / f"{name}.jpg", new)
        stop, failures = threading.Event(), []

        def keep_searching() -> None:  # searches go on while the writer commits
            with httpx.Client(base_url=base, timeout=60) as s:
                while not stop.is_set():
                    r = s.post("/api/search", json={"text": "some coins", "k": 6, "mode": "hierarchical"})
                    if r.status_code != 200:
                        failures.append(r.text)

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        try:
            writer = Index.open(copy)
            writer.add([new])
            writer.close()
        finally:
            stop.set()
            searcher.join()
        assert not failures
        assert c.get("/api/health").json() == {"status": "ok", "images": len(FIRST) + 2}
        stats = c.get("/api/stats").json()
        assert stats["generation"] > before and stats["server"]["reloads"] >= 1
        top = c.post("/api/search", json={"text": "some coins", "k": 1, "mode": "hierarchical"}).json()["results"][0]
        assert top["name"] == "coins.jpg"
        assert c.get(top["thumbnail"]).status_code == 200
        reload = c.post("/api/reload").json()
        assert reload == {"reloaded": False, "generation": stats["generation"], "images": len(FIRST) + 2}


def test_explain_on_a_global_only_index(tmp_path, photos_dir):
    index = Index.create(tmp_path / "g")
    index.add([photos_dir / "chelsea.jpg", photos_dir / "coffee.jpg"])
    hit = index.search(text="a cat", k=1)[0]
    e = explain(index, hit.id, text="a cat")
    assert e.score == pytest.approx(hit.score, abs=1e-5) and e.global_score == e.score
    assert [sq.text for sq in e.subqueries] == ["a cat"] and e.subqueries[0].best is None
    assert e.image_size == (451, 300)
    with pytest.raises(ValueError, match="segments"):
        explain(index, hit.id, text="a cat", mode="exhaustive")
    with pytest.raises(KeyError):
        explain(index, 12345, text="a cat")
    # The service says so with a 400, before any model work.
    with BackgroundServer(create_app(tmp_path / "g", warm=False)) as base:
        r = httpx.post(f"{base}/api/search", json={"text": "a cat", "mode": "single"})
        _assert_error(r, 400, "mode_unavailable")
        assert httpx.get(f"{base}/api/stats").json()["modes"] == ["auto", "global"]
        # A known mode this index cannot serve stays 400 mode_unavailable on the upload endpoints too.
        jpeg = {"image": ("q.jpg", _jpeg(photos_dir / "coffee.jpg"), "image/jpeg")}
        for path, data in (("/api/search/image", {"mode": "single"}),
                           ("/api/explain/image", {"id": "1", "mode": "single"})):
            _assert_error(httpx.post(f"{base}{path}", files=jpeg, data=data, timeout=60), 400, "mode_unavailable")


def test_serve_command_refuses_a_missing_index(tmp_path):
    from typer.testing import CliRunner

    from finegrain.cli import app

    result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no finegrain index" in result.output


def test_batching_encoder_batches_concurrent_texts_and_isolates_failures():
    from finegrain.service.batching import BatchingEncoder

    calls, gate = [], threading.Event()

    class Fake:
        dim = 2

        def encode_texts(self, texts):
            calls.append(list(texts))
            gate.wait(5)  # the first batch runs until every request has queued
            if "boom" in texts:
                raise ValueError("boom")
            return np.array([[len(t), i] for i, t in enumerate(texts)], np.float32)

    enc = BatchingEncoder(lambda: Fake(), workers=1)
    assert enc.dim == 2  # everything else is the wrapped encoder's
    out, errors = {}, {}

    def ask(i, texts):
        try:
            out[i] = enc.encode_texts(texts)
        except ValueError as exc:
            errors[i] = str(exc)

    threads = [threading.Thread(target=ask, args=(i, t)) for i, t in
               enumerate([["a"], ["bb", "ccc"], ["boom"], ["dddd"]])]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(enc._queue) < 3 and time.monotonic() < deadline:  # one request in the model, three waiting
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join()
    enc.close()
    assert errors == {2: "boom"}
    assert [r[:, 0].tolist() for _, r in sorted(out.items())] == [[1.0], [2.0, 3.0], [4.0]]
    assert any(len(c) >= 3 for c in calls)  # the three waiting requests went through in one batch
    idle = BatchingEncoder(lambda: Fake(), workers=1)
    with pytest.raises(ValueError, match="non-empty"):
        idle.encode_texts([" "])
    idle.close()


def test_object_modes_are_served_and_explained(tmp_path, photos_dir):
    """An index with objects offers the MaO modes; an image search explains with the best-matching object's box."""
    from finegrain.objects.config import ObjectConfig

    index = Index.create(tmp_path / "o", objects=ObjectConfig(max_objects=4))
    index.add([photos_dir / "chelsea.jpg", photos_dir / "coffee.jpg", photos_dir / "rocket.jpg"])
    assert index.available_modes() == ["auto", "global", "objects", "objects-max"]
    crop = Image.open(photos_dir / "coffee.jpg").convert("RGB").crop((100, 50, 300, 250))
    buf = io.BytesIO()
    crop.save(buf, format="JPEG")
    with BackgroundServer(create_app(tmp_path / "o", warm=False)) as base:
        assert httpx.get(f"{base}/api/stats").json()["modes"] == ["auto", "global", "objects", "objects-max"]
        r = httpx.post(f"{base}/api/search/image", files={"image": ("q.jpg", buf.getvalue(), "image/jpeg")},
                       data={"mode": "objects-max", "k": "3", "explain": "true"}, timeout=60)
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert top["name"] == "coffee.jpg"
        best = top["explanation"]["subqueries"][0]["best"]
        assert best["field"] == "objects" and best["score"] == pytest.approx(top["score"], abs=1e-4)
        x0, y0, x1, y1 = best["box"]
        width, height = top["explanation"]["image_size"]
        assert (width, height) == (600, 400) and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        # A text query in an image-only object space is a clear 400; a mode the index lacks too.
        _assert_error(httpx.post(f"{base}/api/search", json={"text": "a cup", "mode": "objects"}), 400, "bad_query")
        _assert_error(httpx.post(f"{base}/api/search", json={"text": "a cup", "mode": "l2g"}), 400, "mode_unavailable")
