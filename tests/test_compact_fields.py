"""Compact storage of multi-vector fields (`finegrain compress --field F --method M --dim D --quantize Q`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from compact_index_helpers import (
    assert_compress_usage_error,
    crash_before_catalog_commit,
    kill_before_catalog_commit,
    minmax_codec,
    opened_copy,
)
from random_index_helpers import unit as _unit
from rounding_helpers import assert_dots_close
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.compress import storage
from finegrain.decompose.segments import SegmentConfig
from finegrain.index import Index
from finegrain.objects.config import ObjectConfig
from finegrain.store.catalog import NewImage
from finegrain.store.integrity import check_index
from finegrain.store.vectors import FieldRows

N_IMAGES, RANK = 60, 12
SEG_LEVELS = np.array([0, 0, 1, 1, 1, 1])  # 2 segments at level 0, 4 at level 1, per image
N_OBJ = 3
TEXT = "a dog with a red ball"


def _rows(rng: np.random.Generator, basis: np.ndarray, n: int) -> np.ndarray:
    """Unit rows near a RANK-dim subspace (so a 16-dim projection keeps them nearly whole)."""
    return _unit(rng.standard_normal((n, RANK)) @ basis + 0.01 * rng.standard_normal((n, basis.shape[1])))


def _commit(idx: Index, first: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = idx.encoder.dim
    basis = np.random.default_rng(0).standard_normal((RANK, d))
    per = len(SEG_LEVELS)
    images = [NewImage(f"/c/{first + i}.jpg", f"{first + i:064x}", 1, 1, 32, 32) for i in range(n)]
    fields = {
        "global": FieldRows(_rows(rng, basis, n), np.arange(n)),
        "segments": FieldRows(_rows(rng, basis, n * per), np.repeat(np.arange(n), per),
                              {"level": np.tile(SEG_LEVELS, n), "box": np.tile([0, 0, 1, 1], (n * per, 1)).astype(
                                  np.float32), "area": np.full(n * per, 0.25, np.float32)}),
        "objects": FieldRows(_rows(rng, basis, n * N_OBJ), np.repeat(np.arange(n), N_OBJ),
                             {"box": np.tile([0, 0, 1, 1], (n * N_OBJ, 1)).astype(np.float32),
                              "score": np.ones(n * N_OBJ, np.float32)}),
        "objects_mean": FieldRows(_rows(rng, basis, n), np.arange(n)),
    }
    with idx.writer() as w:
        w.commit(images, fields, [], [], [])
    idx.refresh()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A synthetic index: global, segments (2 levels) and objects (joint space) for 60 images."""
    path = tmp_path_factory.mktemp("compact") / "idx"
    idx = Index.create(path, segments=SegmentConfig(levels=(4, 9)), objects=ObjectConfig(space="joint"))
    _commit(idx, 0, N_IMAGES, seed=1)
    idx.close()
    return path


@pytest.fixture
def index(base, tmp_path):
    with opened_copy(base, tmp_path / "idx") as idx:
        yield idx


def _hits(idx: Index, mode: str, k: int = 10) -> list[tuple[int, float]]:
    return [(h.id, h.score) for h in idx.search(text=TEXT, mode=mode, k=k)]


