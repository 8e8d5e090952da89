"""finegrain.compress: PCA, AE-SVC and (SS)2D on synthetic embeddings (fast, no shared data)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.decomposition import PCA as SklearnPCA
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

from finegrain.compress import (
    AESVC,
    METHODS,
    PCA,
    SS2D,
    Projection,
    create_projection,
    list_projections,
    load_projection,
)
from finegrain.compress.analysis import plot_distributions, summarize
from fgcli import fg as fg_in_process  # noqa: E402  (tests/ is on sys.path)

DIM = 48


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models train fastest on one thread, and it leaves the other cores to parallel test runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # numpy/scipy BLAS as well
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    """600 embedding-like rows: 12 clusters in a 16-d subspace with a steep spectrum, plus noise, L2-normalised."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(DIM, 16)))[0] * np.geomspace(4.0, 0.3, 16)
    centers = rng.normal(size=(12, 16))
    labels = rng.integers(0, 12, size=600)
    latent = centers[labels] + 0.5 * rng.normal(size=(600, 16))
    x = latent @ basis.T + 0.05 * rng.normal(size=(600, DIM)) + 0.3  # an offset, as real embeddings have
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# The paper-like weights: strong constraints, which the checks below hold the latent to.
PAPER_WEIGHTS = dict(reconstruction_weight=25.0, covariance_weight=1.0, variance_weight=15.0, mean_weight=1.0)


def small_aesvc(**kw) -> AESVC:
    params = dict(n_components=8, hidden_sizes=(32,), n_steps=1500, batch_size=256, learning_rate=3e-3,
                  normalize=False, **PAPER_WEIGHTS)
    return AESVC(**{**params, **kw})


def small_ss2d(**kw) -> SS2D:
    params = dict(n_components=16, dims=(2, 4, 8), teacher=None, hidden_sizes=(), n_steps=200, batch_size=200)
    return SS2D(**{**params, **kw})


@pytest.fixture(scope="module")
def aesvc(X) -> AESVC:
    return small_aesvc().fit(X)


@pytest.fixture(scope="module")
def ss2d(X) -> SS2D:
    return small_ss2d().fit(X)


def covariance_errors(Z: np.ndarray) -> tuple[float, float, float]:
    """Largest |mean|, largest |variance - 1| and largest |off-diagonal covariance| over latent dimensions."""
    cov = np.cov(Z.T)
    return (float(np.abs(Z.mean(0)).max()), float(np.abs(np.diag(cov) - 1).max()),
            float(np.abs(cov - np.diag(np.diag(cov))).max()))


# ----------------------------------------------------------------- shapes and interface
@pytest.mark.parametrize("method", ["pca", "aesvc", "ss2d"])
def test_shapes_dtype_and_normalisation(X, method):
    kw = {"aesvc": dict(hidden_sizes=(), n_steps=20), "ss2d": dict(teacher=None, n_steps=20)}.get(method, {})
    p = create_projection(method, 8, **kw)
    Z = p.fit_transform(X)
    assert Z.shape == (len(X), 8) and Z.dtype == np.float32 and Z.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, atol=1e-5)
    assert p.input_dim_ == DIM and p.n_components_ == 8
    assert p.transform(X[:0]).shape == (0, 8)
    assert isinstance(p, Projection) and isinstance(clone(p), type(p))  # scikit-learn conventions: params in __init__ only


def test_registry():
    assert set(list_projections()) == {"pca", "aesvc", "ss2d"}
    assert isinstance(create_projection("aesvc", 32, variance_weight=3.0), AESVC)
    with pytest.raises(KeyError, match="unknown projection"):
        create_projection("umap", 8)
    with pytest.raises(TypeError):
        create_projection("pca", 8, whitten=True)  # a typo is an error, not ignored


def test_pca_matches_sklearn(X):
    for whiten in (False, True):
        ours = PCA(8, whiten=whiten, normalize=False).fit(X)
        ref = SklearnPCA(8, whiten=whiten, svd_solver="full").fit(X.astype(np.float64))
        np.testing.assert_allclose(ours.transform(X), ref.transform(X.astype(np.float64)), atol=1e-4)


