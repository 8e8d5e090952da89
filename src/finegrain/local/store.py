"""Local features inside an index: configuration, the fitted whitening on disk, and the stored fields.

An index created with ``local=`` (``finegrain index ... --local cnn``) keeps,
next to the joint-space ``global`` field, two more vector fields in the same
chunked store (:mod:`finegrain.store.vectors`):

``local``
    One row per local descriptor, float16 ``(n, 128)``, owned by its image
    id, strongest first within an image; per-row attributes ``xys``
    (float32 ``(n, 3)``: x, y and support size in original-image pixels) and
    ``strength`` (float16).
``instance``
    One row per image, float16: the instance-retrieval global descriptor of
    the same forward passes (``cnn``: multi-scale GeM, p = 4.6; whitened when
    the extractor's ``global_whiten`` is on). Extractors without one
    (``sift``, ``disk``) store none, and the modes that fuse a global
    descriptor use the joint-space ``global`` field instead.

The learned state (PCA-whitening of the local descriptors, and of the GeM
vector with ``global_whiten``) lives in ``local/extractor.safetensors``
(arrays + the extractor's JSON config in the metadata; no pickle). It is
**fitted once**, on the first ``add`` that brings images, from up to
``fit_images`` of them spread evenly over the sorted file list; later
``add`` calls reuse it, so descriptors of all images share one space.
:meth:`finegrain.index.Index.refit_local` refits it on the whole current
collection and re-extracts every image (``finegrain index ... --refit-local``),
which is worth doing when the first batch was small or unlike what came later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..progress import progress_bar
from ..store.vectors import FieldRows
from . import features as lf

STATE_FILE = Path("local") / "extractor.safetensors"
LOCAL_FIELD = "local"
INSTANCE_FIELD = "instance"

__all__ = ["LocalConfig", "LocalStore", "STATE_FILE", "LOCAL_FIELD", "INSTANCE_FIELD"]


@dataclass
class LocalConfig:
    """How an index extracts and stores local features (saved in the catalog).

    Parameters
    ----------
    extractor : {"cnn", "sift", "disk"}
        Registered extractor name (:func:`finegrain.local.features.list_extractors`).
    params : dict
        Keyword parameters of the extractor (for ``cnn``: ``image_size``,
        ``scales``, ``max_features``, ``gem_p``, ``global_whiten``...).
        Unknown keys and bad values raise ``ValueError`` when the config is made.
    fit_images : int
        Images the whitening is fitted on (spread over the first batch).
    """

    extractor: str = "cnn"
    params: dict[str, Any] = field(default_factory=dict)
    fit_images: int = 128

    def __post_init__(self) -> None:
        if self.extractor not in lf.list_extractors():
            raise ValueError(f"unknown local-feature extractor {self.extractor!r}; "
                             f"available: {', '.join(lf.list_extractors())}")
        if self.fit_images < 2:
            raise ValueError("fit_images must be at least 2")
        self._build()  # unknown or bad parameters fail now, not after an hour of indexing

    def _build(self) -> lf.LocalExtractor:
        """The (unfitted) extractor; a bad parameter is a ``ValueError`` that names it."""
        try:
            return lf.create(self.extractor, **self.params)
        except TypeError:  # an unknown keyword: say which, in the extractor's terms (not Python's)
            takes = lf.parameters(self.extractor)
            unknown = sorted(set(self.params) - set(takes))
            if not unknown:
                raise
            raise ValueError(f"the {self.extractor!r} local-feature extractor has no parameter "
                             f"{', '.join(map(repr, unknown))} (it takes {', '.join(takes)})") from None

    def check_available(self) -> None:
        """Raise :class:`~finegrain.local.features.ExtractorUnavailable` (naming the package to install)
        if the extractor cannot run in this environment; checked before an index is created or added to."""
        self._build().check_available()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | str | None) -> LocalConfig | None:
        if d is None:
            return None
        if isinstance(d, str):
            return cls(extractor=d)
        return cls(extractor=d.get("extractor", "cnn"), params=dict(d.get("params", {})),
                   fit_images=int(d.get("fit_images", 128)))


class LocalStore:
    """Extraction and storage of local features for one index folder.

    Parameters
    ----------
    root : Path
        The index folder.
    config : LocalConfig
    """

    def __init__(self, root: Path, config: LocalConfig):
        self.root = Path(root)
        self.config = config
        self._extractor: lf.LocalExtractor | None = None
        self._raw_cache: dict[str, lf.RawFeatures] = {}
        #: Files whose raw features the last :meth:`fit` kept (float16): indexed from those rounded values.
        self.fit_sample: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def extractor(self) -> lf.LocalExtractor:
        """The extractor, with the index's fitted state when there is one."""
        stale = self._extractor is not None and not self._extractor.fitted and self.state_path.exists()
        if self._extractor is None or stale:  # stale: fitted since (by an indexing run or another process)
            if self.state_path.exists():
                self._extractor = lf.load(self.state_path)
            else:
                self._extractor = lf.create(self.config.extractor, **self.config.params)
        return self._extractor

    @property
    def fitted(self) -> bool:
        ex = self.extractor
        return (not ex.needs_fit) or ex.fitted

    def fit(self, paths: Sequence[str], show_progress: bool = False, seed: int = 0) -> int:
        """Fit the extractor's whitening on up to ``fit_images`` of ``paths`` and save it; returns images used.

        Raw features of the sample are kept in memory (float16) so indexing
        them right after costs no second extraction.
        """
        ex = lf.create(self.config.extractor, **self.config.params)
        n = min(self.config.fit_images, len(paths))
        pick = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, n).round().astype(int))] if n else []
        raws = []
        with progress_bar(len(pick), "fitting local whitening", show_progress) as bar:
            for p in pick:
                try:
                    raw = ex.extract_raw(p)
                except Exception:  # a bad file is reported by the indexing pass itself
                    bar.advance(1)
                    continue
                raw.descriptors = raw.descriptors.astype(np.float16)
                self._raw_cache[str(p)] = raw
                raws.append(raw)
                bar.advance(1)
        if ex.needs_fit:
            if len(raws) < 2:
                raise ValueError("fitting the local-feature whitening needs at least 2 readable images")
            ex.fit(raws, seed=seed)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        ex.save(self.state_path)
        self._extractor = ex
        self.fit_sample = frozenset(self._raw_cache)
        return len(raws)

    def reset(self) -> None:
        """Forget the fitted state (the next :meth:`fit` writes a new one)."""
        self.state_path.unlink(missing_ok=True)
        self._extractor = None
        self._raw_cache.clear()
        self.fit_sample = frozenset()

    # ------------------------------------------------------------- extraction
    def extract(self, path: str) -> tuple[lf.LocalFeatures, np.ndarray | None]:
        """Local features of an indexed file and its instance descriptor (None for extractors without one)."""
        ex = self.extractor
        if not self.fitted:
            raise RuntimeError("the index's local-feature whitening is not fitted yet")
        raw = self._raw_cache.pop(str(path), None)
        if raw is None:
            raw = ex.extract_raw(path)
        feats = ex.transform(raw)
        inst = ex.transform_global(raw) if (raw.global_raw is not None and hasattr(ex, "transform_global")) else None
        return feats, inst

    def load(self, path: str, data: bytes | None = None):
        """The decoding half of :meth:`extract` (decode workers): None when the fit kept this file's raw features."""
        if str(path) in self._raw_cache:
            return None
        return self.extractor.load(data if data is not None else path)

    def extract_loaded(self, path: str, loaded) -> tuple[lf.LocalFeatures, np.ndarray | None]:
        """Like :meth:`extract`, from what :meth:`load` returned for ``path``."""
        ex = self.extractor
        if not self.fitted:
            raise RuntimeError("the index's local-feature whitening is not fitted yet")
        raw = self._raw_cache.pop(str(path), None)
        if raw is None:
            raw = ex.extract_raw(path) if loaded is None else ex.extract_loaded(loaded)
            if str(path) in self.fit_sample:  # as the fit kept it (a worker without the fit's cache)
                raw.descriptors = raw.descriptors.astype(np.float16)
        feats = ex.transform(raw)
        inst = ex.transform_global(raw) if (raw.global_raw is not None and hasattr(ex, "transform_global")) else None
        return feats, inst

    def extract_query(self, image, bbox: Sequence[float] | None = None) -> tuple[lf.LocalFeatures, np.ndarray | None]:
        """Local features (and instance descriptor) of a query image, optionally cropped to ``bbox``."""
        ex = self.extractor
        if not self.fitted:
            raise ValueError("this index's local features are not fitted yet: add images first")
        raw = ex.extract_raw(image, bbox)
        feats = ex.transform(raw)
        inst = ex.transform_global(raw) if (raw.global_raw is not None and hasattr(ex, "transform_global")) else None
        return feats, inst

    @staticmethod
    def rows(items: Sequence[tuple[lf.LocalFeatures, np.ndarray | None]], ids: Sequence[int]) -> dict[str, FieldRows]:
        """The ``local`` (and ``instance``) field rows of a commit: one entry of ``items`` per image id."""
        out: dict[str, FieldRows] = {}
        if not items:
            return out
        dim = next((f.descriptors.shape[1] for f, _ in items if len(f)), 128)
        desc = [np.asarray(f.descriptors, np.float32).reshape(-1, dim) for f, _ in items]
        out[LOCAL_FIELD] = FieldRows(
            np.concatenate(desc).astype(np.float16),
            np.concatenate([np.full(len(f), i, np.int64) for (f, _), i in zip(items, ids)]),
            {"xys": np.concatenate([np.column_stack([np.asarray(f.positions, np.float32).reshape(-1, 2),
                                                     np.asarray(f.scales, np.float32).reshape(-1)])
                                    for f, _ in items]).astype(np.float32),
             "strength": np.concatenate([np.asarray(f.strengths, np.float32) for f, _ in items]).astype(np.float16)},
        )
        if all(g is not None for _, g in items):
            out[INSTANCE_FIELD] = FieldRows(np.stack([cast(np.ndarray, g) for _, g in items]).astype(np.float16),
                                            np.asarray(ids, np.int64))
        return out
