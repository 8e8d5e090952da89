"""The one interface every text-image encoder implements.

An encoder maps images and texts into one joint space of ``dim`` dimensions
(L2-normalised float32 rows). It also exposes the image tower's spatial
feature map and the projection from that map into the joint space, so region
embeddings (segments, objects, local features) can be pooled from a single
forward pass instead of re-encoding crops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import ImageSource, load_image
from ..parallel import ordered_map, spare_cores
from ..progress import progress_bar


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation, returning C-contiguous float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


#: Text batches up to this size (a query: its text and its sub-queries) are encoded with torch on one thread.
#: Two threads gain little on a few dozen tokens and wait at a barrier after every operation when another
#: process holds a core: 20x slower on a loaded 2-core machine (docs/benchmarks.md, "Scale").
QUERY_TEXTS = 16


class Encoder(ABC):
    """Base class: subclasses implement the tensor-level hooks below.

    Public API (stable): :meth:`encode_images`, :meth:`encode_texts`,
    :meth:`feature_maps`, :meth:`project`, :attr:`name`, :attr:`dim`.
    """

    #: Registry name, e.g. ``"effnet-minilm"``.
    name: str
    #: Dimension of the joint embedding space.
    dim: int
    #: Side, in pixels, of the square input the image tower expects.
    image_size: int

    # ----------------------------------------------------------------- hooks
    @abstractmethod
    def prepare_image(self, image: Image.Image, size: int | None = None) -> np.ndarray:
        """Resize and normalise a loaded RGB image to a (3, S, S) float32 array (S = ``size`` or ``image_size``)."""

    @abstractmethod
    def embed_image_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, dim) unnormalised embeddings."""

    @abstractmethod
    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor:
        """List of strings -> (B, dim) unnormalised embeddings."""

    @abstractmethod
    def feature_map_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) spatial features before pooling and projection."""

    @abstractmethod
    def _project_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled region features -> (N, dim) unnormalised joint embeddings."""

    # ------------------------------------------------------------ public API
    def preprocess(self, image: ImageSource, size: int | None = None) -> np.ndarray:
        """Load (safely) and prepare one image; see :meth:`prepare_image`."""
        return self.prepare_image(load_image(image, draft_size=size or self.image_size), size)

    def encode_pixels(self, batch: np.ndarray) -> np.ndarray:
        """Embed a (B, 3, S, S) batch of prepared images as L2-normalised (B, dim) rows."""
        return l2_normalize(self._run(self.embed_image_batch, torch.from_numpy(np.ascontiguousarray(batch))))

    def encode_images(
        self,
        images: Sequence[ImageSource],
        batch_size: int = 32,
        show_progress: bool = False,
        num_workers: int | None = None,
    ) -> np.ndarray:
        """Embed images (paths, bytes or PIL images) as (n, dim) L2-normalised float32.

        Decoding runs in ``num_workers`` threads overlapped with the forward
        pass (default: the cores torch leaves free; none on a 2-core machine).
        Raises :class:`finegrain.images.ImageLoadError` on a bad image;
        the indexer catches it per file, so one bad file never stops a run.
        """
        out = [self._run(self.embed_image_batch, batch) for batch in
               self.iter_image_batches(images, batch_size, show_progress, num_workers)]
        return l2_normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed texts as (n, dim) L2-normalised float32 rows."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError("texts must be non-empty strings")
        # Sort by length so each batch pads little; restore order at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        from ..compress.storage import map_single_threaded, scoring_workers

        def embed(batch: list[int]) -> np.ndarray:
            return self._run(self._embed_text_batch, [texts[i] for i in batch])

        chunks: list[np.ndarray] = []
        if len(texts) <= QUERY_TEXTS:
            # A query (full text and sub-queries): torch on one thread per worker (no barrier waits; same output),
            # its texts split over the workers in runs of similar length, so its latency falls with free cores.
            runs = np.array_split(np.asarray(order, np.int64), max(1, min(len(texts), scoring_workers())))
            chunks = map_single_threaded(embed, [r.tolist() for r in runs if len(r)])
        else:
            with progress_bar(len(texts), "encoding texts", show_progress) as bar:
                for start in range(0, len(texts), batch_size):
                    chunks.append(embed(order[start:start + batch_size]))
                    bar.advance(min(batch_size, len(texts) - start))
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        emb = np.empty((len(texts), self.dim), np.float32)
        emb[order] = np.concatenate(chunks)
        return l2_normalize(emb)

    def feature_maps(self, images: Sequence[ImageSource], size: int | None = None, batch_size: int = 16) -> np.ndarray:
        """Spatial feature maps (n, C, h, w) of the image tower at input side ``size``."""
        out = [self._run(self.feature_map_batch, batch) for batch in
               self.iter_image_batches(images, batch_size, False, None, size=size)]
        return np.concatenate(out)

    def pool_regions(self, fmap: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Pool one image's (C, h, w) feature map over (R, h, w) mask weights -> (R, C).

        The tower's own pooling restricted to each region; the default is a
        weighted mean (encoders with another global pooling override it).
        """
        w = masks.reshape(len(masks), -1).to(fmap.dtype)
        return (w @ fmap.reshape(fmap.shape[0], -1).T) / w.sum(dim=1, keepdim=True).clamp(min=1e-6)

    def encode_regions(self, pixels: np.ndarray, masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Embed regions of prepared images from one forward pass each.

        ``pixels`` is (B, 3, S, S) prepared images; ``masks[b]`` is an (R_b, H, W)
        array of region masks (any resolution, values in [0, 1]) for image b.
        Each mask is averaged onto the feature-map grid, the map is pooled over
        it with the tower's own pooling and projected into the joint space.
        Returns one (R_b, dim) L2-normalised array per image.
        """
        out = []
        with torch.inference_mode():
            fmap = self.feature_map_batch(torch.from_numpy(np.ascontiguousarray(pixels)))
            for b, m in enumerate(masks):
                if len(m) == 0:
                    out.append(np.zeros((0, self.dim), np.float32))
                    continue
                masks_t = torch.from_numpy(np.asarray(m, np.float32))[:, None]
                grid = F.adaptive_avg_pool2d(masks_t, fmap.shape[-2:])[:, 0]  # type: ignore[arg-type]
                pooled = self.pool_regions(fmap[b], grid)
                out.append(l2_normalize(self._project_features(pooled).float().numpy()))
        return out

    def project(self, pooled: np.ndarray) -> np.ndarray:
        """Project pooled feature-map vectors (n, C) into the joint space, L2-normalised."""
        x = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32))
        return l2_normalize(self._run(self._project_features, x))

    # --------------------------------------------------------------- helpers
    def iter_image_batches(
        self,
        images: Sequence[ImageSource],
        batch_size: int,
        show_progress: bool = False,
        num_workers: int | None = None,
        size: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield preprocessed (B, 3, H, W) tensors, decoding ahead in threads when cores are free."""
        images = list(images)
        if num_workers is None:
            num_workers = spare_cores(torch.get_num_threads())
        with progress_bar(len(images), "encoding images", show_progress) as bar:
            arrays = ordered_map(lambda im: self.preprocess(im, size), images, num_workers, 2 * batch_size)
            batch: list[np.ndarray] = []
            for arr in arrays:
                batch.append(arr)
                if len(batch) == batch_size:
                    yield torch.from_numpy(np.stack(batch))
                    bar.advance(len(batch))
                    batch = []
            if batch:
                yield torch.from_numpy(np.stack(batch))
                bar.advance(len(batch))

    @staticmethod
    def _run(fn, *args) -> np.ndarray:
        with torch.inference_mode():
            return fn(*args).float().cpu().numpy()