# ----------------------------------------------------------------------- AE-SVC constraints
def test_aesvc_latent_satisfies_constraints(X, aesvc):
    mean_err, var_err, cov_err = covariance_errors(aesvc.transform(X))
    assert mean_err < 0.05 and var_err < 0.1 and cov_err < 0.1, (mean_err, var_err, cov_err)
    assert set(aesvc.losses_) == {"reconstruction", "covariance", "variance", "mean"}


@pytest.mark.parametrize("dropped, check", [("mean_weight", 0), ("variance_weight", 1), ("covariance_weight", 2)])
def test_aesvc_constraint_checks_fail_without_their_loss_term(X, dropped, check):
    # The tolerances above are not vacuous: without its term, each property is lost.
    errors = covariance_errors(small_aesvc(**{dropped: 0.0}).fit(X).transform(X))
    assert errors[check] > [0.05, 0.1, 0.1][check], errors


def test_constraint_losses_by_hand():
    from finegrain.compress.aesvc import constraint_losses

    # z has mean (1, 1) and unbiased covariance [[4, -1], [-1, 1]]:
    # off-diagonal squares 1 + 1 = 2, variance errors (4-1)^2 + (1-1)^2 = 9, squared means 1 + 1 = 2.
    z = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [3.0, 1.0]])
    paper = {k: float(v) for k, v in constraint_losses(z, "paper").items()}
    assert paper == pytest.approx({"covariance": 2.0, "variance": 9.0, "mean": 2.0})
    finegrain = {k: float(v) for k, v in constraint_losses(z).items()}  # the same sums over k = 2 dimensions
    assert finegrain == pytest.approx({"covariance": 1.0, "variance": 4.5, "mean": 1.0})
    with pytest.raises(ValueError, match="loss must be one of"):
        constraint_losses(z, "vicreg")


def test_aesvc_paper_loss_weights_and_terms(X, tmp_path):
    from finegrain.compress.aesvc import LOSS_WEIGHTS, constraint_losses

    assert LOSS_WEIGHTS["paper"] == {"reconstruction": 25.0, "covariance": 1.0, "variance": 15.0, "mean": 1.0}
    assert LOSS_WEIGHTS["finegrain"] == {"reconstruction": 25.0, "covariance": 0.1, "variance": 0.1, "mean": 1.0}
    p = AESVC(n_components=8, hidden_sizes=(), n_steps=20, normalize=False, loss="paper").fit(X)
    assert p.loss_weights_ == LOSS_WEIGHTS["paper"]
    # losses_ are the paper's sums over the fitted data's latent (standardised as in training).
    z = torch.from_numpy(p.transform(X) * 1.0)
    expected = {k: float(v) for k, v in constraint_losses(z, "paper").items()}
    assert {k: p.losses_[k] for k in expected} == pytest.approx(expected, rel=1e-4)
    assert AESVC(8, loss="finegrain", variance_weight=3.0, n_steps=5).fit(X).loss_weights_["variance"] == 3.0
    assert AESVC(n_components=8, n_steps=5).fit(X).loss_weights_ == LOSS_WEIGHTS["finegrain"]
    q = load_projection(p.save(tmp_path / "paper.safetensors"))
    assert q.loss == "paper" and q.loss_weights_ == p.loss_weights_
    np.testing.assert_array_equal(q.transform(X), p.transform(X))
    with pytest.raises(ValueError, match="loss must be one of"):
        AESVC(n_components=8, loss="vicreg").fit(X)


def test_aesvc_paper_loss_holds_the_constraints_tighter(X):
    # The sum form with 25/1/15/1 weighs the constraints k x 10 (covariance) and k x 150 (variance) more.
    errors = {loss: covariance_errors(small_aesvc(loss=loss, n_steps=300, reconstruction_weight=None,
                                                  covariance_weight=None, variance_weight=None,
                                                  mean_weight=None).fit(X).transform(X))
              for loss in ("finegrain", "paper")}
    assert errors["paper"][1] < errors["finegrain"][1] and errors["paper"][2] < errors["finegrain"][2], errors


