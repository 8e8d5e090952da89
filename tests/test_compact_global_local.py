"""Quantised storage of the global and local fields (`finegrain compress --field global|local --quantize Q`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from compact_index_helpers import (
    assert_compress_usage_error,
    crash_before_catalog_commit,
    kill_before_catalog_commit,
    minmax_codec,
    opened_copy,
)
from photo_crop_helpers import save_two_crops, small_cnn_local
from random_index_helpers import unit as _unit
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.compress import coded, storage
from finegrain.index import Index
from finegrain.store.catalog import NewImage
from finegrain.store.integrity import check_index
from finegrain.store.vectors import FieldRows

N_IMAGES, DIM = 400, 512


def _vectors(seed: int, n: int) -> np.ndarray:
    """Unit rows in 40 loose clusters (neighbours with small score gaps, as in real collections)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((40, DIM))
    return _unit(centres[rng.integers(0, 40, n)] + 1.5 * rng.standard_normal((n, DIM)))


def _commit(idx: Index, first: int, n: int, seed: int) -> None:
    images = [NewImage(f"/g/{first + i}.jpg", f"{first + i:064x}", 1, 1, 32, 32) for i in range(n)]
    with idx.writer() as w:
        w.commit(images, {"global": FieldRows(_vectors(seed, n), np.arange(n))}, [], [], [])
    idx.refresh()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("gq") / "idx"
    idx = Index.create(path)
    _commit(idx, 0, N_IMAGES // 2, seed=1)  # two chunks
    _commit(idx, N_IMAGES // 2, N_IMAGES // 2, seed=2)
    idx.close()
    return path


@pytest.fixture
def index(base, tmp_path):
    with opened_copy(base, tmp_path / "idx") as idx:
        yield idx


QUERIES = _unit(_vectors(7, 30) + 0.05)


def _search_kw(idx: Index, k: int, rescore: int | None = None, allowed: np.ndarray | None = None):
    from finegrain.retrieval.dense import search_vectors

    return search_vectors(idx.snapshot, QUERIES, k, allowed=allowed, rescore=rescore)


def _error_bound(idx: Index) -> np.ndarray:
    """Per query, the largest possible |int8 score - float32 score|: sum_i |q_i| * scale_i / 2."""
    codec = storage.snapshot_codec(idx.snapshot, "global")
    assert codec.scale is not None
    return np.abs(QUERIES) @ codec.scale / 2 + 1e-6


# ------------------------------------------------------------------ FAISS holds the stored codes
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("quantize", ["float16", "int8"])
def test_faiss_scalar_quantizer_holds_the_stored_values(kind, quantize):
    x = _vectors(3, 2000)
    codec = minmax_codec(x, quantize)
    codes = codec.encode(x)
    ann = coded.CodedIndex(codes, codec, kind)
    decoded = codec.decode(codes)
    if kind == "flat":  # FAISS holds exactly the stored codes and scores what numpy scores
        import faiss

        held = faiss.vector_to_array(ann.faiss.codes).reshape(len(x), -1)
        if quantize == "int8":
            np.testing.assert_array_equal(held.astype(np.int16) - 127, codes)
        else:
            np.testing.assert_array_equal(held.view(np.float16), codes)
        np.testing.assert_allclose(ann.faiss.reconstruct_n(0, len(x)), decoded, atol=1e-7)  # float rounding only
        scores, rows = ann.search(QUERIES, 5)
        exact = QUERIES @ decoded.T
        np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, 1), atol=1e-5)
        np.testing.assert_array_equal(rows[:, 0], exact.argmax(1))
    else:  # approximate structures: a stored row finds itself
        _, rows = ann.search(decoded[:50], 1)
        assert (rows[:, 0] == np.arange(50)).mean() >= 0.95
    bytes_per_row = {"float16": 2, "int8": 1}[quantize] * DIM
    if kind == "flat":  # the point of the exercise: FAISS keeps codes, not float32 copies
        assert ann.faiss.code_size == bytes_per_row


# ------------------------------------------------------------------ global
def test_float16_keeps_the_ranking_and_rescoring_restores_exact_scores(index):
    s0, i0 = index.search_vectors(QUERIES, 10)
    info = index.compress(None, None, field="global", quantize="float16")
    assert info["quantize"] == "float16" and info["originals"] == "kept"
    snap = index.snapshot
    assert snap.field("global-compact").vectors.dtype == np.float16
    s1, i1 = _search_kw(index, 10, rescore=0)  # codes only
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_allclose(s1, s0, atol=2e-3)
    s2, i2 = index.search_vectors(QUERIES, 10)  # default: the best 100 re-scored from the originals
    np.testing.assert_array_equal(i2, i0)
    np.testing.assert_allclose(s2, s0, rtol=1e-6)
    assert index.info()["bytes_per_image"] == 2 * DIM
    assert index.info()["vector_bytes_per_image"]["global-compact"] == 2 * DIM


