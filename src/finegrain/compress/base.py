"""The shared shape of every compressor: a scikit-learn transformer saved as one safetensors file.

A projection maps (n, ``input_dim_``) embedding rows to (n, ``n_components_``)
float32 rows. It learns from a collection's embeddings alone (no labels) in
``fit`` and is applied to database and query embeddings alike in
``transform``. Rows come out L2-normalised by default, because finegrain
scores by inner product and a projection changes row norms.

On disk a projection is a single ``.safetensors`` file: the learned arrays as
tensors, and in the header metadata the method name, the constructor
parameters and small fitted values as JSON. Nothing is pickled, so loading a
file cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import Tags
from sklearn.utils.validation import check_is_fitted, validate_data

FORMAT = "finegrain.compress/1"


class Projection(TransformerMixin, BaseEstimator):
    """Base class of :class:`PCA`, :class:`AESVC` and :class:`SS2D`.

    Subclasses set :attr:`method`, take ``n_components``, ``normalize`` and
    ``random_state`` among their ``__init__`` parameters, and implement
    :meth:`_fit`, :meth:`_project`, :meth:`_get_state` and :meth:`_set_state`.

    Input is validated by scikit-learn's own ``validate_data``, so the
    estimators pass ``sklearn.utils.estimator_checks.check_estimator``: its
    messages for sparse, empty, 1-sample and 1-d input, ``n_features_in_``,
    and the fitted-state check. Output is always float32 (what FAISS takes),
    whatever the input dtype; the tags say so (``preserves_dtype=["float32"]``).

    Attributes
    ----------
    n_features_in_ : int
        Dimension of the rows seen in ``fit``; ``transform`` checks it.
    input_dim_ : int
        The same as ``n_features_in_`` (the name used in saved files and by the index).
    n_components_ : int
        Dimension of the rows ``transform`` returns.
    """

    #: Name stored in saved files and used by :func:`~finegrain.compress.create_projection`.
    method: ClassVar[str] = ""

    n_components: int
    normalize: bool

    # ------------------------------------------------------------ public API
    def fit(self, X: np.ndarray, y: Any = None) -> Projection:
        """Learn the projection from the rows of ``X`` (n_samples, input_dim); ``y`` is ignored."""
        return self._fit_validated(X)

    @property
    def input_dim_(self) -> int:
        """``n_features_in_`` under the name saved files and the index use (AttributeError until fitted)."""
        return int(self.n_features_in_)

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        # float32 in, float32 out; float64 input is converted, as FAISS and the index want float32.
        if tags.transformer_tags is not None:  # always set by TransformerMixin; the check is for mypy
            tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project rows of ``X`` to (n, ``n_components_``) C-contiguous float32, L2-normalised if ``normalize``."""
        X = self._check_transform_input(X)
        return self._finish(self._project(X))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted projection to ``path`` (one safetensors file); returns the path."""
        self._check_fitted()
        arrays, info = self._get_state()
        info = {"input_dim_": self.input_dim_, "n_components_": self.n_components_, **info}
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "params": json.dumps(self._saved_params()),
            "fitted": json.dumps(info),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash never leaves a half-written file under the real name.
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Projection:
        """Read a projection written by :meth:`save`; on a subclass, the file must hold that method."""
        projection = load_projection(path)
        if not isinstance(projection, cls):
            raise ValueError(f"{path} holds a {projection.method!r} projection, not {cls.method!r}")
        return projection

    # ----------------------------------------------------------------- hooks
    def _fit(self, X: np.ndarray) -> None:
        """Learn from validated float32 ``X``; must set ``n_components_`` and the learned arrays."""
        raise NotImplementedError

    def _project(self, X: np.ndarray) -> np.ndarray:
        """Validated float32 ``X`` -> raw (unnormalised) output rows."""
        raise NotImplementedError

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Learned arrays (saved as tensors) and JSON-able fitted values (saved in the header)."""
        raise NotImplementedError

    def _set_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        """Inverse of :meth:`_get_state` on a freshly constructed instance."""
        raise NotImplementedError

    def _saved_params(self) -> dict[str, Any]:
        """Constructor parameters as stored in the file (JSON-able)."""
        return self.get_params(deep=False)

    # --------------------------------------------------------------- helpers
    def _fit_validated(self, X: Any, *args: Any) -> Projection:
        """Validate ``X`` (setting ``n_features_in_``) and call ``_fit(X, *args)``; a failed fit leaves it unfitted."""
        try:
            X = self._check_fit_input(X)
            self._fit(X, *args)
        except BaseException:
            for name in [v for v in vars(self) if v.endswith("_") and not v.startswith("_")]:
                delattr(self, name)  # no half-fitted state (old arrays with a new n_features_in_)
            raise
        return self

    def _check_fit_input(self, X: Any) -> np.ndarray:
        # scikit-learn's own validation: its messages for sparse, complex, empty, 1-d and 1-sample input.
        X = validate_data(self, X, reset=True, dtype=np.float32, order="C", ensure_min_samples=2)
        dim = X.shape[1]
        k = self.n_components
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"n_components must be a positive integer, got {k!r}")
        if k > dim:
            raise ValueError(f"n_components={k} is larger than the input dimension {dim}")
        return X

    def _check_fitted(self) -> None:
        check_is_fitted(self, "n_components_",
                        msg="this %(name)s is not fitted yet; call fit(X) or load a saved one")

    def _check_transform_input(self, X: Any) -> np.ndarray:
        self._check_fitted()
        # Zero rows are fine at transform time (an empty batch of queries gives an empty result).
        return validate_data(self, X, reset=False, dtype=np.float32, order="C", ensure_min_samples=0)

    def _finish(self, Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=np.float32)
        if self.normalize:
            Z = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(Z, dtype=np.float32)


def _as_matrix(X: Any, allow_empty: bool = False) -> np.ndarray:
    """Validate ``X`` as a finite 2-D float array and return it as C-contiguous float32."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array (n_samples, dim), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise ValueError(f"expected real numbers, got dtype {X.dtype}")
    if X.shape[1] == 0 or (X.shape[0] == 0 and not allow_empty):
        raise ValueError(f"expected a non-empty array, got shape {X.shape}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    return X


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a saved projection, checked to be finegrain's format."""
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a finegrain projection file (format {metadata.get('format')!r})")
    return metadata


def load_projection(path: str | os.PathLike) -> Projection:
    """Read any saved projection, choosing the class by the method name stored in the file."""
    from . import METHODS as _registry  # the registry lives in the package, beside the classes it names

    METHODS: dict[str, type[Projection]] = _registry

    metadata = read_header(path)
    method = metadata["method"]
    if method not in METHODS:
        raise ValueError(f"{path} holds an unknown projection method {method!r}; known: {', '.join(METHODS)}")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(metadata["params"]).items()}
    projection = METHODS[method](**params)
    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: np.array(f.get_tensor(k)) for k in f.keys()}  # fresh, aligned copies
    info = json.loads(metadata["fitted"])
    projection.n_features_in_ = int(info.pop("input_dim_"))
    projection.n_components_ = int(info.pop("n_components_"))
    projection._set_state(arrays, info)
    return projection