def test_aesvc_is_deterministic(X):
    first, again = small_aesvc(n_steps=100).fit(X), small_aesvc(n_steps=100).fit(X)
    np.testing.assert_array_equal(again.transform(X), first.transform(X))
    other = small_aesvc(n_steps=100, random_state=1).fit(X)
    assert not np.array_equal(other.transform(X), first.transform(X))


def test_aesvc_auto_steps_scale_with_the_data(X, tmp_path):
    from finegrain.compress.aesvc import AUTO_EPOCHS, AUTO_MAX_STEPS, AUTO_MIN_STEPS, auto_steps

    assert auto_steps(7238, 256) == int(np.ceil(AUTO_EPOCHS * 7238 / 256))  # 50 epochs of a large collection
    assert auto_steps(300, 256) == AUTO_MIN_STEPS and auto_steps(10**7, 256) == AUTO_MAX_STEPS
    p = small_aesvc(n_steps="auto", hidden_sizes=()).fit(X)
    assert p.n_steps_ == auto_steps(len(X), p.batch_size)
    assert load_projection(p.save(tmp_path / "a.safetensors")).n_steps_ == p.n_steps_
    with pytest.raises(ValueError, match="n_steps"):
        small_aesvc(n_steps="many").fit(X)


def test_aesvc_leaves_global_torch_rng_alone(X):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    small_aesvc(n_steps=5).fit(X)
    assert torch.equal(torch.rand(3), expected)


def test_aesvc_tiny_input_warns_and_still_fits(X):
    with pytest.warns(RuntimeWarning, match="cannot give 8 decorrelated"):
        p = small_aesvc(n_steps=10).fit(X[:5])
    assert p.transform(X[:3]).shape == (3, 8)


def test_loss_weights_are_validated(X):
    with pytest.raises(ValueError, match="variance_weight"):
        small_aesvc(variance_weight=-1).fit(X)
    with pytest.raises(ValueError, match="at least one"):
        small_aesvc(reconstruction_weight=0, covariance_weight=0, variance_weight=0, mean_weight=0).fit(X)


@pytest.mark.parametrize("make", ["aesvc", "ss2d"])
@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"batch_size": 1}, {"batch_size": -5}, {"batch_size": 2.5},
                                 {"batch_size": True}, {"learning_rate": 0.0}, {"learning_rate": float("nan")},
                                 {"n_steps": 0}])
def test_training_schedule_is_validated(X, make, bad):
    """A batch of 0 or 1 rows used to fit silently (on NaN covariances, or no data at all)."""
    name = next(iter(bad))
    params = {"n_steps": 5, **bad}
    projection = small_aesvc(**params) if make == "aesvc" else SS2D(8, teacher=None, **params)
    with pytest.raises(ValueError, match=name):
        projection.fit(X)


# ------------------------------------------------------------------------------- (SS)2D
def neighbour_recall(Z: np.ndarray, T: np.ndarray, k: int = 50) -> float:
    """Mean fraction of each row's k nearest neighbours under teacher rows T also found under Z (cosine)."""
    def knn(A):
        A = A / np.linalg.norm(A, axis=1, keepdims=True)
        s = A @ A.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    a, b = knn(Z), knn(T)
    return float(np.mean([len(set(r) & set(t)) / k for r, t in zip(a, b)]))


def test_ss2d_leading_dims_keep_teacher_neighbours(X, ss2d):
    teacher = X - X.mean(0)  # teacher=None distils the input's own (centred) cosine space
    rng = np.random.default_rng(0)
    for d in (4, 8):
        ours = neighbour_recall(ss2d.transform(X, dim=d), teacher)
        # Random truncation: the first d dimensions of a random rotation of the teacher.
        rotation = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
        random = neighbour_recall(teacher @ rotation[:, :d], teacher)
        assert ours > random + 0.1, (d, ours, random)


def test_ss2d_nested_training_beats_truncating_a_single_size_student(X, ss2d):
    teacher = X - X.mean(0)
    single = small_ss2d(dims=(16,)).fit(X)
    assert single.dims_ == (16,)
    for d in (4, 8):
        ours = neighbour_recall(ss2d.transform(X, dim=d), teacher)
        truncated = neighbour_recall(single.transform(X, dim=d), teacher)
        assert ours > truncated + 0.05, (d, ours, truncated)