def test_int8_top_k_differs_only_within_the_quantisation_error(index):
    s0, i0 = index.search_vectors(QUERIES, N_IMAGES)
    full = {q: dict(zip(i0[q].tolist(), s0[q].tolist())) for q in range(len(QUERIES))}
    index.compress(None, None, field="global", quantize="int8")
    assert index.snapshot.field("global-compact").vectors.dtype == np.int8
    bound = _error_bound(index)
    k = 10
    _, i1 = _search_kw(index, k, rescore=0)
    overlap = []
    for q in range(len(QUERIES)):
        kth = s0[q, k - 1]
        # An image can enter the int8 top k only if its float32 score is within twice the error bound of the
        # float32 k-th score (each of the two scores moves by at most the bound): a hard, derived limit.
        for image in set(i1[q].tolist()) - set(i0[q, :k].tolist()):
            assert full[q][image] >= kth - 2 * bound[q], (q, image)
        overlap.append(len(set(i1[q].tolist()) & set(i0[q, :k].tolist())) / k)
    assert float(np.mean(overlap)) >= 0.9, overlap  # and in practice nearly everything agrees
    s2, i2 = _search_kw(index, k, rescore=N_IMAGES)  # the whole collection re-scored: the float32 answer
    np.testing.assert_array_equal(i2, i0[:, :k])
    np.testing.assert_allclose(s2, s0[:, :k], rtol=1e-6)
    assert index.info()["bytes_per_image"] == DIM


def test_filters_and_the_ann_kinds_read_the_codes(index):
    allowed = np.zeros(N_IMAGES, bool)
    allowed[::7] = True
    _, i0 = _search_kw(index, 5, allowed=allowed)
    index.compress(None, None, field="global", quantize="float16")
    _, i1 = _search_kw(index, 5, allowed=allowed)
    np.testing.assert_array_equal(i1, i0)
    assert set(i1.ravel().tolist()) <= set(index.snapshot.ids[allowed].tolist())
    with index.writer() as w:  # HNSW over the codes (what a 10^6-image index gets)
        w.set_meta("ann", "hnsw")
    index.refresh()
    _, i2 = index.search_vectors(QUERIES, 5)
    assert isinstance(coded.coded_ann(index.snapshot), coded.CodedIndex)
    assert coded.coded_ann(index.snapshot).kind == "hnsw"
    index.compress(None, None, field="global", quantize="none")
    _, i3 = index.search_vectors(QUERIES, 5)
    assert (i2[:, 0] == i3[:, 0]).mean() >= 0.9  # HNSW over float16 codes vs HNSW over float32 rows


def test_undo_restores_exact_scores_and_files(index):
    before = index.search_vectors(QUERIES, 10)
    index.compress(None, None, field="global", quantize="int8")
    assert any((index.path / storage.STORAGE_DIR).iterdir())
    assert index.compress(None, None, field="global", quantize="none") == {}
    assert not index.snapshot.has_field("global-compact") and index.info()["storage"] is None
    assert not any((index.path / storage.STORAGE_DIR).iterdir())
    after = index.search_vectors(QUERIES, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])  # exactly the same scores
    assert index.info()["bytes_per_image"] == 4 * DIM


def test_new_images_removal_compaction_and_check(index):
    index.compress(None, None, field="global", quantize="int8")
    _commit(index, N_IMAGES, 5, seed=9)
    snap = index.snapshot
    compact = coded.global_compact_rows(snap)
    np.testing.assert_array_equal(compact.owners, snap.ids)
    codec = storage.snapshot_codec(snap, "global")
    np.testing.assert_array_equal(compact.vectors[-5:], codec.encode(snap.global_rows.vectors[-5:]))
    new = snap.global_rows.vectors[-1]
    _, ids = index.search_vectors(new[None, :], 1)
    assert ids[0, 0] == snap.ids[-1]  # found through the FAISS codes
    index.remove([int(snap.ids[0])])
    index.compact()
    assert len(index.snapshot.field("global-compact")) == N_IMAGES + 4
    report = check_index(index.path)
    assert report.as_dict()["ok"], report.as_dict()
    quantizer = next((index.path / storage.STORAGE_DIR).iterdir())
    quantizer.unlink()  # a lost quantiser file is reported (and search refuses with a one-line error)
    problems = check_index(index.path, record=False).as_dict()
    assert not problems["ok"] and "storage file is missing" in json.dumps(problems)