def _image_query_ranks(idx: Index, rows: int = 20) -> list[int]:
    """Exhaustive scoring with stored segment rows as queries: where each row's own image ranks."""
    from finegrain.search import multivector as mv

    snap = idx.snapshot
    seg = snap.field("segments") if snap.has_field("segments") else None
    assert seg is not None
    table = idx.segment_table
    ranks = []
    for r in range(0, len(seg), len(seg) // rows):
        q = np.asarray(seg.vectors[r:r + 1], np.float32)
        _, pos, _ = mv.search("exhaustive", table, snap.global_rows.vectors, q, N_IMAGES,
                              mv.MultiVectorConfig(weight_global=0.0))
        ranks.append(int(np.flatnonzero(snap.ids[pos] == seg.owners[r])[0]))
    return ranks


# ------------------------------------------------------------------ codec
@pytest.mark.parametrize("quantize", ["float16", "int8"])
def test_codec_round_trip_and_folded_scores(quantize):
    rng = np.random.default_rng(3)
    x = _unit(rng.standard_normal((500, 64)))
    codec = minmax_codec(x, quantize)
    stored = codec.encode(x)
    assert stored.dtype == np.dtype(quantize)
    back = codec.decode(stored)
    bound = codec.scale / 2 + 1e-6 if codec.scale is not None else np.abs(x) * 2 ** -10 + 1e-7
    assert np.all(np.abs(back - x) <= bound)  # int8: half a step per dimension; float16: its rounding
    q = _unit(rng.standard_normal((3, 64)))
    np.testing.assert_allclose(codec.scores(stored, q), back @ q.T, atol=1e-5)  # scale folded into the query
    np.testing.assert_allclose(storage.dot_rows(stored[:0], q), np.zeros((0, 3)))


def test_int8_blocks_match_one_matmul(monkeypatch):
    rng = np.random.default_rng(4)
    rows = rng.integers(-127, 128, (1000, 16)).astype(np.int8)
    q = rng.standard_normal((2, 16)).astype(np.float32)
    monkeypatch.setattr(storage, "BLOCK_ROWS", 77)
    assert_dots_close(storage.dot_rows(rows, q), rows, q)


# ------------------------------------------------------------- segments
OPTIONS = [("none", None, "float16"), ("none", None, "int8"), ("pca", 16, "none"), ("pca", 16, "int8")]


@pytest.mark.parametrize("method,dim,quantize", OPTIONS)
def test_compress_segments_every_mode_searches(index, method, dim, quantize):
    before = {m: _hits(index, m) for m in ("single", "exhaustive", "hierarchical")}
    info = index.compress(method, dim, field="segments", quantize=quantize)
    assert info["quantize"] == quantize and info["method"] == method and info["originals"] == "kept"
    stored = index.snapshot.field("segments-compact")
    assert stored.vectors.dtype == np.dtype({"none": "float32"}.get(quantize, quantize))
    assert stored.vectors.shape[1] == (dim or 512)
    np.testing.assert_array_equal(stored.owners, index.snapshot.field("segments").owners)
    per_image = index.info()["vector_bytes_per_image"]
    assert per_image["segments-compact"] == len(SEG_LEVELS) * (dim or 512) * stored.vectors.itemsize
    assert index.info()["storage"]["segments"]["quantize"] == quantize
    for mode, hits in before.items():
        after = _hits(index, mode)
        assert len(after) == len(hits) == 10
        assert all(np.isfinite(s) for _, s in after)
        if method == "none":  # a quantised copy of the same rows: the same ranking, scores within a step
            assert [i for i, _ in after[:3]] == [i for i, _ in hits[:3]]
            np.testing.assert_allclose([s for _, s in after], [s for _, s in hits], atol=0.02)
    # projected (PCA 16 of near-rank-12 rows): a stored segment still finds its own image first
    assert max(_image_query_ranks(index)) == 0
    assert index.explain(text=TEXT, mode="exhaustive", ids=[after[0][0]])[0].subqueries  # explain reads them too


def test_undo_restores_identical_results_and_files(index):
    before = {m: _hits(index, m) for m in ("global", "exhaustive", "hierarchical")}
    index.compress("pca", 16, field="segments", quantize="int8")
    assert (index.path / storage.STORAGE_DIR).is_dir() and any((index.path / storage.STORAGE_DIR).iterdir())
    assert index.compress("none", field="segments", quantize="none") == {}
    assert not index.snapshot.has_field("segments-compact")
    assert index.info()["storage"] is None
    assert not any((index.path / storage.STORAGE_DIR).iterdir())
    assert {m: _hits(index, m) for m in before} == before


def test_new_images_get_compact_rows(index):
    index.compress(None, None, field="segments", quantize="int8")
    index.compress("pca", 16, field="objects_mean", quantize="float16")
    _commit(index, N_IMAGES, 5, seed=9)
    snap = index.snapshot
    seg, compact = snap.field("segments"), snap.field("segments-compact")
    assert len(compact) == len(seg) == (N_IMAGES + 5) * len(SEG_LEVELS)
    np.testing.assert_array_equal(np.sort(compact.owners), np.sort(seg.owners))
    codec = storage.snapshot_codec(snap, "segments")
    new = np.isin(seg.owners, snap.ids[-5:])
    new_c = np.isin(compact.owners, snap.ids[-5:])
    np.testing.assert_array_equal(np.asarray(compact.vectors[new_c]), codec.encode(np.asarray(seg.vectors[new])))
    assert len(snap.field("objects_mean-compact")) == N_IMAGES + 5
    assert len(_hits(index, "hierarchical")) == 10 and len(_hits(index, "objects")) == 10
    # compaction rewrites compact fields like any other (removed images' rows dropped, int8 kept)
    index.remove([int(snap.ids[0])])
    index.compact()
    compact = index.snapshot.field("segments-compact")
    assert compact.vectors.dtype == np.int8 and len(compact) == (N_IMAGES + 4) * len(SEG_LEVELS)
    assert check_index(index.path).as_dict()["ok"]


def test_objects_fields_search_after_compress(index):
    before = {m: _hits(index, m) for m in ("objects", "objects-max")}
    index.compress(None, None, field="objects", quantize="int8")
    index.compress(None, None, field="objects_mean", quantize="int8")
    for mode, hits in before.items():
        after = _hits(index, mode)
        assert [i for i, _ in after[:3]] == [i for i, _ in hits[:3]]
        np.testing.assert_allclose([s for _, s in after], [s for _, s in hits], atol=0.02)
    assert index.explain(text=TEXT, mode="objects-max", ids=[before["objects-max"][0][0]])


def test_drop_originals(index):
    before = _hits(index, "exhaustive")
    index.compress(None, None, field="segments", quantize="float16", drop_originals=True)
    assert not index.snapshot.has_field("segments")
    assert "exhaustive" in index.available_modes()
    assert [i for i, _ in _hits(index, "exhaustive")[:3]] == [i for i, _ in before[:3]]
    with pytest.raises(ValueError, match="dropped"):
        index.compress("none", field="segments", quantize="none")
    _commit(index, N_IMAGES, 2, seed=5)  # new images: compact rows only
    assert not index.snapshot.has_field("segments")
    assert len(index.snapshot.field("segments-compact")) == (N_IMAGES + 2) * len(SEG_LEVELS)
    assert check_index(index.path).as_dict()["ok"]


def test_crash_before_the_catalog_commit_leaves_the_index_as_it_was(index):
    before = _hits(index, "hierarchical")
    generation = index.snapshot.generation
    with crash_before_catalog_commit():
        index.compress("pca", 16, field="segments", quantize="int8")
    assert any((index.path / storage.STORAGE_DIR).iterdir())  # the crash's leftovers ...
    assert (index.path / "vectors" / "segments-compact").is_dir()
    index.refresh()
    assert index.snapshot.generation == generation and index.info()["storage"] is None
    assert not index.snapshot.has_field("segments-compact")
    assert _hits(index, "hierarchical") == before
    with index.writer():  # ... swept by the next writer
        pass
    assert not any((index.path / storage.STORAGE_DIR).iterdir())
    assert not any((index.path / "vectors" / "segments-compact").iterdir())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("args,message", [
    (["--field", "nope", "--quantize", "int8"], "unknown field 'nope'"),
    (["--field", "segments", "--method", "pca", "--dim", "512"], "must be smaller than"),
    (["--field", "segments", "--quantize", "int4"], "unknown quantization 'int4'"),
    (["--field", "segments", "--dim", "16"], "--dim needs a projection"),
    (["--field", "segments", "--method", "pca"], "--dim must be a positive integer"),
    (["--field", "objects_refined", "--quantize", "int8"], "no 'objects_refined' field"),
    (["--quantize", "int8"], "--field"),
    (["--drop-originals"], "need --field"),
    (["--field", "segments", "--drop-originals"], "needs a compact form"),
])
def test_bad_combinations_are_one_line_errors(index, args, message):
    assert_compress_usage_error(index, args, message)


def test_cli_compress_info_and_undo(index):
    runner = CliRunner()
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--field", "segments", "--method", "pca",
                              "--dim", "16", "--quantize", "int8", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["bytes_per_image"] == len(SEG_LEVELS) * 16 and data["storage"]["dim"] == 16
    info = json.loads(runner.invoke(app, ["info", "--index", str(index.path), "--json"]).output)
    assert info["storage"]["segments"]["quantize"] == "int8"
    assert info["vector_bytes_per_image"]["segments"] == len(SEG_LEVELS) * 512 * 4
    res = runner.invoke(app, ["search", "--index", str(index.path), "--text", TEXT, "--mode", "hierarchical"])
    assert res.exit_code == 0, res.output
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--field", "segments", "--quantize", "none"])
    assert out.exit_code == 0 and "original float32" in out.output


def test_rescore_from_originals(index):
    before = {m: _hits(index, m) for m in ("exhaustive", "hierarchical")}
    index.compress("pca", 16, field="segments", quantize="int8")
    for mode, hits in before.items():
        # the whole collection as the short list: exactly the float32 ranking and scores again
        again = [(h.id, h.score) for h in index.search(text=TEXT, mode=mode, k=10, rescore=N_IMAGES)]
        assert [i for i, _ in again] == [i for i, _ in hits]
        np.testing.assert_allclose([s for _, s in again], [s for _, s in hits], rtol=1e-6)
        short = index.search(text=TEXT, mode=mode, k=5, rescore=20)
        assert len(short) == 5 and {h.id for h in short} <= {h.id for h in index.search(text=TEXT, mode=mode, k=20)}
    with pytest.raises(ValueError, match="rescore"):
        index.search(text=TEXT, mode="exhaustive", rescore=-1)


def test_sigkill_before_the_catalog_commit(index):
    """A real kill (SIGKILL, writer lock held) at the step before the catalog transaction."""
    before = _hits(index, "exhaustive")
    kill_before_catalog_commit(index.path, "compress('pca', 16, field='segments', quantize='int8')")
    index.refresh()
    assert index.info()["storage"] is None and not index.snapshot.has_field("segments-compact")
    assert _hits(index, "exhaustive") == before
    index.compress(None, None, field="segments", quantize="float16")  # the next writer works (and sweeps)
    assert len(list((index.path / storage.STORAGE_DIR).iterdir())) == 0
    chunks = {p.name.split(".")[0] for p in (index.path / "vectors" / "segments-compact").iterdir()}
    assert len(chunks) == 1  # the killed run's chunk was swept; only the committed one is left