def test_ss2d_dims_and_any_size(X, ss2d):
    assert ss2d.dims_ == (2, 4, 8, 16) and ss2d.n_components_ == 16
    assert SS2D(n_components=100)._check_dims() == (16, 32, 64, 100)
    full = ss2d.transform(X[:4])
    for d in (1, 3, 8, 16):
        Z = ss2d.transform(X[:4], dim=d)
        assert Z.shape == (4, d)
        # Leading dimensions of the one full output, renormalised: no retraining per size.
        np.testing.assert_allclose(Z, full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True), atol=1e-5)
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match="dim must be"):
            ss2d.transform(X[:4], dim=bad)
    with pytest.raises(ValueError, match="dims must be"):
        small_ss2d(dims=(4, 32)).fit(X)


def test_ss2d_teachers(X, monkeypatch):
    T = PCA(8, whiten=True).fit_transform(X)
    given = small_ss2d(n_components=8, dims=(4,), n_steps=20).fit(X, teacher_embeddings=T)
    assert given.transform(X).shape == (len(X), 8)
    with pytest.raises(ValueError, match="rows"):
        small_ss2d(n_steps=5).fit(X, teacher_embeddings=T[:10])
    unfitted = PCA(8)
    fitted = small_ss2d(n_components=8, dims=(4,), n_steps=20, teacher=unfitted).fit(X)
    assert fitted.teacher_.input_dim_ == DIM and not hasattr(unfitted, "input_dim_")  # a copy was fitted
    # teacher="aesvc" builds the teacher through the registry; a short-trained one keeps the test fast.
    monkeypatch.setitem(METHODS, "aesvc", lambda n_components, **kw: small_aesvc(n_components=n_components, n_steps=5, **kw))
    default = small_ss2d(n_components=8, dims=(4,), n_steps=5, teacher="aesvc").fit(X)
    assert isinstance(default.teacher_, AESVC) and default.teacher_.n_components_ == 8
    with pytest.raises(ValueError, match="own teacher"):
        small_ss2d(teacher="ss2d", n_steps=5).fit(X)


# ---------------------------------------------------------------------------- save / load
def read_safetensors_header(path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])


@pytest.mark.parametrize("make", [lambda: PCA(8, whiten=True), lambda: small_aesvc(n_steps=100),
                                  lambda: small_ss2d(n_steps=50)])
def test_save_load_round_trip(X, tmp_path, make):
    p = make().fit(X)
    path = p.save(tmp_path / "proj.safetensors")
    assert [f.name for f in tmp_path.iterdir()] == ["proj.safetensors"]  # one file, no sidecar, no temp left
    header = read_safetensors_header(path)  # a plain safetensors file: JSON header + raw tensors, no pickle
    meta = header["__metadata__"]
    assert meta["format"] == "finegrain.compress/1" and meta["method"] == p.method
    assert json.loads(meta["params"])["n_components"] == p.n_components
    q = load_projection(path)
    assert type(q) is type(p) and q.get_params() == p.get_params()
    assert (q.input_dim_, q.n_components_) == (p.input_dim_, p.n_components_)
    np.testing.assert_array_equal(q.transform(X), p.transform(X))
    assert type(p).load(path).n_components_ == p.n_components_


