"""The faithful variants selectable by name from the command line (issue 17): L2G, AE-SVC."""

from __future__ import annotations

import json

import pytest
from test_bench_revisitop import tiny_revisitop  # noqa: F401  (a fixture)
from typer.testing import CliRunner

from finegrain.cli import app

runner = CliRunner()


@pytest.fixture()
def seen_configs(monkeypatch):
    """Every L2GConfig the l2g re-ranking is called with (the variant must reach it, not just parse)."""
    import finegrain.local.search as local_search

    seen = []
    real = local_search.l2g_rerank

    def spy(*args, **kwargs):
        seen.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(local_search, "l2g_rerank", spy)
    return seen


@pytest.fixture(scope="module")
def local_index_path(tmp_path_factory, photos_dir):
    path = tmp_path_factory.mktemp("variants") / "i"
    res = runner.invoke(app, ["index", str(photos_dir), "--index", str(path), "--local", "cnn", "--local-scales", "1.0",
                              "--local-features", "60", "--local-image-size", "160", "--json"])
    assert res.exit_code == 0, res.output
    return path


def _search(path, photo, *extra):
    return runner.invoke(app, ["search", "--index", str(path), "--image", str(photo), "--mode", "l2g", "--mds-dim", "3",
                               "--smacof-iter", "20", "-k", "3", "--json", *extra])


def test_search_variant_reaches_l2g(local_index_path, photos_dir, seen_configs):
    photo = sorted(photos_dir.iterdir())[2]
    res = _search(local_index_path, photo, "--variant", "finegrain")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["mode"] == "l2g"
    cfg = seen_configs[-1]
    assert (cfg.variant, cfg.fusion, cfg.w, cfg.query_neighbors, cfg.k) == ("finegrain", "cosine", 0.9, 10, 100)
    res = _search(local_index_path, photo)  # no flag: the paper's setting, the default
    assert res.exit_code == 0, res.output
    cfg = seen_configs[-1]
    assert (cfg.variant, cfg.fusion, cfg.w, cfg.query_neighbors, cfg.k) == ("paper", "average", 0.19, None, 700)
    res = _search(local_index_path, photo, "--variant", "paper", "--w", "0.5")  # an explicit knob still wins
    assert res.exit_code == 0, res.output
    assert (seen_configs[-1].fusion, seen_configs[-1].w) == ("average", 0.5)


def test_search_variant_errors(local_index_path, photos_dir):
    photo = sorted(photos_dir.iterdir())[2]
    res = _search(local_index_path, photo, "--variant", "fire")
    message = "--variant must be one of finegrain, paper, got 'fire'"
    assert res.exit_code == 2 and message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["search", "--index", str(local_index_path), "--image", str(photo), "--mode", "global",
                              "--variant", "paper"])
    assert res.exit_code == 2 and "needs --mode l2g" in " ".join(res.output.split())


def test_bench_revisitop_variant(tiny_revisitop, tmp_path, seen_configs):  # noqa: F811
    args = ["bench", "revisitop", "--data", str(tiny_revisitop), "--mode", "l2g", "--local", "cnn",
            "--local-scales", "1.0", "--local-features", "60", "--local-image-size", "160", "--mds-dim", "3",
            "--smacof-iter", "20", "--cache-dir", str(tmp_path), "--json"]
    res = runner.invoke(app, [*args, "--variant", "finegrain"])  # the non-default variant
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["variant"] == "finegrain" and result["queries"] == 6  # the report names the variant it measured
    assert seen_configs and {c.variant for c in seen_configs} == {"finegrain"} and seen_configs[-1].k == 100
    res = runner.invoke(app, [*args, "--variant", "FIRE"])
    assert res.exit_code == 2 and "--variant must be one of" in res.output
    res = runner.invoke(app, [*args[:5], "global", *args[6:], "--variant", "paper"])
    assert res.exit_code == 2 and "needs --mode l2g" in " ".join(res.output.split())


def test_compress_aesvc_paper(tmp_path, tiny_flickr):
    res = runner.invoke(app, ["index", str(tiny_flickr / "images"), "--index", str(tmp_path / "i"), "--json"])
    assert res.exit_code == 0, res.output
    base = ["compress", "--index", str(tmp_path / "i"), "--dim", "8", "--steps", "30", "--json"]
    res = runner.invoke(app, [*base, "--method", "aesvc-paper"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output.strip().splitlines()[-1])["projection"]
    assert (info["method"], info["loss"], info["dim"]) == ("aesvc", "paper", 8)
    res = runner.invoke(app, [*base, "--method", "aesvc"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["projection"]["loss"] == "finegrain"
    res = runner.invoke(app, [*base, "--method", "aesvc-fire"])
    assert res.exit_code == 2 and "aesvc-paper" in res.output and "Traceback" not in res.output


def test_service_image_search_variant(local_index_path, photos_dir, seen_configs):
    import httpx

    from finegrain.service import create_app
    from finegrain.service.background import BackgroundServer

    photo = sorted(photos_dir.iterdir())[2]

    def post(client, **data):
        return client.post("/api/search/image", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                           data={"k": "3", "mode": "l2g", **data})

    with BackgroundServer(create_app(local_index_path, reload_interval=0)) as base, \
            httpx.Client(base_url=base, timeout=120) as client:
        res = post(client, variant="finegrain")
        assert res.status_code == 200, res.text
        assert res.json()["mode"] == "l2g" and seen_configs[-1].variant == "finegrain"
        assert post(client).status_code == 200 and seen_configs[-1].variant == "paper"  # the default
        res = post(client, variant="fire")
        assert res.status_code == 400 and res.json()["error"] == "bad_query" and "finegrain, paper" in res.text
        res = post(client, variant="paper", mode="global")
        assert res.status_code == 400 and "needs mode l2g" in res.text


def test_index_objects_refine_variant(tmp_path, photos_dir):
    from finegrain import Index

    photos = sorted(photos_dir.iterdir())[:2]
    base = ["index", *map(str, photos), "--index", str(tmp_path / "o"), "--json"]
    res = runner.invoke(app, [*base, "--refine-variant", "paper"])  # no objects: nothing to refine
    assert res.exit_code == 2 and "needs --objects and --refine-iters" in " ".join(res.output.split())
    res = runner.invoke(app, [*base, "--objects", "regions", "--refine-variant", "paper"])  # no refinement steps
    assert res.exit_code == 2 and "needs --objects and --refine-iters" in " ".join(res.output.split())
    res = runner.invoke(app, [*base, "--objects", "regions", "--refine-iters", "2", "--refine-variant", "fire"])
    assert res.exit_code == 2 and "--refine-variant must be one of finegrain, paper" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()
    res = runner.invoke(app, [*base, "--objects", "regions", "--refine-iters", "2", "--refine-variant", "paper"])
    assert res.exit_code == 0, res.output
    config = Index.open(tmp_path / "o").object_config
    assert (config.refine_variant, config.refine_iters, config.step_size) == ("paper", 2, 0.1)
    res = runner.invoke(app, ["search", "--index", str(tmp_path / "o"), "--image", str(photos[0]), "--mode",
                              "objects-refined", "-k", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["results"][0]["path"].endswith(photos[0].name)
