"""PCA: the baseline every learned compressor is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA as _SklearnPCA

from .base import Projection

# scikit-learn >= 1.5 has the covariance solver; older versions fall back to the full SVD.
_HAS_COVARIANCE_EIGH = "covariance_eigh" in _SklearnPCA._parameter_constraints["svd_solver"][0].options


class PCA(Projection):
    """Principal component projection (scikit-learn's exact SVD underneath).

    Parameters
    ----------
    n_components : int
        Output dimension; at most the input dimension and the number of fitted samples.
    whiten : bool
        Divide each component by its standard deviation, so every output
        dimension has unit variance on the fitted data (what AE-SVC's variance
        constraint asks for, obtained linearly).
    normalize : bool
        L2-normalise output rows (finegrain scores by inner product).
    random_state : int or None
        Unused by the exact solver; kept so every projection takes the same arguments.

    Attributes
    ----------
    mean_ : ndarray of shape (input_dim,)
    components_ : ndarray of shape (n_components, input_dim)
    explained_variance_ : ndarray of shape (n_components,)
    input_dim_, n_components_ : int

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 16))
    >>> PCA(n_components=4).fit_transform(X).shape
    (100, 4)
    """

    method = "pca"

    def __init__(self, n_components: int = 128, whiten: bool = False, normalize: bool = True,
                 random_state: int | None = 0) -> None:
        self.n_components = n_components
        self.whiten = whiten
        self.normalize = normalize
        self.random_state = random_state

    def _fit(self, X: np.ndarray) -> None:
        if self.n_components > len(X):
            raise ValueError(f"PCA with n_components={self.n_components} needs at least that many samples, "
                             f"got {len(X)}")
        # float64: float32 loses the small components' directions. With many more rows than
        # columns the eigendecomposition of the covariance is exact and much faster than a full SVD.
        solver = "covariance_eigh" if len(X) >= 2 * X.shape[1] and _HAS_COVARIANCE_EIGH else "full"
        pca = _SklearnPCA(n_components=self.n_components, whiten=self.whiten,
                          svd_solver=solver).fit(X.astype(np.float64))
        self.mean_ = np.ascontiguousarray(pca.mean_, dtype=np.float32)
        self.components_ = np.ascontiguousarray(pca.components_, dtype=np.float32)
        self.explained_variance_ = np.ascontiguousarray(pca.explained_variance_, dtype=np.float32)
        self.n_components_ = int(pca.n_components_)

    def _project(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) @ self.components_.T
        if self.whiten:
            # Same floor as scikit-learn, so a zero-variance component does not divide by zero.
            Z /= np.sqrt(np.maximum(self.explained_variance_, np.finfo(np.float32).eps))
        return Z

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"mean": self.mean_, "components": self.components_, "explained_variance": self.explained_variance_}, {}

    def _set_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self.mean_ = arrays["mean"]
        self.components_ = arrays["components"]
        self.explained_variance_ = arrays["explained_variance"]