def test_load_errors(X, tmp_path):
    path = PCA(4).fit(X).save(tmp_path / "pca.safetensors")
    with pytest.raises(ValueError, match="holds a 'pca' projection"):
        AESVC.load(path)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a finegrain projection"):
        load_projection(tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", [PCA, AESVC, SS2D])
def test_input_errors(X, cls):
    p = cls(n_components=4)
    with pytest.raises(NotFittedError, match="not fitted"):
        p.transform(X)
    with pytest.raises(NotFittedError):
        p.save("never-written.safetensors")
    with pytest.raises(ValueError, match="larger than the input dimension"):
        cls(n_components=DIM + 1).fit(X)
    with pytest.raises(ValueError, match="1 sample.* minimum of 2 is required"):
        p.fit(X[:1])
    with pytest.raises(ValueError, match="Expected 2D array, got 1D"):
        p.fit(X[0])
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        p.fit(bad)
    with pytest.raises(ValueError, match="positive integer"):
        cls(n_components=0).fit(X)


def test_wrong_input_dim_after_fit(X):
    p = PCA(4).fit(X)
    with pytest.raises(ValueError, match=f"X has 10 features, but PCA is expecting {DIM} features"):
        p.transform(X[:, :10])


# Small training through the constructor parameters, so scikit-learn's full suite runs in seconds.
@pytest.mark.parametrize("estimator", [
    PCA(n_components=1),
    AESVC(n_components=1, hidden_sizes=(8,), n_steps=5),
    SS2D(n_components=1, hidden_sizes=(8,), n_steps=5, teacher=None),
    SS2D(n_components=1, hidden_sizes=(), n_steps=5, teacher=AESVC(n_components=1, hidden_sizes=(), n_steps=5)),
], ids=["pca", "aesvc", "ss2d", "ss2d-aesvc-teacher"])
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")  # array-API checks need SCIPY_ARRAY_API
def test_sklearn_check_estimator(estimator):
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(estimator, on_fail=None)
    failed = [f"{r['check_name']}: {r['exception']}" for r in results if r["status"] == "failed"]
    assert not failed, failed
    assert len([r for r in results if r["status"] == "passed"]) >= 40  # the suite really ran


def test_sklearn_conventions_spot_checks(X):
    p = PCA(4)
    assert not hasattr(p, "n_features_in_") and not hasattr(p, "input_dim_")
    p.fit(X.astype(np.float64))
    assert p.n_features_in_ == p.input_dim_ == DIM
    assert p.transform(X.astype(np.float64)).dtype == np.float32  # float32 out, as the tags declare
    assert p.__sklearn_tags__().transformer_tags.preserves_dtype == ["float32"]
    import scipy.sparse

    with pytest.raises(TypeError, match="Sparse data was passed"):
        p.transform(scipy.sparse.csr_matrix(X))
    with pytest.raises(ValueError, match=r"0 feature\(s\)"):
        PCA(1).fit(X[:, :0])
    # A failed refit leaves the estimator unfitted, not with the old arrays and a new input size.
    with pytest.raises(ValueError, match="larger than the input dimension"):
        p.set_params(n_components=20).fit(X[:, :10])
    with pytest.raises(NotFittedError, match="not fitted"):
        p.transform(X)
    assert clone(p.set_params(n_components=3)).get_params() == p.get_params()


def test_pca_needs_enough_samples(X):
    with pytest.raises(ValueError, match="needs at least that many samples"):
        PCA(8).fit(X[:5])


# ------------------------------------------------------------------------------ analysis
def test_analysis_writes_figures_and_summaries(X, aesvc, tmp_path):
    report = plot_distributions(X, {"pca": PCA(8).fit(X), "aesvc": aesvc}, tmp_path, max_samples=300)
    for png in (report.similarity_png, report.variance_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(report.summary) == ["input", "pca", "aesvc"]
    pca, ae = report.summary["pca"], report.summary["aesvc"]
    # The unit-variance constraint spreads variance over the dimensions; PCA concentrates it.
    assert ae.effective_dims > pca.effective_dims and ae.variance_top_share < pca.variance_top_share
    assert ae.similarity_std < pca.similarity_std
    flat = summarize(np.random.default_rng(0).normal(size=(500, 8)))
    assert 7.5 < flat.effective_dims <= 8 and abs(flat.similarity_mean) < 0.02


# ------------------------------------------------------------------ index integration
# A real index (the bundled encoder on the 24 tiny-Flickr crops of six photos); small training runs.
FAST = {"pca": {}, "aesvc": {"n_steps": 60, "hidden_sizes": (64,)},
        "ss2d": {"n_steps": 60, "hidden_sizes": (64,), "dims": (4, 8), "teacher": None}}


@pytest.fixture()
def small_index(tmp_path, tiny_flickr):
    import shutil

    from finegrain import Index

    folder = tmp_path / "images"
    shutil.copytree(tiny_flickr / "images", folder)
    extra = tmp_path / "later"
    extra.mkdir()
    for name in ("chelsea_3.jpg", "rocket_3.jpg"):  # added after compression
        (folder / name).rename(extra / name)
    index = Index.create(tmp_path / "index")
    index.add([folder])
    return index, folder, extra


def _top1(index, path, **kw) -> str:
    from pathlib import Path

    return Path(index.search(image=path, k=1, **kw)[0].path).name


@pytest.mark.parametrize("method,dim", [("pca", 8), ("aesvc", 8), ("ss2d", 16)])
def test_compress_index_query_reopen_and_add(small_index, method, dim):
    from finegrain import Index
    from finegrain.compress.indexing import FIELD, PROJECTION_DIR

    index, folder, extra = small_index
    n = len(index)
    info = index.compress(method, dim, **FAST[method])
    assert info["method"] == method and info["dim"] == dim and info["input_dim"] == 512 and info["fitted_on"] == n
    full = index.info()
    assert full["projection"] == info and full["bytes_per_image"] == 4 * dim and full["dim"] == 512
    assert index.search_rows.vectors.shape == (n, dim) and index.global_rows.vectors.shape == (n, 512)  # originals kept
    files = list((index.path / PROJECTION_DIR).iterdir())
    assert [f.name for f in files] == [info["file"]] and files[0].suffix == ".safetensors"
    # An indexed image as the query finds itself first, through the projection; text queries work too.
    for name in ("astronaut_0.jpg", "coins_2.jpg", "coffee_1.jpg"):
        assert _top1(index, folder / name) == name
    assert len(index.search(text="a cat", k=3)) == 3
    scores, ids = index.search_vectors(index.embed_query(text="a cat")[None], k=n + 5)
    assert (ids[0, :n] >= 0).all() and (ids[0, n:] == -1).all()

    reopened = Index.open(index.path)
    assert reopened.info()["projection"] == info
    q = index.embed_query(image=folder / "coins_2.jpg")
    np.testing.assert_allclose(reopened.search_vectors(q[None], 5)[0], index.search_vectors(q[None], 5)[0], atol=1e-5)

    # Images added later get a projected row in the same commit and are found.
    report = reopened.add([extra])
    assert report.indexed == 2 and len(reopened) == n + 2
    assert len(reopened.fields[FIELD]) == n + 2 and reopened.search_rows.vectors.shape == (n + 2, dim)
    for name in ("chelsea_3.jpg", "rocket_3.jpg"):
        assert _top1(reopened, extra / name) == name
    # Removal and compaction keep the two fields in step.
    reopened.remove([reopened.search(image=extra / "rocket_3.jpg", k=1)[0].id])
    reopened.compact()
    again = Index.open(index.path)
    assert len(again) == n + 1 and again.search_rows.vectors.shape == (n + 1, dim)
    assert _top1(again, extra / "chelsea_3.jpg") == "chelsea_3.jpg"


def test_compress_rerun_other_method_and_none(small_index):
    from finegrain.compress.indexing import FIELD, PROJECTION_DIR

    index, folder, _ = small_index
    q = index.embed_query(image=folder / "camera_1.jpg")[None]
    before = index.search_vectors(q, 10)
    index.compress("pca", 8)
    first = index.info()["projection"]["file"]
    index.compress("aesvc", 12, **FAST["aesvc"])
    assert index.info()["projection"]["method"] == "aesvc" and index.info()["bytes_per_image"] == 48
    assert [f.name for f in (index.path / PROJECTION_DIR).iterdir()] == [index.info()["projection"]["file"]] != [first]
    assert len(index.catalog.chunks(FIELD)) == 1  # the old projected chunk is gone
    index.compress("none")
    assert index.info()["projection"] is None and index.info()["bytes_per_image"] == 2048
    assert not index.catalog.chunks(FIELD) and not list((index.path / PROJECTION_DIR).iterdir())
    after = index.search_vectors(q, 10)
    np.testing.assert_array_equal(after[1], before[1])  # back on the original vectors, exactly


def test_ss2d_index_nested_dims(small_index):
    index, folder, _ = small_index
    info = index.compress("ss2d", 16, **FAST["ss2d"])
    assert info["dims"] == [4, 8, 16] and info["teacher"] == "input"
    assert _top1(index, folder / "astronaut_0.jpg", dim=8) == "astronaut_0.jpg"
    q = index.embed_query(image=folder / "coins_2.jpg")[None]
    scores8, _ = index.search_vectors(q, 3, dim=8)
    manual = index.projection.transform(q, dim=8) @ index.projection.transform(
        np.asarray(index.global_rows.vectors), dim=8).T
    np.testing.assert_allclose(scores8[0], np.sort(manual[0])[::-1][:3], atol=1e-5)
    assert index.search(text="a cat", k=2, dim=4)
    np.testing.assert_allclose(index.search_vectors(q, 3, dim=16)[0], index.search_vectors(q, 3)[0])
    for bad in (0, 17, 600):
        with pytest.raises(ValueError, match="dim must be from 1 to 16"):
            index.search(image=folder / "coins_2.jpg", dim=bad)
    with pytest.raises(ValueError, match="needs an index built with segments"):
        index.search(text="a cat", mode="single", dim=8)


def test_dim_on_non_ss2d_and_bad_compress_input(small_index):
    index, folder, _ = small_index
    with pytest.raises(ValueError, match="not compressed"):
        index.search(text="a cat", dim=8)
    with pytest.raises(ValueError, match="unknown compression method 'zip'"):
        index.compress("zip", 8)
    with pytest.raises(ValueError, match="larger than the index's 512-dim"):
        index.compress("pca", 1024)
    with pytest.raises(ValueError, match="positive integer"):
        index.compress("aesvc", None)
    with pytest.raises(TypeError):
        index.compress("aesvc", 8, n_stepz=5)  # a typo is an error, not silently ignored
    assert index.info()["projection"] is None  # failed attempts changed nothing
    index.compress("pca", 8)
    with pytest.raises(ValueError, match="compressed with pca to 8 dims"):
        index.search(text="a cat", dim=4)
    with pytest.raises(ValueError, match="query dimension 8 does not match"):
        index.search_vectors(np.ones((1, 8), np.float32), 3)


def test_killed_compress_leaves_index_consistent(small_index, monkeypatch):
    from finegrain import Index
    from finegrain.store import writer as writer_module
    from finegrain.compress.indexing import FIELD, PROJECTION_DIR

    index, folder, extra = small_index
    index.compress("pca", 8)
    good = index.info()["projection"]

    class Killed(BaseException):
        pass

    real = writer_module.write_chunk

    def write_then_die(*args, **kw):  # the new files are complete, the catalog is not switched yet
        real(*args, **kw)
        raise Killed()

    monkeypatch.setattr(writer_module, "write_chunk", write_then_die)
    with pytest.raises(Killed):
        index.compress("aesvc", 12, **FAST["aesvc"])
    monkeypatch.undo()
    assert len(list((index.path / PROJECTION_DIR).iterdir())) == 2  # the orphan projection file is there

    reopened = Index.open(index.path)
    assert reopened.info()["projection"] == good and reopened.info()["bytes_per_image"] == 32
    assert _top1(reopened, folder / "coffee_1.jpg") == "coffee_1.jpg"
    reopened.add([extra])  # the next writer sweeps the orphans and keeps going with the committed projection
    assert [f.name for f in (index.path / PROJECTION_DIR).iterdir()] == [good["file"]]
    assert len(reopened.catalog.chunks(FIELD)) == 2 and reopened.search_rows.vectors.shape == (len(reopened), 8)
    assert _top1(reopened, extra / "rocket_3.jpg") == "rocket_3.jpg"


def test_cli_compress_search_dim_info(small_index):
    index, folder, _ = small_index
    path = index.path
    index.close()

    fg = fg_in_process  # the same command-line code without an interpreter start

    proc = fg("compress", "--index", path, "--method", "ss2d", "--dim", 16, "--steps", 40, "--batch-size", 16,
              "--teacher", "input", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["projection"]["method"] == "ss2d" and out["bytes_per_image"] == 64
    assert out["projection"]["batch_size"] == 16 and out["projection"]["n_steps"] == 40
    proc = fg("compress", "--index", path, "--method", "aesvc", "--dim", 8, "--batch-size", 1)
    assert proc.returncode == 2 and "batch_size must be an integer >= 2" in proc.stderr
    assert out["projection"]["teacher"] == "input"
    proc = fg("search", "--index", path, "--image", folder / "coins_2.jpg", "-k", 1, "--dim", 8, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["path"].endswith("coins_2.jpg")
    info = json.loads(fg("info", "--index", path, "--json").stdout)
    assert info["projection"]["dims"][-1] == 16 and info["bytes_per_image"] == 64
    table = fg("info", "--index", path).stdout  # nested values as "key value" lines, not a Python repr
    assert "{'" not in table and "method ss2d" in table and "teacher input" in table and "batch_size 16" in table
    proc = fg("search", "--index", path, "--text", "a cat", "--dim", 99)
    assert proc.returncode == 2 and "dim must be from 1 to 16" in proc.stderr
    proc = fg("compress", "--index", path, "--method", "zip", "--dim", 8)
    assert proc.returncode == 2 and "unknown compression method" in proc.stderr
    proc = fg("compress", "--index", path, "--method", "pca", "--dim", 4096)
    assert proc.returncode == 2 and "larger than" in proc.stderr
    proc = fg("compress", "--index", path, "--method", "pca")
    assert proc.returncode == 2 and "--dim is required" in proc.stderr


# ------------------------------------------------------------------ bench compress
def test_class_map_scores_rankings():
    from finegrain.bench.compress import class_map

    labels = ["a", "a", "b", "b"]
    perfect = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]], np.float32)  # last row: a distractor
    assert class_map(perfect, labels) == pytest.approx(100.0)
    mixed = perfect[[0, 2, 1, 3, 4]]  # each image's nearest neighbour now has the other label
    assert class_map(mixed, labels) < 60


def test_bench_fit_projections_aesvc_paper(X):
    from finegrain.bench.compress import fit_projections

    fitted = fit_projections("aesvc-paper", [4], X, n_steps=5, hidden_sizes=())
    p, transform = fitted[4]
    assert isinstance(p, AESVC) and p.loss == "paper" and p.loss_weights_["variance"] == 15.0
    assert transform(X).shape == (len(X), 4)
    assert fit_projections("aesvc", [4], X, n_steps=5, hidden_sizes=())[4][0].loss == "finegrain"


def test_bench_compress_on_tiny_set(tmp_path, photos_dir):
    from photo_crop_helpers import revisitop_folder

    from finegrain.bench.compress import run_compress_bench

    root = revisitop_folder(tmp_path / "tiny", photos_dir, crops=3)
    report = run_compress_bench(root, methods=["pca", "aesvc", "ss2d"], dims=[4, 8], cache_dir=tmp_path / "cache",
                                plots=tmp_path / "plots", ss2d_teacher="input", show_progress=False)
    rows = report["results"]
    assert list(report)[-1] == "results" and report["database"] == 18 and report["fitted_on"] == 18
    assert [(r["method"], r["dim"]) for r in rows] == [("none", 512), ("pca", 4), ("pca", 8), ("aesvc", 4), ("aesvc", 8),
                                                       ("ss2d", 4), ("ss2d", 8)]
    for r in rows:
        assert 0 <= r["map_medium"] <= 100 and 0 <= r["class_map"] <= 100 and r["bytes_per_image"] == 4 * r["dim"]
    # Crops of the same photo among 18 images: any ranking or projection bug would sink these.
    assert rows[0]["class_map"] > 80 and rows[2]["class_map"] > 80
    assert (tmp_path / "plots" / "compress-8-similarity.png").stat().st_size > 0
    assert (tmp_path / "plots" / "compress-8-variance.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown method"):
        run_compress_bench(root, methods=["zip"], cache_dir=tmp_path / "cache", show_progress=False)
    with pytest.raises(ValueError, match="larger than the 512-dim"):
        run_compress_bench(root, methods=["pca"], dims=[1024], cache_dir=tmp_path / "cache", show_progress=False)
