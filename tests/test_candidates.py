"""The multi-vector candidate stage: a global top-n per query vector, then the segment scoring on those only."""

from __future__ import annotations

import numpy as np
import pytest
from random_index_helpers import random_segmented_index
from random_index_helpers import unit as _unit

from finegrain.retrieval import Query
from finegrain.retrieval import multivector as mvr


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """80 images with random unit vectors: a global vector and 1 + 4 segments each."""
    idx = random_segmented_index(tmp_path_factory.mktemp("cand") / "idx", 80, seed=7)
    yield idx
    idx.close()


def test_small_indexes_are_exact_by_default():
    assert mvr.auto_candidates(mvr.AUTO_EXACT_UP_TO) == 0
    assert mvr.auto_candidates(mvr.AUTO_EXACT_UP_TO + 1) == mvr.AUTO_CANDIDATES


def test_the_stage_a_search_runs():
    """No size anywhere: exact up to the threshold, one fused search above it; a size without a policy keeps
    ``union`` (what a saved size from an older ``finegrain tune`` meant)."""
    big, small = mvr.AUTO_EXACT_UP_TO + 1, mvr.AUTO_EXACT_UP_TO
    P = mvr.MultiVectorParams
    assert mvr.stage_for(P(), small) == (0, "union")
    assert mvr.stage_for(P(), big) == (mvr.AUTO_FUSED_CANDIDATES, "fused")
    assert mvr.stage_for(P(stage="union"), big) == (mvr.AUTO_CANDIDATES, "union")
    assert mvr.stage_for(P(stage="fused"), big) == (mvr.AUTO_FUSED_CANDIDATES, "fused")
    assert mvr.stage_for(P(candidates=500), big) == (500, "union")
    assert mvr.stage_for(P(candidates=500, stage="fused"), small) == (500, "fused")
    assert mvr.stage_for(P(candidates=0), big) == (0, "union")


def test_an_index_above_the_threshold_runs_the_fused_stage_by_default(index, monkeypatch):
    monkeypatch.setattr(mvr, "AUTO_EXACT_UP_TO", 20)
    monkeypatch.setattr(mvr, "AUTO_FUSED_CANDIDATES", 12)
    text = "a dog on a red sofa next to a window"
    snap = index.snapshot
    _, queries = mvr.query_vectors(snap, Query(text=text), mvr.MultiVectorParams())
    pool = set(snap.ids[mvr.candidate_positions(snap, queries, 12, None, "fused")].tolist())
    hits = index.search(text=text, k=10, mode="exhaustive")
    assert "candidates_ms" in hits.timings and hits.stats.candidates_per_level[0] == 12
    assert {h.id for h in hits} <= pool


def test_candidates_are_the_union_of_each_query_vectors_global_top(index):
    snap = index.snapshot
    q = _unit(np.random.default_rng(1).standard_normal((3, index.encoder.dim)))
    got = mvr.candidate_positions(snap, q, 6)
    g = np.asarray(snap.global_rows.vectors)
    want = np.unique(np.concatenate([np.argsort(-(g @ v), kind="stable")[:6] for v in q]))
    assert np.array_equal(got, want) and 6 <= len(got) <= 18


@pytest.mark.parametrize("mode", ["exhaustive", "hierarchical", "single"])
def test_a_stage_as_large_as_the_index_changes_nothing(index, mode):
    text = "a dog on a red sofa next to a window"
    exact = index.search(text=text, k=10, mode=mode)
    staged = index.search(text=text, k=10, mode=mode, candidates=79)
    assert [h.id for h in staged] == [h.id for h in exact]
    assert "candidates_ms" in staged.timings and "candidates_ms" not in exact.timings


def test_hits_come_from_the_candidates_only(index):
    text = "two children play in the water"
    snap = index.snapshot
    _, queries = mvr.query_vectors(snap, Query(text=text), mvr.MultiVectorParams())
    allowed = set(snap.ids[mvr.candidate_positions(snap, queries, 3)].tolist())
    hits = index.search(text=text, k=10, mode="exhaustive", candidates=3)
    assert {h.id for h in hits} <= allowed and len(hits) == min(10, len(allowed))
    assert hits.stats.candidates_per_level[0] == len(allowed)