def test_crash_before_the_catalog_commit(index):
    before = index.search_vectors(QUERIES, 10)
    generation = index.snapshot.generation
    with crash_before_catalog_commit():
        index.compress(None, None, field="global", quantize="int8")
    index.refresh()
    assert index.snapshot.generation == generation and index.info()["storage"] is None
    after = index.search_vectors(QUERIES, 10)
    np.testing.assert_array_equal(after[0], before[0])
    with index.writer():  # the leftovers are swept by the next writer
        pass
    assert not any((index.path / storage.STORAGE_DIR).iterdir())
    assert not any((index.path / "vectors" / "global-compact").iterdir())


def test_sigkill_before_the_catalog_commit(index):
    before = index.search_vectors(QUERIES, 10)
    kill_before_catalog_commit(index.path, "compress(None, None, field='global', quantize='int8')")
    index.refresh()
    assert index.info()["storage"] is None and not index.snapshot.has_field("global-compact")
    np.testing.assert_array_equal(index.search_vectors(QUERIES, 10)[0], before[0])
    index.compress(None, None, field="global", quantize="float16")  # the next writer works and sweeps
    chunks = {p.name.split(".")[0] for p in (index.path / "vectors" / "global-compact").iterdir()}
    assert len(chunks) == 1
    assert check_index(index.path).as_dict()["ok"]


def test_shard_set_global_search_over_quantised_shards(base, tmp_path):
    from finegrain.shards import ShardedIndex

    for name in ("a", "b"):
        shutil.copytree(base, tmp_path / name)
    with ShardedIndex.create(tmp_path / "set", [tmp_path / "a", tmp_path / "b"]) as sset:
        before = sset.search(text="a red ball", mode="global", k=10)
    for name, quantize in (("a", "int8"), ("b", "float16")):
        with Index.open(tmp_path / name) as idx:
            idx.compress(None, None, field="global", quantize=quantize)
    with ShardedIndex.open(tmp_path / "set") as sset:
        after = sset.search(text="a red ball", mode="global", k=10)
        assert [s.info()["storage"]["global"]["quantize"] for s in sset.shards] == ["int8", "float16"]
    # each shard re-scores its best 100 from its float32 originals: the merged top 10 is the float32 one
    assert [(h.id, h.shard) for h in after] == [(h.id, h.shard) for h in before]
    np.testing.assert_allclose([h.score for h in after], [h.score for h in before], atol=1e-6)


# ------------------------------------------------------------------ errors and CLI
@pytest.mark.parametrize("args,message", [
    (["--field", "global", "--method", "pca", "--dim", "16", "--quantize", "int8", "--drop-originals"],
     "keeps its float32 originals"),
    (["--field", "global", "--method", "pca", "--dim", "600", "--quantize", "int8"], "larger than"),
    (["--field", "instance", "--quantize", "float16"], "already stored float16"),
    (["--field", "instance", "--quantize", "int8"], "no 'instance' field"),
    (["--field", "instance", "--method", "pca", "--dim", "16", "--quantize", "int8"], "--quantize int8 only"),
    (["--field", "global", "--quantize", "int8", "--drop-originals"], "keeps its float32 originals"),
    (["--field", "local", "--quantize", "float16"], "already stored float16"),
    (["--field", "local", "--quantize", "int8"], "no 'local' field"),
    (["--field", "local", "--method", "pca", "--dim", "16", "--quantize", "int8"], "--quantize int8 only"),
    (["--field", "global", "--quantize", "int4"], "unknown quantization 'int4'"),
])
def test_bad_combinations_are_one_line_errors(index, args, message):
    assert_compress_usage_error(index, args, message)


