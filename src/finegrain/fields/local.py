"""The ``local`` and ``instance`` fields: local features and the instance descriptor (L2G, docs/l2g.md).

The extractor's learned whitening is fitted once per index, on the driver,
before anything is prepared (:meth:`LocalField.fit`, state in
``local/extractor.safetensors`` under the index folder, see
:mod:`finegrain.local.store`); decode workers load each file's image region
(:meth:`LocalStore.load`), the network and the whitening run in
:meth:`LocalField.encode`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..local.store import INSTANCE_FIELD, LOCAL_FIELD, LocalConfig, LocalStore
from ..store.vectors import FieldRows
from .base import Decoded, FieldExtractor, register


class LocalField(FieldExtractor):
    """``local`` rows (attributes ``xys`` and ``strength``) and, for extractors with one, ``instance`` rows."""

    key = "local"
    label = "local features"

    def __init__(self, config: LocalConfig, root: Path):
        self.config = config
        self.root = Path(root)
        self._store = LocalStore(self.root, config)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any, root: Path) -> LocalField:
        cfg = config if isinstance(config, LocalConfig) else LocalConfig.from_dict(config)
        assert cfg is not None
        return cls(cfg, root)

    def config_dict(self) -> dict:
        return self.config.to_dict()

    @property
    def fields(self) -> tuple[str, ...]:
        return (LOCAL_FIELD, INSTANCE_FIELD)

    @property
    def store(self) -> LocalStore:
        """Extraction and the fitted state on disk."""
        return self._store

    # Pickled for Ray workers: the config, the folder and which files the fit kept; never the fit's raw
    # features or a loaded network (workers load the fitted state from the index folder).
    def __getstate__(self) -> dict:
        return {"config": self.config, "root": self.root, "fit_sample": self._store.fit_sample}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], state["root"])  # type: ignore[misc]
        self._store.fit_sample = state["fit_sample"]

    @property
    def needs_fit(self) -> bool:
        return not self._store.fitted

    def fit(self, paths: Sequence[str], show_progress: bool = False) -> None:
        self._store.fit(paths, show_progress)

    def prepare(self, decoded: Decoded, encoder) -> tuple[str, Any]:
        with self._lock:  # the first call loads the fitted extractor; threads share it
            _ = self._store.extractor
        return decoded.path, self._store.load(decoded.path, decoded.data)

    def encode(self, encoder, payloads: list[tuple[str, Any]]) -> list[tuple[Any, np.ndarray | None]]:
        return [self._store.extract_loaded(path, loaded) for path, loaded in payloads]

    def rows(self, results: list[tuple[Any, np.ndarray | None]], owners: np.ndarray) -> dict[str, FieldRows]:
        return LocalStore.rows(results, [int(i) for i in owners])


register(LocalField)