def test_bad_candidates_are_refused(index):
    for bad in (-1, 2.5, "many"):
        with pytest.raises(ValueError, match="candidates"):
            index.search(text="a cat", mode="hierarchical", candidates=bad)


def test_cli_candidates(index):
    import json

    from typer.testing import CliRunner

    from finegrain.cli import app

    run = CliRunner().invoke
    ok = run(app, ["search", "--index", str(index.path), "--text", "a red car", "--mode", "exhaustive",
                   "--candidates", "79", "--json"])
    assert ok.exit_code == 0, ok.output
    full = run(app, ["search", "--index", str(index.path), "--text", "a red car", "--mode", "exhaustive", "--json"])
    assert [r["id"] for r in json.loads(ok.stdout)["results"]] == [r["id"] for r in json.loads(full.stdout)["results"]]
    bad = run(app, ["search", "--index", str(index.path), "--text", "a red car", "--mode", "hierarchical",
                    "--candidates", "-1"])
    assert bad.exit_code != 0 and "candidates" in bad.output and "Traceback" not in bad.output


def test_filters_then_the_stage_among_the_allowed_images(index):
    text = "a man rides a bike down a hill"
    snap = index.snapshot
    kept = [int(i) for i in snap.ids if int(i) % 2 == 0]  # 40 of the 80 images
    mask = np.isin(snap.ids, kept)
    _, queries = mvr.query_vectors(snap, Query(text=text), mvr.MultiVectorParams())
    pool = set(snap.ids[mvr.candidate_positions(snap, queries, 4, mask)].tolist())
    assert pool <= set(kept) and 4 <= len(pool)
    hits = index.search(text=text, k=10, mode="exhaustive", candidates=4, filters={"ids": kept})
    assert "candidates_ms" in hits.timings  # the stage ran under the filter (it used to be switched off)
    assert {h.id for h in hits} <= pool and len(hits) == min(10, len(pool))
    # a stage no smaller than what the filter allows is no stage: exact over the allowed images
    exact = index.search(text=text, k=10, mode="exhaustive", filters={"ids": kept}, candidates=0)
    wide = index.search(text=text, k=10, mode="exhaustive", filters={"ids": kept}, candidates=40)
    assert [h.id for h in wide] == [h.id for h in exact] and "candidates_ms" not in wide.timings
    assert {h.id for h in exact} <= set(kept)


@pytest.mark.parametrize("selector", [False, True])
def test_filtered_stage_equals_the_filtered_full_scoring_on_its_pool(index, monkeypatch, selector):
    """Exhaustive scores are per image: the staged, filtered top 10 is the filtered full ranking cut to the pool."""
    from finegrain.retrieval import dense

    if selector:  # the FAISS ID-selector path large filtered indexes take (exact fallback when it comes back short)
        monkeypatch.setattr(dense, "EXACT_ALLOWED_ROWS", 0)
    text = "a woman in a red coat crossing a street"
    snap = index.snapshot
    kept = [int(i) for i in snap.ids if int(i) % 3]
    _, queries = mvr.query_vectors(snap, Query(text=text), mvr.MultiVectorParams())
    g = np.asarray(snap.global_rows.vectors)
    ok = np.isin(snap.ids, kept)
    want_pool = set()
    for v in queries:  # each query vector's exact top 5 among the allowed images
        order = [int(p) for p in np.argsort(-(g @ v), kind="stable") if ok[p]]
        want_pool |= set(snap.ids[order[:5]].tolist())
    pool = set(snap.ids[mvr.candidate_positions(snap, queries, 5, ok)].tolist())
    assert pool == want_pool
    full = index.search(text=text, k=len(kept), mode="exhaustive", candidates=0, filters={"ids": kept})
    staged = index.search(text=text, k=10, mode="exhaustive", candidates=5, filters={"ids": kept})
    want = [h for h in full if h.id in pool][:10]
    assert [h.id for h in staged] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in staged], [h.score for h in want], rtol=1e-5)


