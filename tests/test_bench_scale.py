"""`finegrain bench scale`: synthetic indexes written through the real writer, measured in a fresh process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain.bench.scale import Source, build_synthetic, growth, plot_growth, run_scale
from finegrain.cli import app
from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index
from finegrain.store.catalog import NewImage
from finegrain.store.vectors import FieldRows

QUERIES = ["a dog runs on the grass", "two children play in the water", "a man rides a bike"]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def source_index(tmp_path_factory):
    """A 12-image index with random unit vectors: global plus 1+4 segments per image (levels 0 and 1)."""
    path = tmp_path_factory.mktemp("scale") / "source"
    seg = SegmentConfig(levels=(4,))
    index = Index.create(path, segments=seg)
    rng = np.random.default_rng(1)
    n, d = 12, index.encoder.dim
    images = [NewImage(f"/src/{i}.jpg", f"{i:064x}", 1, 1, 64, 48) for i in range(n)]
    per = 5
    levels = np.tile(np.array([0, 1, 1, 1, 1]), n)
    segs = FieldRows(_unit(rng.standard_normal((n * per, d))), np.repeat(np.arange(n), per),
                     {"level": levels, "box": np.zeros((n * per, 4), np.float32),
                      "area": np.full(n * per, 0.25, np.float32)})
    with index.writer() as w:
        w.commit(images, {"global": FieldRows(_unit(rng.standard_normal((n, d))), np.arange(n)), "segments": segs},
                 [], [], [])
    index.close()
    return path


def test_source_keeps_every_images_segments(source_index):
    src = Source.from_index(source_index)
    assert src.globals.shape[0] == 12 and src.seg_rows is not None
    assert [len(r) for r in src.seg_rows] == [5] * 12
    assert np.array_equal(src.seg_rows[3].attrs["level"], [0, 1, 1, 1, 1])
    assert tuple(src.sizes[0]) == (64, 48)


def test_synthetic_index_is_a_real_index(source_index, tmp_path):
    src = Source.from_index(source_index)
    build_synthetic(tmp_path / "syn", src, 250, noise=0.5, seed=3)
    with Index.open(tmp_path / "syn") as index:
        assert len(index) == 250
        g = index.snapshot.field("global")
        assert np.allclose(np.linalg.norm(g.vectors, axis=1), 1, atol=1e-5)
        # every copy is near its source (cosine about 1/sqrt(1.25)) and not equal to it
        best = (np.asarray(g.vectors) @ src.globals.T).max(axis=1)
        assert 0.8 < float(np.median(best)) < 0.97
        assert len(index.snapshot.field("segments")) == 250 * 5
        assert index.search(text="a dog", k=5, mode="hierarchical").hits


def test_run_scale_rows_and_agreement(source_index, tmp_path):
    rows = run_scale(source_index, [60, 240], tmp_path / "cache", QUERIES,
                     modes=("global", "hierarchical", "exhaustive"),
                     show_progress=False, log=lambda _: None, isolate=False)
    assert [(r["images"], r["mode"]) for r in rows] == [(60, "global"), (60, "hierarchical"), (60, "exhaustive"),
                                                       (240, "global"), (240, "hierarchical"), (240, "exhaustive")]
    for r in rows:
        assert r["system"] == "finegrain" and r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"]
        # the peak (VmHWM) is at least the start's VmRSS, up to the kernel's per-thread RSS counter slack
        # (64 pages a thread, so a fraction of a MiB: seen 0.06 MiB under once)
        assert r["rss_mb"] >= r["rss_base_mb"] - 1.0 and r["rss_base_mb"] > 0
        assert r["disk_bytes_per_image"] > 0 and r["build_s"] > 0
        # the retrievers time the query's encoding: search alone is the rest of each call
        assert r["encode_ms_p50"] > 0 and 0 < r["search_p50_ms"] < r["p50_ms"] and r["search_p95_ms"] < r["p95_ms"]
    by = {(r["images"], r["mode"]): r for r in rows}
    # below the ANN threshold global search is exact: FAISS must agree with brute force
    assert by[(240, "global")]["agreement_at_10"] == 1.0
    assert 0.0 <= by[(240, "hierarchical")]["agreement_at_10"] <= 1.0
    # exhaustive is exact at this size (no candidate stage): it must equal the reference, every image scored
    assert by[(240, "exhaustive")]["agreement_at_10"] == 1.0
    assert by[(240, "exhaustive")]["reference"] == "exhaustive:candidates=0"
    assert {g["mode"] for g in growth(rows)} == {"global", "hierarchical", "exhaustive"}
    png = plot_growth(rows, tmp_path / "growth.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run with segmented modes reuses the built index
    again = run_scale(source_index, [60], tmp_path / "cache", QUERIES[:1], modes=("exhaustive",), show_progress=False,
                      log=lambda _: None, isolate=False)
    assert again[0]["build_s"] == by[(60, "global")]["build_s"]


def test_bad_arguments(source_index, tmp_path):
    with pytest.raises(ValueError, match="does not know mode"):
        run_scale(source_index, [10], tmp_path, QUERIES, modes=("colour",), show_progress=False)
    with pytest.raises(ValueError, match="has no local; the modes l2g need them"):  # a mode the source cannot run
        run_scale(source_index, [10], tmp_path, QUERIES, modes=("l2g",), show_progress=False)
    with pytest.raises(ValueError, match="positive"):
        run_scale(source_index, [0], tmp_path, QUERIES, modes=("global",), show_progress=False)
    with pytest.raises(ValueError, match="at least one query"):
        run_scale(source_index, [10], tmp_path, [], modes=("global",), show_progress=False)


def test_cli_json_lines(source_index, tiny_flickr, tmp_path):
    result = CliRunner().invoke(app, ["bench", "scale", "--data", str(tiny_flickr), "--source", str(source_index),
                                      "--sizes", "40", "--modes", "global", "--queries", "2",
                                      "--cache-dir", str(tmp_path / "cache"), "--json",
                                      "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [r["images"] for r in lines] == [40]  # each mode measured in a child process: its own RSS
    for key in ("images", "system", "mode", "p50_ms", "p95_ms", "agreement_at_10", "rss_mb",
                "disk_bytes_per_image", "build_s"):
        assert key in lines[0]
    assert lines[0]["agreement_at_10"] is not None  # the exact reference ran in its own process too
    assert 0 < lines[0]["rss_anon_mb"] <= lines[0]["rss_mb"]
    page = (tmp_path / "r.html").read_text()
    assert page.count("<table") >= 2


def test_cli_bad_mode_is_one_line(source_index, tiny_flickr, tmp_path):
    result = CliRunner().invoke(app, ["bench", "scale", "--data", str(tiny_flickr), "--source", str(source_index),
                                      "--sizes", "40", "--modes", "colour", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "does not know mode" in result.output
    result = CliRunner().invoke(app, ["bench", "scale", "--data", str(tiny_flickr), "--source", str(source_index),
                                      "--sizes", "40", "--modes", "objects", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "has no objects" in result.output and len(result.output.splitlines()) == 1


def test_mode_labels_carry_options():
    from finegrain.bench.scale import parse_mode

    assert parse_mode("hierarchical:candidates=500,T=0.6") == ("hierarchical", {"candidates": 500, "T": 0.6})
    assert parse_mode("global") == ("global", {})
    with pytest.raises(ValueError, match="name=value"):
        parse_mode("hierarchical:candidates")


def test_compact_segment_storage_build(source_index, tmp_path, monkeypatch):
    """`--segment-storage pca:8:int8`: float32 first, compressed with originals dropped, the rest written compact."""
    from finegrain.bench import scale
    from finegrain.compress import storage

    monkeypatch.setattr(scale, "STORAGE_FIT_IMAGES", 120)  # a multiple of the batch: the same draws
    monkeypatch.setattr(scale, "BUILD_BATCH", 40)
    src = Source.from_index(source_index)
    build_synthetic(tmp_path / "plain", src, 250, noise=0.5, seed=3)
    spec = scale.FieldStorage.parse("pca:8:int8")
    build_synthetic(tmp_path / "compact", src, 250, noise=0.5, seed=3, storage={"segments": spec})
    with Index.open(tmp_path / "plain") as plain, Index.open(tmp_path / "compact") as compact:
        # the same random stream: the global vectors are identical, so only the storage differs
        assert np.array_equal(plain.snapshot.field("global").vectors, compact.snapshot.field("global").vectors)
        rows, codec = storage.scoring(compact.snapshot, "segments")
        assert rows.vectors.dtype == np.int8 and rows.vectors.shape == (250 * 5, 8)
        assert sorted(set(rows.owners.tolist())) == sorted(compact.snapshot.ids.tolist())  # every image, compact
        assert storage.field_info(compact.snapshot.settings, "segments")["originals"] == "dropped"
        assert compact.search(text="a dog", k=5, mode="exhaustive").hits
    out = run_scale(source_index, [250], tmp_path / "cache", QUERIES[:2], modes=("exhaustive", "hierarchical"),
                    show_progress=False, log=lambda _: None, isolate=False, storage={"segments": spec})
    assert {r["segment_storage"] for r in out} == {"pca:8:int8"}
    assert out[0]["agreement_at_10"] == 1.0  # exhaustive against exhaustive over the same compact rows


@pytest.mark.parametrize("text, message", [("pca:64", "METHOD:DIM:QUANTIZE"), ("pca::int8", "needs a dimension"),
                                           ("none:64:int8", "needs a dimension"), ("none::none", "float32 default"),
                                           ("lsh:8:int8", "method is one of"), ("pca:x:int8", "positive integer")])
def test_segment_storage_spec_errors(text, message):
    from finegrain.bench.scale import FieldStorage

    with pytest.raises(ValueError, match=message):
        FieldStorage.parse(text)


def test_segment_storage_refuses_peers(source_index, tmp_path):
    from finegrain.bench.scale import FieldStorage

    with pytest.raises(ValueError, match="peers read float32"):
        run_scale(source_index, [10], tmp_path, QUERIES, modes=("exhaustive",), show_progress=False,
                  peers=["numpy-maxsim"], storage={"segments": FieldStorage.parse("none::int8")})


def test_build_only_builds_and_warms_then_a_measuring_run_reuses_it(source_index, tmp_path):
    """--build-only: the index and its HNSW graph are built and cached, nothing measured; the next run reuses both."""
    logs: list[str] = []
    rows = run_scale(source_index, [80], tmp_path / "cache", QUERIES[:1], modes=("global",), ann="hnsw",
                     show_progress=False, log=logs.append, isolate=False, build_only=True)
    assert rows == [] and "global search structure ready" in logs[0]
    (built,) = (tmp_path / "cache").glob("scale-80-*")
    assert list((built / "ann").glob("*"))  # the HNSW graph, cached next to the catalog
    first = json.loads((built / "BUILD.json").read_text())["build_s"]
    again = run_scale(source_index, [80], tmp_path / "cache", QUERIES[:1], modes=("global",), ann="hnsw",
                      show_progress=False, log=lambda _: None, isolate=False)
    assert [r["mode"] for r in again] == ["global"] and again[0]["build_s"] == first


def test_a_mode_past_its_time_limit_gives_a_skipped_row(source_index, tmp_path):
    """--mode-timeout: the stopped mode's row says why, with null figures, and the run goes on."""
    import time

    from finegrain.bench.peers import in_child
    from finegrain.bench.scale import measure

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="stopped after"):
        in_child(time.sleep, 60, timeout=1)
    assert time.monotonic() - t0 < 30
    build_synthetic(tmp_path / "syn", Source.from_index(source_index), 30, noise=0.5, seed=3)
    rows = measure(str(tmp_path / "syn"), ["global"], QUERIES[:1], isolate=True, timeout=0.5)
    assert [r["mode"] for r in rows] == ["global"]
    assert "stopped after 0.5 s" in rows[0]["skipped"] and rows[0]["p50_ms"] is None
    assert rows[0]["agreement_at_10"] is None