def test_projection_then_quantisation_and_the_refusals(index):
    runner = CliRunner()
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--method", "pca", "--dim", "16"])
    assert out.exit_code == 0, out.output
    index.refresh()
    projected = index.search_vectors(QUERIES, 10)
    # --field global on a projected index quantises the rows global search scores: the projected ones
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--field", "global", "--quantize", "int8"])
    assert out.exit_code == 0 and "projected (pca to 16 dims), int8 rows, 16 bytes" in " ".join(out.output.split())
    index.refresh()
    assert set(index.info()["storage"]) == {"compressed"} and index.info()["bytes_per_image"] == 16
    np.testing.assert_array_equal(index.search_vectors(QUERIES, 10)[1], projected[1])  # re-scored: the float rows
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--field", "global", "--quantize", "none"])
    assert out.exit_code == 0 and "float32 projected rows again (pca to 16 dims" in " ".join(out.output.split())
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--field", "global", "--quantize", "int8"])
    assert out.exit_code == 0, out.output
    index.refresh()
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--method", "pca", "--dim", "8"])
    assert out.exit_code == 2 and "stored int8" in " ".join(out.output.split())
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--method", "none"])  # both go together
    assert out.exit_code == 0, out.output
    index.refresh()
    assert index.info()["storage"] is None and index.info()["projection"] is None
    assert not index.snapshot.has_field("compressed-compact")
    assert not any((index.path / storage.STORAGE_DIR).iterdir())
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--field", "global", "--quantize", "int8",
                              "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["bytes_per_image"] == DIM
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--method", "pca", "--dim", "16"])
    assert out.exit_code == 2 and "stored quantised" in " ".join(out.output.split())
    info = json.loads(runner.invoke(app, ["info", "--index", str(index.path), "--json"]).output)
    assert info["storage"]["global"]["quantize"] == "int8" and info["bytes_per_image"] == DIM
    index.refresh()  # the CLI changed the index through another handle
    with pytest.raises(ValueError, match="rescore"):
        _search_kw(index, 3, rescore=-1)
    from finegrain.retrieval.dense import DenseParams

    with pytest.raises(ValueError, match="rescore"):
        DenseParams(rescore=-1)
    out = runner.invoke(app, ["compress", "--index", str(index.path), "--field", "global", "--quantize", "none"])
    assert out.exit_code == 0 and "original float32" in out.output


# ------------------------------------------------------------------ projection and quantisation together
PROJ_DIM = 64


def _projected_bound(idx: Index) -> np.ndarray:
    """Per query, the largest |int8 score - float32 score| in the projected space."""
    codec = storage.snapshot_codec(idx.snapshot, coded.PROJECTED)
    assert codec.scale is not None and idx.snapshot.projection is not None
    return np.abs(idx.snapshot.projection.transform(QUERIES)) @ codec.scale / 2 + 1e-6