def test_the_fused_stage_is_the_top_n_of_one_weighted_vector(index):
    """``stage="fused"``: the top n of ``w q_0 + (1 - w) mean_j q_j`` (one search, not one per query vector)."""
    snap = index.snapshot
    q = _unit(np.random.default_rng(3).standard_normal((4, index.encoder.dim)))
    g = np.asarray(snap.global_rows.vectors)
    for w in (0.0, 0.5, 0.8):
        got = mvr.candidate_positions(snap, q, 9, None, "fused", w)
        fused = w * q[0] + (1 - w) * q.mean(axis=0)
        assert np.array_equal(got, np.sort(np.argsort(-(g @ fused), kind="stable")[:9]))
    kept = np.arange(len(snap)) % 3 == 0
    got = mvr.candidate_positions(snap, q, 5, kept, "fused", 0.5)
    assert len(got) == 5 and kept[got].all()
    # an image query is one vector: both policies take its top n
    assert np.array_equal(mvr.candidate_positions(snap, q[:1], 7, None, "fused"),
                          mvr.candidate_positions(snap, q[:1], 7))


def test_the_stage_policy_is_a_search_option(index):
    text = "a dog on a red sofa next to a window"
    snap = index.snapshot
    _, queries = mvr.query_vectors(snap, Query(text=text), mvr.MultiVectorParams())
    pool = set(snap.ids[mvr.candidate_positions(snap, queries, 12, None, "fused")].tolist())
    hits = index.search(text=text, k=10, mode="hierarchical", candidates=12, stage="fused")
    assert {h.id for h in hits} <= pool and hits.stats.candidates_per_level[0] == 12
    assert [h.id for h in index.search(text=text, k=10, mode="exhaustive", candidates=79, stage="fused")] == \
        [h.id for h in index.search(text=text, k=10, mode="exhaustive")]
    for bad in ("both", 3):
        with pytest.raises(ValueError, match="stage"):
            index.search(text=text, mode="hierarchical", candidates=12, stage=bad)


def test_cli_stage(index):
    from typer.testing import CliRunner

    from finegrain.cli import app

    args = ["search", "--index", str(index.path), "--text", "a red car", "--mode", "hierarchical", "--candidates", "5"]
    assert CliRunner().invoke(app, [*args, "--stage", "fused", "--json"]).exit_code == 0
    bad = CliRunner().invoke(app, [*args, "--stage", "everything"])
    assert bad.exit_code == 2 and "stage must be one of union, fused" in bad.output and "Traceback" not in bad.output


def test_behind_an_hnsw_graph_the_global_term_reads_the_graphs_own_rows(tmp_path, monkeypatch):
    """Above the ANN threshold the multi-vector modes score global rows from the HNSW graph's copy (in memory),
    not from the mapped rows file, once the graph is loaded: the same values, so the same answers."""
    from finegrain.compress.coded import global_vectors
    from finegrain.index import Index
    from finegrain.store import ann
    from finegrain.store.pages import is_mapped

    text = "a dog on a red sofa next to a window"
    random_segmented_index(tmp_path / "idx", 80, seed=11).close()
    options = {"k": 10, "mode": "hierarchical", "candidates": 30, "stage": "fused"}
    with Index.open(tmp_path / "idx") as idx:  # below the threshold: exact stage, mapped rows
        want = [(h.id, h.score) for h in idx.search(text=text, **options)]
        assert is_mapped(global_vectors(idx.snapshot))
    monkeypatch.setattr(ann, "AUTO_ANN_THRESHOLD", 20)  # 80 images now take an HNSW graph
    with Index.open(tmp_path / "idx") as idx:
        snap = idx.snapshot
        assert global_vectors(snap) is snap.global_rows.vectors  # the graph is not loaded only for this
        got = [(h.id, h.score) for h in idx.search(text=text, **options)]
        assert snap.built("ann:global").kind == "hnsw"
        rows = global_vectors(snap)
        assert not is_mapped(rows) and not rows.flags.writeable
        assert np.array_equal(rows, snap.global_rows.vectors)
    assert [i for i, _ in got] == [i for i, _ in want]
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-6)


def test_stored_rows_are_the_structures_own_float32_rows_or_none():
    from finegrain.store.ann import VectorIndex

    x = _unit(np.random.default_rng(5).standard_normal((400, 16)))
    for kind in ("flat", "hnsw"):
        rows = VectorIndex(x, kind).stored_rows()
        assert rows is not None and np.array_equal(rows, x) and not rows.flags.writeable
    assert VectorIndex(x, "ivf").stored_rows() is None  # inverted lists: no plain copy to view
    assert VectorIndex(np.zeros((0, 16), np.float32), "flat").stored_rows() is None
