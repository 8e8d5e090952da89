"""Compress embeddings to fewer dimensions for faster, smaller search.

Three scikit-learn-style projections with one interface (``fit``,
``transform``, ``fit_transform``, ``save``, ``load``, ``n_components``,
``input_dim_``), learned from a collection's embeddings without labels:

* :class:`PCA`   principal components, optionally whitened (the baseline);
* :class:`AESVC` an autoencoder whose latent is constrained to be decorrelated,
  unit-variance and centred (Omama et al., AE-SVC);
* :class:`SS2D`  one student whose leading d dimensions, for several nested d,
  reproduce a teacher's similarity distribution (Omama et al., (SS)2D).

``create_projection("aesvc", 128)`` builds one by name; ``load_projection(path)``
reads any saved one. :mod:`finegrain.compress.analysis` plots the similarity
distributions and per-dimension variances before and after a projection.
"""

from __future__ import annotations

from typing import Any

from .aesvc import AESVC
from .base import Projection, load_projection
from .pca import PCA
from .ss2d import SS2D

__all__ = ["AESVC", "PCA", "SS2D", "METHODS", "Projection", "create_projection", "list_projections", "load_projection"]

#: Method name (as stored in saved files) -> class.
METHODS: dict[str, type[Projection]] = {cls.method: cls for cls in (PCA, AESVC, SS2D)}


def list_projections() -> dict[str, str]:
    """Registered method names and the first line of each class's docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in METHODS.items()}


def create_projection(method: str, dim: int, **params: Any) -> Projection:
    """An unfitted projection of kind ``method`` with output dimension ``dim``.

    ``params`` go to the class's constructor; an unknown name raises
    ``TypeError`` there instead of vanishing.
    """
    if method not in METHODS:
        raise KeyError(f"unknown projection {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method](n_components=dim, **params)