@pytest.mark.parametrize("method", ["pca", "ss2d"])
def test_projection_and_int8_together(index, method):
    params = {"n_steps": 30, "teacher": None} if method == "ss2d" else {}
    index.compress(method, PROJ_DIM, **params)
    p0, j0 = index.search_vectors(QUERIES, N_IMAGES)  # the projection alone, float32
    index.compress("none")
    info = index.compress(method, PROJ_DIM, field="global", quantize="int8", **params)
    assert info["quantize"] == "int8" and info["projection"]["method"] == method
    snap = index.snapshot
    assert snap.projection_info is not None and snap.projection_info["dim"] == PROJ_DIM
    assert set(index.info()["storage"]) == {coded.PROJECTED} and coded.coded_field(snap) == coded.PROJECTED
    codes = coded.global_compact_rows(snap, coded.PROJECTED)
    assert codes.vectors.dtype == np.int8 and codes.vectors.shape == (N_IMAGES, PROJ_DIM)
    codec = storage.snapshot_codec(snap, coded.PROJECTED)
    np.testing.assert_array_equal(codes.vectors, codec.encode(snap.search_rows.vectors))  # the projected rows
    assert index.info()["bytes_per_image"] == PROJ_DIM  # 64 B searched, not 2 KB
    if method == "pca":  # PCA refits to the same projection: the float32 answer above is this index's
        s0, i0 = p0, j0
    else:  # SS2D trains anew: compare with this projection's own float32 rows
        index.compress(None, None, field="global", quantize="none")
        s0, i0 = index.search_vectors(QUERIES, N_IMAGES)
        index.compress(None, None, field="global", quantize="int8")
    full = {q: dict(zip(i0[q].tolist(), s0[q].tolist())) for q in range(len(QUERIES))}
    k, bound = 10, _projected_bound(index)
    _, i1 = _search_kw(index, k, rescore=0)  # the codes alone (FAISS SQ over the stored int8 rows)
    for q in range(len(QUERIES)):
        for image in set(i1[q].tolist()) - set(i0[q, :k].tolist()):
            assert full[q][image] >= s0[q, k - 1] - 2 * bound[q], (q, image)
    s2, i2 = _search_kw(index, k, rescore=N_IMAGES)  # everything re-scored from the projected float32 rows
    np.testing.assert_array_equal(i2, i0[:, :k])
    np.testing.assert_allclose(s2, s0[:, :k], rtol=1e-5, atol=1e-6)
    allowed = np.zeros(N_IMAGES, bool)
    allowed[::5] = True
    _, i3 = _search_kw(index, 5, allowed=allowed, rescore=N_IMAGES)  # filters score the codes, then re-score
    assert set(i3.ravel().tolist()) <= set(snap.ids[allowed].tolist())
    if method == "ss2d":  # a nested size searches the float32 projected rows (the codes are of the full size)
        _, i4 = index.search_vectors(QUERIES, 5, dim=16)
        assert i4.shape == (len(QUERIES), 5)
    # later images are projected and quantised in their commit; compaction and `finegrain check` keep up
    _commit(index, N_IMAGES, 5, seed=9)
    snap = index.snapshot
    codes = coded.global_compact_rows(snap, coded.PROJECTED)
    np.testing.assert_array_equal(codes.vectors[-5:], codec.encode(snap.search_rows.vectors[-5:]))
    new = snap.global_rows.vectors[-1]
    assert index.search_vectors(new[None, :], 1)[1][0, 0] == snap.ids[-1]
    index.remove([int(snap.ids[0])])
    index.compact()
    assert len(index.snapshot.field("compressed-compact")) == N_IMAGES + 4
    assert check_index(index.path).as_dict()["ok"]
    # undo the quantisation: the projection alone again, exactly
    alone = index.compress(None, None, field="global", quantize="none")
    assert alone == {} and index.info()["storage"] is None and index.info()["projection"]["method"] == method
    a, b = index.search_vectors(QUERIES, 10), _search_kw(index, 10, rescore=0)
    np.testing.assert_array_equal(a[0], b[0])  # no codes left: rescore is ignored
    assert index.info()["bytes_per_image"] == 4 * PROJ_DIM
    index.compress(None, None, field="global", quantize="float16")  # quantise the projection in place
    assert index.snapshot.field("compressed-compact").vectors.dtype == np.float16
    assert index.info()["bytes_per_image"] == 2 * PROJ_DIM
    # a new projection replaces an unprojected quantisation of the global field
    index.compress("none")
    index.compress(None, None, field="global", quantize="int8")
    index.compress("pca", 32, field="global", quantize="int8")
    assert set(index.info()["storage"]) == {coded.PROJECTED} and not index.snapshot.has_field("global-compact")
    assert index.info()["bytes_per_image"] == 32
    assert len(list((index.path / storage.STORAGE_DIR).iterdir())) == 1
    assert len(list((index.path / "projection").iterdir())) == 1


def test_projection_and_quantisation_crash_before_the_catalog_commit(index, monkeypatch):
    before = index.search_vectors(QUERIES, 10)
    generation = index.snapshot.generation

    with crash_before_catalog_commit():
        index.compress("pca", PROJ_DIM, field="global", quantize="int8")
    index.refresh()
    assert index.snapshot.generation == generation
    assert index.info()["storage"] is None and index.info()["projection"] is None
    np.testing.assert_array_equal(index.search_vectors(QUERIES, 10)[0], before[0])
    with index.writer():  # the leftovers (projection, quantiser, both chunks) are swept by the next writer
        pass
    for folder in ("projection", storage.STORAGE_DIR, "vectors/compressed", "vectors/compressed-compact"):
        assert not (index.path / folder).exists() or not any((index.path / folder).iterdir()), folder
    assert check_index(index.path).as_dict()["ok"]


