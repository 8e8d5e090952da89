"""`finegrain bench scale --peers`: other engines on the same stored vectors, scored on finegrain's exact ranking."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain.bench import maxsim
from finegrain.bench.peers import ALL_PEERS, GLOBAL_PEERS, PEER_TYPES, SegmentRows, parse_peers, run_peers
from finegrain.bench.scale import build_synthetic, growth, run_scale
from finegrain.cli import app
from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index
from finegrain.search import multivector as mv
from finegrain.store.catalog import NewImage
from finegrain.store.vectors import FieldRows

QUERIES = ["a dog runs on the grass", "two children play in the water", "a man rides a bike",
           "a black dog and a white cat"]
KEYS = ("images", "system", "mode", "p50_ms", "p95_ms", "agreement_at_10", "rss_mb", "disk_bytes_per_image", "build_s")
#: Peers that compute finegrain's score exactly: they must agree 1.0.
EXACT = ("numpy-maxsim", "qdrant-edge", "qdrant-local", "lancedb")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def source_index(tmp_path_factory):
    """12 images of random unit vectors: global plus 1 + 4 segments each (levels 0 and 1)."""
    path = tmp_path_factory.mktemp("peers") / "source"
    index = Index.create(path, segments=SegmentConfig(levels=(1, 4)))
    rng = np.random.default_rng(1)
    n, d, per = 12, index.encoder.dim, 5
    segs = FieldRows(_unit(rng.standard_normal((n * per, d))), np.repeat(np.arange(n), per),
                     {"level": np.tile(np.array([0, 1, 1, 1, 1]), n), "box": np.zeros((n * per, 4), np.float32),
                      "area": np.full(n * per, 0.25, np.float32)})
    with index.writer() as w:
        w.commit([NewImage(f"/src/{i}.jpg", f"{i:064x}", 1, 1, 64, 48) for i in range(n)],
                 {"global": FieldRows(_unit(rng.standard_normal((n, d))), np.arange(n)), "segments": segs}, [], [], [])
    index.close()
    return path


@pytest.fixture(scope="module")
def synthetic(source_index, tmp_path_factory):
    """A 300-image synthetic index (two chunks: the writer's batches) drawn from the source."""
    from finegrain.bench.scale import Source

    path = tmp_path_factory.mktemp("syn") / "scale-300"
    build_synthetic(path, Source.from_index(source_index), 300, noise=0.5, seed=2)
    return path


def test_maxsim_form_is_finegrains_score():
    """Weighted MaxSim on the augmented vectors ranks exactly as finegrain's w * global + (1 - w) * mean of maxima."""
    rng = np.random.default_rng(0)
    d, n = 16, 40
    g = _unit(rng.standard_normal((n, d)))
    counts = rng.integers(1, 7, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    segs = _unit(rng.standard_normal((int(offsets[-1]), d)))
    queries = _unit(rng.standard_normal((4, d)))
    for w in (0.0, 0.3, 0.5, 0.9, 1.0):
        seg = np.stack([(segs[a:b] @ queries.T).max(axis=0) for a, b in zip(offsets[:-1], offsets[1:])])
        want = w * (g @ queries[0]) + (1 - w) * seg.mean(axis=1)
        docs, doc_off = maxsim.augment_docs(g, segs, offsets)
        q, wts = maxsim.augment_queries(queries, w)
        got = maxsim.maxsim(q, wts, docs, doc_off)
        assert np.array_equal(np.argsort(-got, kind="stable"), np.argsort(-want, kind="stable")), w
        # an affine image of the same score: positive factor, constant shift
        slope, shift = np.polyfit(want, got, 1)
        assert slope > 0 and np.allclose(slope * want + shift, got, atol=1e-4)
        # the dot form (scaled queries) and the cosine form (repeated queries) give the same sums
        assert np.allclose((docs @ maxsim.scaled(q, wts).T).max(axis=0).sum(), (docs @ q.T).max(axis=0) @ wts,
                           atol=1e-4)
    rep, exact = maxsim.repeated(*maxsim.augment_queries(queries, 0.5))
    assert exact and len(rep) == 4 + 4  # the global term counts N + 1 = 4 times
    assert not maxsim.repeated(*maxsim.augment_queries(queries, 0.3))[1]


def test_segment_rows_match_the_segment_table(synthetic):
    """The peers read the same stored vectors finegrain scores: per image, the segment table's rows."""
    with Index.open(synthetic) as index:
        rows = SegmentRows(index.snapshot)
        assert len(rows.parts) == 1 and rows.n == 300 and rows.n_rows == 1500
        table = index.segment_table
        positions = np.array([0, 7, 150, 299])
        docs, offsets = rows.rows_of(positions)
        for j, p in enumerate(positions):
            mine = docs[offsets[j]:offsets[j + 1]]
            assert np.array_equal(mine[0, :-1], index.global_rows.vectors[p]) and mine[0, -1] == 1
            want = np.concatenate([table.image_rows(level, p) for level in range(table.n_levels)])
            assert np.array_equal(np.sort(mine[1:, :-1], axis=0), np.sort(want, axis=0))
            assert np.all(mine[1:, -1] == -1)
        # numpy MaxSim over every image ranks as finegrain's exhaustive scoring
        q = _unit(np.random.default_rng(3).standard_normal((3, rows.dim)))
        got = rows.maxsim_all(*maxsim.augment_queries(q, 0.5))
        _, want_pos, _ = mv.search("exhaustive", table, index.global_rows.vectors, q, 300, mv.MultiVectorConfig())
        assert np.array_equal(np.argsort(-got, kind="stable")[:50], want_pos[:50])


def test_parse_peers():
    assert parse_peers("all") == list(ALL_PEERS)
    assert parse_peers("lancedb, numpy-maxsim,lancedb") == ["lancedb", "numpy-maxsim"]
    with pytest.raises(ValueError, match="unknown peer.*choose from all"):
        parse_peers("numpy-maxsim,milvus")


def test_every_peer_gives_a_row(synthetic, tmp_path, monkeypatch):
    """All peers at 300 images: the exact ones agree 1.0, the others in [0, 1]; missing ones say why."""
    monkeypatch.delenv("FINEGRAIN_QDRANT_URL", raising=False)
    rows = run_peers(synthetic, ALL_PEERS, QUERIES, k=10, isolate=False, cache_dir=tmp_path, create_envs=False,
                     disk_bytes=123 * 300, log=lambda _: None)
    assert [r["system"] for r in rows] == list(ALL_PEERS)
    by = {r["system"]: r for r in rows}
    for r in rows:
        for key in KEYS:
            assert key in r, (r["system"], key)
        assert r["images"] == 300 and r["mode"] == ("global" if r["system"] in GLOBAL_PEERS else "maxsim")
        if r.get("skipped"):
            assert r["p50_ms"] is None and r["agreement_at_10"] is None and len(r["skipped"]) > 20
            continue
        assert 0.0 <= r["agreement_at_10"] <= 1.0 and r["p95_ms"] >= r["p50_ms"] > 0 and r["rss_mb"] > 0
        assert r["native"] and r["build_s"] >= 0 and r["encode_ms_p50"] > 0
    # the exact MaxSim peers compute finegrain's exact score: every top-10 identical
    assert by["numpy-maxsim"]["agreement_at_10"] == 1.0 and by["numpy-maxsim"]["exact"]
    assert by["numpy-maxsim"]["disk_bytes_per_image"] == 123  # it reads finegrain's own files
    for name in EXACT:
        spec = {"qdrant-edge": "qdrant_edge", "qdrant-local": "qdrant_client", "lancedb": "lancedb"}.get(name)
        if spec and importlib.util.find_spec(spec) is None:
            assert "not installed" in by[name]["skipped"]
        else:
            assert by[name]["agreement_at_10"] == 1.0, name
    # the re-scored FAISS top-N holds every image of the top 10 here (1,000 candidates per vector, 300 images)
    if importlib.util.find_spec("faiss") is not None:
        assert by["faiss-flat-rescore"]["agreement_at_10"] == 1.0
    # no server ships here, so the Qdrant server peer says so
    assert "FINEGRAIN_QDRANT_URL" in by["qdrant-server"]["skipped"]
    # fast-plaid without its virtualenv (not made in tests: about 3 GB) says how to get it
    if by["fast-plaid"].get("skipped"):
        assert "virtualenv" in by["fast-plaid"]["skipped"] or "install" in by["fast-plaid"]["skipped"]
    else:
        assert 0.5 <= by["fast-plaid"]["agreement_at_10"] <= 1.0
    # HNSW at 300 vectors with ef 64 finds the exact neighbours
    for name in ("faiss-hnsw", "hnswlib", "usearch"):
        if not by[name].get("skipped"):
            assert by[name]["agreement_at_10"] >= 0.9, name


def test_missing_peer_is_a_row_with_its_reason(synthetic, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lancedb", None)  # import lancedb now raises ImportError
    rows = run_peers(synthetic, ["lancedb", "numpy-maxsim"], QUERIES[:2], isolate=False, cache_dir=tmp_path,
                     create_envs=False, log=lambda _: None)
    assert rows[0]["system"] == "lancedb" and "'lancedb' is not installed" in rows[0]["skipped"]
    assert rows[0]["p50_ms"] is None
    assert rows[1]["agreement_at_10"] == 1.0


def test_run_scale_with_peers_and_growth(source_index, tmp_path):
    rows = run_scale(source_index, [60, 120], tmp_path / "cache", QUERIES[:2], modes=("exhaustive",),
                     show_progress=False, log=lambda _: None, isolate=False, peers=["numpy-maxsim", "qdrant-server"],
                     create_envs=False)
    assert [(r["images"], r["system"]) for r in rows] == [
        (60, "finegrain"), (60, "finegrain-search"), (60, "numpy-maxsim"), (60, "qdrant-server"),
        (120, "finegrain"), (120, "finegrain-search"), (120, "numpy-maxsim"), (120, "qdrant-server")]
    assert {(g["system"], g["mode"]) for g in growth(rows)} == {
        ("finegrain", "exhaustive"), ("finegrain-search", "exhaustive"), ("numpy-maxsim", "maxsim")}
    index_bytes = {r["images"]: r["disk_bytes_per_image"] for r in rows if r["system"] == "finegrain"}
    for r in rows:
        if r["system"] in ("finegrain-search", "numpy-maxsim"):  # both exact: finegrain's own ranking
            assert r["agreement_at_10"] == 1.0 and r["exact"] and r["encode_ms_p50"] > 0
            assert r["disk_bytes_per_image"] == index_bytes[r["images"]]  # both read the index's own files


def test_finegrain_search_rows_follow_the_modes(synthetic, tmp_path):
    """finegrain timed as the peers are: exhaustive over every image is exact; a tiny candidate stage is not."""
    rows = run_peers(synthetic, [], QUERIES, isolate=False, log=lambda _: None,
                     modes=["global", "exhaustive", "exhaustive:candidates=3", "hierarchical"])
    by = {r["mode"]: r for r in rows}
    assert set(by) == {"global", "exhaustive", "exhaustive:candidates=3", "hierarchical"}
    assert by["global"]["agreement_at_10"] == 1.0 and by["global"]["reference"] == "global-exact"
    assert by["exhaustive"]["agreement_at_10"] == 1.0 and by["exhaustive"]["exact"]
    # 3 global candidates per query vector cannot hold the exact top 10 of 300 images
    assert by["exhaustive:candidates=3"]["agreement_at_10"] < 1.0 and not by["exhaustive:candidates=3"]["exact"]
    assert 0.0 <= by["hierarchical"]["agreement_at_10"] <= 1.0


def test_cli_peers_json_and_report(source_index, tiny_flickr, tmp_path):
    result = CliRunner().invoke(app, ["bench", "scale", "--data", str(tiny_flickr), "--source", str(source_index),
                                      "--sizes", "40", "--modes", "exhaustive", "--queries", "2",
                                      "--peers", "numpy-maxsim,faiss-hnsw,qdrant-server", "--no-peer-envs",
                                      "--cache-dir", str(tmp_path / "cache"), "--json",
                                      "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [r["system"] for r in lines] == ["finegrain", "finegrain-search", "numpy-maxsim", "faiss-hnsw",
                                            "qdrant-server"]
    for r in lines:
        assert all(key in r for key in KEYS)
    assert lines[2]["agreement_at_10"] == 1.0 and lines[4]["skipped"]
    page = (tmp_path / "r.html").read_text()
    assert "numpy-maxsim" in page and "qdrant-server" in page


def test_cli_unknown_peer_is_one_line(source_index, tiny_flickr, tmp_path):
    result = CliRunner().invoke(app, ["bench", "scale", "--data", str(tiny_flickr), "--source", str(source_index),
                                      "--sizes", "40", "--peers", "milvus", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown peer" in result.output and "Traceback" not in result.output


def test_peer_types_cover_every_name():
    assert set(PEER_TYPES) == set(ALL_PEERS)


def test_labelled_queries_give_quality(synthetic, tmp_path):
    """With labels, rows carry NDCG@10 and R@k: labelled with finegrain's own top hit, the exact systems score 1."""
    from finegrain.bench.peers import prepare, quality

    assert quality([[5, 6, 7]], np.array([], np.int64)) == {}
    q = quality([[5, 6, 7], [1, 2, 3], [9]], np.array([6, 1, 4]))
    assert q["r1"] == pytest.approx(100 / 3) and q["r5"] == pytest.approx(200 / 3)
    assert q["ndcg_at_10"] == pytest.approx((1 / np.log2(3) + 1) / 3)
    top1 = [int(r[0]) for r in prepare(str(synthetic), QUERIES, 10).reference_mv]
    rows = run_peers(synthetic, ["numpy-maxsim", "faiss-hnsw"], QUERIES, isolate=False, log=lambda _: None,
                     modes=["exhaustive"], targets=top1, work_dir=tmp_path)
    by = {r["system"]: r for r in rows}
    for name in ("finegrain-search", "numpy-maxsim"):
        assert by[name]["ndcg_at_10"] == 1.0 and by[name]["r1"] == 100.0, name
    assert 0.0 <= by["faiss-hnsw"]["ndcg_at_10"] <= 1.0
    assert not list(tmp_path.iterdir())  # the peers' files are removed after the run


def test_global_modes_with_multivector_peers(source_index, tmp_path):
    """Multi-vector peers make the synthetic index segmented even when every finegrain mode is global."""
    from finegrain.bench.scale import Source

    rows = run_scale(source_index, [50], tmp_path / "cache", QUERIES[:2], modes=("global",), show_progress=False,
                     log=lambda _: None, isolate=False, peers=["numpy-maxsim", "faiss-hnsw"], create_envs=False)
    by = {r["system"]: r for r in rows}
    assert by["numpy-maxsim"]["agreement_at_10"] == 1.0 and by["faiss-hnsw"]["agreement_at_10"] == 1.0
    # an index without segments: the global peers run, the multi-vector ones say why not
    build_synthetic(tmp_path / "flat", Source.from_index(source_index), 40, fields=())
    rows = run_peers(tmp_path / "flat", ["numpy-maxsim", "faiss-hnsw"], QUERIES[:2], isolate=False,
                     log=lambda _: None, modes=["global"])
    by = {r["system"]: r for r in rows}
    assert "no segments" in by["numpy-maxsim"]["skipped"] and by["faiss-hnsw"]["agreement_at_10"] == 1.0
    assert by["finegrain-search"]["agreement_at_10"] == 1.0


def test_a_failing_peer_is_a_row(synthetic, monkeypatch):
    monkeypatch.setenv("FINEGRAIN_FASTPLAID_PYTHON", "/nonexistent/python")
    rows = run_peers(synthetic, ["fast-plaid", "numpy-maxsim"], QUERIES[:1], isolate=False, log=lambda _: None)
    assert rows[0]["skipped"].startswith("failed: FileNotFoundError") and rows[0]["p50_ms"] is None
    assert rows[1]["agreement_at_10"] == 1.0


def test_fast_plaid_index_is_reused_from_the_cache(synthetic, tmp_path):
    """A finished fast-plaid build is kept under the cache and reused (same ranking, the first build's seconds)."""
    from finegrain.bench.peers import PeerSkipped, fastplaid_python

    try:
        fastplaid_python(None, False)  # FINEGRAIN_FASTPLAID_PYTHON, or a virtualenv made by an earlier bench
    except PeerSkipped as exc:
        pytest.skip(f"fast-plaid's virtualenv is not here (about 3 GB, made by bench scale --peers): {exc}")
    first, second = (run_peers(synthetic, ["fast-plaid"], QUERIES[:3], isolate=False, log=lambda _: None,
                               cache_dir=tmp_path)[0] for _ in range(2))
    assert first["agreement_at_10"] is not None, first.get("skipped")
    assert not first["build_reused"] and second["build_reused"]
    assert second["build_s"] == first["build_s"] and second["agreement_at_10"] == first["agreement_at_10"]
    assert second["disk_bytes_per_image"] == first["disk_bytes_per_image"] > 0
    built = list((tmp_path / "peers" / "fast-plaid-index").glob("*/finegrain-built.json"))
    assert len(built) == 1
    # the log beside the index keeps the build's progress after a run that reused it
    log = built[0].parent.with_name(built[0].parent.name + ".log").read_text()
    assert "block 1/" in log and "reusing the finished index" in log
    # a half-finished build (no marker) is never reused: the next run builds again
    built[0].unlink()
    third = run_peers(synthetic, ["fast-plaid"], QUERIES[:3], isolate=False, log=lambda _: None, cache_dir=tmp_path)[0]
    assert not third["build_reused"] and third["agreement_at_10"] == first["agreement_at_10"]


def test_row_summary_says_what_was_measured_or_why_not():
    from finegrain.bench.peers import row_summary

    measured = {"system": "numpy-maxsim", "mode": "maxsim", "p50_ms": 12.34, "p95_ms": 20.0, "agreement_at_10": 1.0,
                "build_s": None}
    assert row_summary(measured) == "  numpy-maxsim maxsim: p50 12.3 ms, p95 20.0 ms, agreement@10 1.000, build n/a s"
    skipped = {"system": "qdrant-server", "mode": "maxsim", "p50_ms": None, "skipped": "no server here"}
    assert row_summary(skipped) == "  qdrant-server maxsim: skipped (no server here)"
