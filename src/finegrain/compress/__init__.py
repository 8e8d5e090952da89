"""Compress embeddings to fewer dimensions for faster, smaller search.

Three scikit-learn estimators (they pass ``check_estimator``) with one
interface (``fit``, ``transform``, ``fit_transform``, ``save``, ``load``,
``n_components``, ``n_features_in_`` alias ``input_dim_``), learned from a
collection's embeddings without labels:

* :class:`PCA`   principal components, optionally whitened (the baseline);
* :class:`AESVC` an autoencoder whose latent is constrained to be decorrelated,
  unit-variance and centred (Omama et al., AE-SVC; ``loss="paper"`` for the
  paper's loss form and weights);
* :class:`SS2D`  one student whose leading d dimensions, for several nested d,
  reproduce a teacher's similarity distribution (Omama et al., (SS)2D).

``create_projection("aesvc", 128)`` builds one by name; ``load_projection(path)``
reads any saved one. :mod:`finegrain.compress.analysis` plots the similarity
distributions and per-dimension variances before and after a projection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .aesvc import AESVC
    from .base import Projection, load_projection
    from .pca import PCA
    from .ss2d import SS2D

__all__ = ["AESVC", "PCA", "SS2D", "METHODS", "Projection", "create_projection", "list_projections", "load_projection"]

# Imported on first use, so that opening an index (which imports finegrain.compress.indexing) does not
# load scikit-learn and the projection classes unless the index is compressed.
_LAZY = {"AESVC": ".aesvc", "PCA": ".pca", "SS2D": ".ss2d", "Projection": ".base", "load_projection": ".base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name == "METHODS":
        methods = _methods()
        globals()["METHODS"] = methods
        return methods
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _methods() -> dict[str, type]:
    """Method name (as stored in saved files) -> class."""
    from .aesvc import AESVC
    from .pca import PCA
    from .ss2d import SS2D

    return {cls.method: cls for cls in (PCA, AESVC, SS2D)}


def list_projections() -> dict[str, str]:
    """Registered method names and the first line of each class's docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in _methods().items()}


def create_projection(method: str, dim: int, **params: Any) -> Projection:
    """An unfitted projection of kind ``method`` with output dimension ``dim``.

    ``params`` go to the class's constructor; an unknown name raises
    ``TypeError`` there instead of vanishing.
    """
    methods = _methods()
    if method not in methods:
        raise KeyError(f"unknown projection {method!r}; available: {', '.join(methods)}")
    return methods[method](n_components=dim, **params)