def test_cli_projection_and_quantisation_in_one_command(index):
    out = CliRunner().invoke(app, ["compress", "--index", str(index.path), "--field", "global", "--method", "pca",
                                   "--dim", "32", "--quantize", "int8", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["storage"]["projection"]["dim"] == 32 and result["bytes_per_image"] == 32
    index.refresh()
    problems = check_index(index.path, record=False).as_dict()
    assert problems["ok"], problems
    quantizer = next((index.path / storage.STORAGE_DIR).iterdir())
    quantizer.unlink()
    problems = check_index(index.path, record=False).as_dict()
    assert not problems["ok"] and "field compressed: a storage file is missing" in json.dumps(problems)


# ------------------------------------------------------------------ a real index (photos, the bundled encoder)
@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, tiny_flickr):
    from finegrain.decompose.segments import SegmentConfig

    path = tmp_path_factory.mktemp("gqreal") / "idx"
    idx = Index.create(path, segments=SegmentConfig(levels=(4,)))
    idx.add([tiny_flickr / "images"])
    idx.close()
    return path


TEXTS = ["a cat", "an astronaut", "a cup of coffee", "a rocket", "some coins", "a man with a camera"]


def _ranks(idx: Index, mode: str, **kw) -> list[list[tuple[int, float]]]:
    return [[(h.id, h.score) for h in idx.search(text=t, mode=mode, k=len(idx), **kw)] for t in TEXTS]


def test_real_index_float16_rankings_equal_and_int8_close(photo_index, tmp_path):
    path = tmp_path / "idx"
    shutil.copytree(photo_index, path)
    idx = Index.open(path)
    modes = ("global", "exhaustive", "hierarchical")
    before = {m: _ranks(idx, m) for m in modes}
    idx.compress(None, None, field="global", quantize="float16")
    for m in modes:  # the full ranking of all 24 photos, every query
        after = _ranks(idx, m, **({"rescore": 0} if m == "global" else {}))
        assert [[i for i, _ in r] for r in after] == [[i for i, _ in r] for r in before[m]], m
    idx.compress(None, None, field="global", quantize="int8")
    assert isinstance(coded.global_vectors(idx.snapshot), coded.CodedRows)  # the global term reads the codes
    subject = {r.id: r.path.rsplit("/", 1)[-1].split("_")[0] for r in idx.snapshot.records.values()}
    for m in modes:
        after = _ranks(idx, m, **({"rescore": 0} if m == "global" else {}))
        for a, b in zip(after, before[m]):
            # 4 crops of one photo score alike, so int8 may reorder them: the best photo's subject stays
            assert subject[a[0][0]] == subject[b[0][0]], m
            np.testing.assert_allclose(sorted(s for _, s in a), sorted(s for _, s in b), atol=0.02)
    exact = _ranks(idx, "global")  # default re-scoring: the top 100 (here: all) from the originals
    assert [[i for i, _ in r] for r in exact] == [[i for i, _ in r] for r in before["global"]]
    np.testing.assert_allclose([[s for _, s in r] for r in exact], [[s for _, s in r] for r in before["global"]],
                               atol=1e-6)  # numpy's and FAISS's float32 dot products differ by rounding
    hit = idx.search(text=TEXTS[0], mode="exhaustive", k=1)[0]
    ex = idx.explain(text=TEXTS[0], mode="exhaustive", ids=[hit.id])[0]
    assert ex.score == pytest.approx(hit.score, abs=1e-5)  # explain reads the same codes as the search
    idx.close()


# ------------------------------------------------------------------ local descriptors
@pytest.fixture(scope="module")
def local_base(tmp_path_factory, photos_dir):
    root = tmp_path_factory.mktemp("lq")
    (root / "db").mkdir()
    photos = sorted(photos_dir.iterdir())
    save_two_crops(photos[:5], root / "db")
    idx = Index.create(root / "idx", local=small_cnn_local())
    assert idx.add([root / "db"]).indexed == 10
    idx.close()
    return root, photos


@pytest.fixture
def local_index(local_base, tmp_path):
    root, photos = local_base
    with opened_copy(root / "idx", tmp_path / "idx") as idx:
        yield idx, photos, root


LOCAL_KW = {"l2g": {"shortlist": 6, "mds_dim": 4, "smacof_iter": 50, "sg_k": 1}, "local": {}, "global+local": {}}


def _local_hits(idx: Index, photo, mode: str) -> list[tuple[int, float]]:
    return [(h.id, h.score) for h in idx.search(image=photo, mode=mode, k=len(idx), **LOCAL_KW[mode])]


def test_local_int8_search_undo_and_drop(local_index):
    idx, photos, root = local_index
    modes = ("local", "l2g", "global+local")
    before = {(m, p.name): _local_hits(idx, p, m) for m in modes for p in photos[:5]}
    originals = idx.snapshot.field("local")
    exact_before = idx.local_searcher.exact_top(idx.local_searcher.query_features(photos[0], None)[0])
    info = idx.compress(None, None, field="local", quantize="int8")
    assert info["quantize"] == "int8" and info["dim"] == 128
    stored = idx.snapshot.field("local-compact")
    assert stored.vectors.dtype == np.int8 and len(stored) == len(originals)
    np.testing.assert_array_equal(stored.attrs["xys"], originals.attrs["xys"])
    assert idx.info()["vector_bytes_per_image"]["local-compact"] * 2 == pytest.approx(
        idx.info()["vector_bytes_per_image"]["local"], rel=1e-3)
    # exact Chamfer from the int8 rows: each similarity moves by at most sum_i |q_i| scale_i / 2
    s = idx.local_searcher
    q = s.query_features(photos[0], None)[0]
    scale = storage.snapshot_codec(idx.snapshot, "local").scale
    assert scale is not None
    bound = float((np.abs(q) @ scale).max() / 2) + 1e-5
    np.testing.assert_allclose(s.exact_top(q), exact_before, atol=bound)
    for (m, name), hits in before.items():
        after = _local_hits(idx, photos[[p.name for p in photos].index(name)], m)
        assert {i for i, _ in after[:2]} == {i for i, _ in hits[:2]}, (m, name)  # both crops of the photo first
    # undo: exactly the float16 originals' results again
    assert idx.compress(None, None, field="local", quantize="none") == {}
    assert {(m, p.name): _local_hits(idx, p, m) for m in modes for p in photos[:5]} == before
    # dropped originals: search and new images use the int8 rows only
    idx.compress(None, None, field="local", quantize="int8", drop_originals=True)
    assert not idx.snapshot.has_field("local") and idx.info()["local"]["descriptors"] == len(originals)
    assert {i for i, _ in _local_hits(idx, photos[0], "l2g")[:2]} == {i for i, _ in before[("l2g", photos[0].name)][:2]}
    from PIL import Image  # the sixth photo joins the database now

    Image.open(photos[5]).convert("RGB").save(root / "db" / f"{photos[5].stem}_a.jpg")
    try:
        assert idx.add([root / "db"]).indexed == 1
    finally:
        (root / "db" / f"{photos[5].stem}_a.jpg").unlink()
    assert not idx.snapshot.has_field("local")
    assert set(np.unique(idx.snapshot.field("local-compact").owners)) == set(idx.records)
    assert check_index(idx.path).as_dict()["ok"]
    with pytest.raises(ValueError, match="dropped"):
        idx.compress(None, None, field="local", quantize="none")
    with pytest.raises(ValueError, match="undo it first"):
        idx.refit_local()


# ------------------------------------------------------------------ the local searcher holds the stored rows
def _int8(x: np.ndarray) -> tuple[np.ndarray, storage.Codec]:
    """``x`` quantised as `compress --field local --quantize int8` does (per-dimension min/max ranges)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    codec = storage.Codec(None, ((hi - lo) / 254).astype(np.float32), ((hi + lo) / 2).astype(np.float32), "int8")
    return codec.encode(x), codec


def test_local_database_scores_int8_rows_without_decoding_them(tmp_path):
    import faiss

    from finegrain.local.chamfer import ApproxChamfer, LocalDatabase, chamfer_scores

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 60, 300)  # some images without descriptors
    desc = _unit(rng.standard_normal((int(counts.sum()), 32)))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    codes, codec = _int8(desc)
    db = LocalDatabase(codes, offsets, codec.scale, codec.offset)
    assert db.descriptors.dtype == np.int8 and db.descriptors.nbytes == desc.size  # 1 byte a dimension in memory
    decoded = LocalDatabase(codec.decode(codes), offsets)  # the same values as float32 rows
    q = _unit(rng.standard_normal((40, 32)))
    np.testing.assert_allclose(chamfer_scores(q, db), chamfer_scores(q, decoded), atol=2e-6)
    some = rng.choice(300, 50, replace=False)
    np.testing.assert_allclose(chamfer_scores(q, db, some), chamfer_scores(q, decoded, some), atol=2e-6)
    # against the float32 originals: each best match moves by at most sum_i |q_i| scale_i / 2
    bound = float((np.abs(q) @ codec.scale).max() / 2) + 1e-6
    np.testing.assert_allclose(chamfer_scores(q, db), chamfer_scores(q, LocalDatabase(desc, offsets)), atol=bound)
    np.testing.assert_allclose(db.image(5), codec.decode(codes[offsets[5]:offsets[6]]))
    # the first stage: FAISS holds the int8 codes (scalar quantizer), not a float32 copy
    for kind in ("flat", "ivf"):
        approx = ApproxChamfer(db, index=kind, knn=20, nlist=8, nprobe=8)
        assert "ScalarQuantizer" in type(faiss.downcast_index(approx.index)).__name__
        exact = ApproxChamfer(decoded, index="flat", knn=20)
        s1, r1 = approx.score_all(q)
        s2, r2 = exact.score_all(q)
        if kind == "flat":  # the same neighbours and scores as float32 rows holding the decoded values
            np.testing.assert_array_equal(r1, r2)
            np.testing.assert_allclose(s1, s2, atol=1e-5)
    # a float16 field memory-mapped from disk is held as it is: no copy
    np.save(tmp_path / "d.npy", desc.astype(np.float16))
    mapped = np.load(tmp_path / "d.npy", mmap_mode="r")
    db16 = LocalDatabase(mapped, offsets)
    assert db16.descriptors.dtype == np.float16 and np.shares_memory(db16.descriptors, mapped)
    np.testing.assert_allclose(chamfer_scores(q, db16), chamfer_scores(q, LocalDatabase(
        np.asarray(mapped, np.float32), offsets)), atol=2e-6)
    with pytest.raises(ValueError, match="scale and offset"):
        LocalDatabase(codes, offsets)


def test_local_searcher_and_instance_int8_in_memory(local_index):
    import faiss

    idx, photos, _ = local_index
    s = idx.local_searcher
    assert s.db.descriptors.dtype == np.float16  # the stored float16 rows, not a float32 copy
    before = {p.name: _local_hits(idx, p, "local") for p in photos[:3]}
    inst_before = {p.name: [(h.id, h.score) for h in idx.search(image=p, mode="instance", k=len(idx))]
                   for p in photos[:3]}
    # local int8: the searcher holds the int8 rows (memory-mapped) and FAISS their codes
    idx.compress(None, None, field="local", quantize="int8")
    s = idx.local_searcher
    assert s.db.descriptors.dtype == np.int8
    assert s.db.descriptors.nbytes == idx.snapshot.field("local-compact").vectors.nbytes
    assert "ScalarQuantizer" in type(faiss.downcast_index(s.approx().index)).__name__
    for p in photos[:3]:
        assert {i for i, _ in _local_hits(idx, p, "local")[:2]} == {i for i, _ in before[p.name][:2]}
    # instance int8: `instance` mode scores the codes; undo gives the float16 answer back exactly
    info = idx.compress(None, None, field="instance", quantize="int8")
    assert info["quantize"] == "int8" and idx.snapshot.field("instance-compact").vectors.dtype == np.int8
    s = idx.local_searcher
    assert isinstance(s.instance, coded.CodedRows) and s.instance.rows.dtype == np.int8
    codec = storage.snapshot_codec(idx.snapshot, "instance")
    assert codec.scale is not None
    for p in photos[:3]:
        after = [(h.id, h.score) for h in idx.search(image=p, mode="instance", k=len(idx))]
        gq = s.query_features(p, None)[1]
        bound = float(np.abs(gq / np.linalg.norm(gq)) @ codec.scale / 2) + 1e-5
        # the scores move by at most the quantisation bound (scores compared per image)
        got, want = dict(after), dict(inst_before[p.name])
        assert set(got) == set(want)
        np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=bound)
        assert {i for i, _ in after[:2]} == {i for i, _ in inst_before[p.name][:2]}
    l2g = _local_hits(idx, photos[0], "l2g")  # the l2g fusion reads decoded instance rows
    assert len(l2g) == len(idx)
    assert idx.info()["local"]["bytes_per_image"] > 0
    with pytest.raises(ValueError, match="undo it first"):
        idx.refit_local()
    assert check_index(idx.path).as_dict()["ok"]
    assert idx.compress(None, None, field="instance", quantize="none") == {}
    for p in photos[:3]:  # the float16 rows again (float32 products: equal up to BLAS rounding)
        again = [(h.id, h.score) for h in idx.search(image=p, mode="instance", k=len(idx))]
        assert [i for i, _ in again] == [i for i, _ in inst_before[p.name]]
        np.testing.assert_allclose([v for _, v in again], [v for _, v in inst_before[p.name]], atol=1e-6)
    idx.compress(None, None, field="instance", quantize="int8", drop_originals=True)
    assert not idx.snapshot.has_field("instance") and "instance" in idx.available_modes()
    assert idx.search(image=photos[0], mode="instance", k=2)[0].id == inst_before[photos[0].name][0][0]
