"""Google SigLIP (and fixed-resolution SigLIP 2) models through Hugging Face ``transformers``' ``SiglipModel``.

Registry names look like ``siglip:google/siglip-base-patch16-224`` (a hub id
already in the local Hugging Face cache) or ``siglip:/path/to/folder`` (a
folder in Hugging Face format: ``config.json``, weights, the tokenizer and
optionally ``preprocessor_config.json``). Nothing is ever downloaded: all
loading uses ``local_files_only=True``, and a missing model raises the same
:class:`~finegrain.encoders.clip.ModelWeightsMissing` as the CLIP adapter.

What differs from CLIP:

- **Text padding.** SigLIP's text tower was trained on sequences padded to
  the full context (64 tokens) with no attention mask, and pools the *last*
  position. Texts are therefore tokenised with ``padding="max_length"`` and
  run without a mask; padding to the longest text in the batch (CLIP's way)
  would change every embedding with the batch it is in.
- **Tokenizer.** SigLIP checkpoints ship a SentencePiece ``spiece.model``
  (needs the ``sentencepiece`` package: ``pip install 'finegrain[siglip]'``);
  SigLIP 2 fixed-resolution checkpoints ship Gemma's ``tokenizer.json``. Both
  load through ``AutoTokenizer``.
- **Pixels.** Squash-resized to ``image_size`` and normalised with mean and
  std 0.5 (SigLIP's values) unless ``preprocessor_config.json`` says otherwise.
- **No CLS token.** The image embedding is the attention-pooling head (MAP)
  over all patch tokens after ``post_layernorm``; the feature map is those
  tokens. A pooled region goes through the same head as a one-token sequence.
- **Sigmoid scores.** SigLIP is trained with a pairwise sigmoid loss, not a
  softmax over a batch: ``sigmoid(exp(logit_scale) * cos + logit_bias)`` is a
  per-pair match probability. Search ranks by cosine like every encoder (the
  map is monotone, so the order is the same); cosines of good matches are
  much lower than CLIP's (often 0.05-0.2), so a score threshold chosen for
  CLIP does not carry over. :meth:`SiglipEncoder.match_probability` converts.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import Encoder
from .clip import (
    ModelFamily,
    ModelWeightsMissing,
    features,
    interpolation_kwargs,
    missing_message,
    read_preprocessor_config,
    resolve_model_folder,
    squash_normalise,
)

SIGLIP = ModelFamily("SigLIP", "siglip", "google/siglip-base-patch16-224", "SiglipModel", "AutoTokenizer",
                     (("tokenizer.json",), ("spiece.model",)), "tokenizer.json or spiece.model")
#: SigLIP's normalisation (pixels to [-1, 1]) and bicubic resize, used when no preprocessor config is found.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
SIGLIP_RESAMPLE = 3


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class SiglipEncoder(Encoder):
    """A Hugging Face ``SiglipModel`` as a finegrain :class:`Encoder`, loaded offline.

    Parameters
    ----------
    model:
        Folder in Hugging Face format, or a hub id already in the local HF cache
        (``google/siglip-base-patch16-224``).
    device:
        torch device to run on.
    cache_dir:
        Hugging Face hub cache to look in for hub ids (default: from
        ``HF_HUB_CACHE`` / ``HF_HOME``, else ``~/.cache/huggingface/hub``).

    Raises
    ------
    ModelWeightsMissing
        (a ``FileNotFoundError``) when the model or its tokenizer is not available locally.
    """

    def __init__(self, model: str, device: str = "cpu", cache_dir: str | os.PathLike | None = None):
        from transformers import AutoTokenizer, SiglipConfig, SiglipModel

        self.model_spec = model
        self.folder, self.hub_id = resolve_model_folder(model, cache_dir, SIGLIP)
        try:
            config = SiglipConfig.from_pretrained(str(self.folder), local_files_only=True)
            siglip = SiglipModel.from_pretrained(str(self.folder), config=config, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelWeightsMissing(missing_message(
                model, str(self.folder), self.hub_id, f"transformers could not load it ({_first_line(exc)})", SIGLIP
            )) from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except ImportError as exc:  # spiece.model without the sentencepiece package
            raise ModelWeightsMissing(
                f"SigLIP model {model!r}: its tokenizer needs a package that is not installed ({_first_line(exc)}); "
                "install it with `pip install 'finegrain[siglip]'` (sentencepiece)") from None
        except (OSError, ValueError) as exc:
            raise ModelWeightsMissing(missing_message(
                model, str(self.folder), self.hub_id, f"the tokenizer could not be loaded ({_first_line(exc)})",
                SIGLIP)) from exc
        if tokenizer is None or isinstance(tokenizer, bool):
            raise ModelWeightsMissing(f"SigLIP model {model!r}: transformers found no tokenizer it can run in "
                                      f"{self.folder}; install `pip install 'finegrain[siglip]'` (sentencepiece)")
        self.device = torch.device(device)
        self.model = siglip.float().eval().to(self.device)
        self.tokenizer = tokenizer
        vision, text = self.model.config.vision_config, self.model.config.text_config
        self.name = f"siglip:{model}"
        self.dim = int(vision.hidden_size)
        text_dim = int(getattr(text, "projection_size", None) or text.hidden_size)
        if text_dim != self.dim:
            raise ValueError(f"SigLIP model {model!r}: text embeddings have {text_dim} dimensions but image "
                             f"embeddings {self.dim}; this is not a dual encoder finegrain can search with")
        self.image_size = int(vision.image_size)
        self.patch_size = int(vision.patch_size)
        self.max_text_tokens = int(text.max_position_embeddings)
        pre = read_preprocessor_config(self.folder, SIGLIP_MEAN, SIGLIP_STD, SIGLIP_RESAMPLE)
        self.mean = np.asarray(pre["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(pre["std"], np.float32).reshape(3, 1, 1)
        self.resample = pre["resample"]
        vision_forward = inspect.signature(self.model.vision_model.forward)
        self.can_interpolate = "interpolate_pos_encoding" in vision_forward.parameters
        if getattr(self.model.vision_model, "head", None) is None:
            raise ValueError(f"SigLIP model {model!r} has no attention-pooling head (vision_use_head is false); "
                             "finegrain needs it for image embeddings")

    def match_probability(self, cosine: np.ndarray | float) -> np.ndarray:
        """SigLIP's per-pair match probability for text-image cosine similarities: sigmoid(scale * cos + bias)."""
        scale = float(self.model.logit_scale.detach().exp())
        bias = float(self.model.logit_bias.detach())
        return 1.0 / (1.0 + np.exp(-(scale * np.asarray(cosine, np.float64) + bias)))

    # hooks ------------------------------------------------------------------
    def prepare_image(self, image: Image.Image, size: int | None = None) -> np.ndarray:
        """Squash-resize a loaded RGB image to ``size`` x ``size`` (default ``image_size``) and normalise.

        Returns
        -------
        np.ndarray
            (3, size, size) float32.
        """
        return squash_normalise(image, int(size or self.image_size), self.resample, self.mean, self.std)

    def vision_kwargs(self, batch: torch.Tensor) -> dict[str, Any]:
        """``interpolate_pos_encoding`` for inputs other than the trained size."""
        return interpolation_kwargs(batch, self.image_size, self.can_interpolate, "SigLIP")

    def embed_image_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dim) unnormalised image embeddings (attention-pooled patch tokens)."""
        batch = batch.to(self.device)
        return features(self.model.get_image_features(pixel_values=batch, **self.vision_kwargs(batch)))

    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (B, dim): padded to the full context, no attention mask (as SigLIP was trained)."""
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        return features(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device)))

    def feature_map_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/patch, W/patch): final patch tokens after ``post_layernorm`` (no CLS in SigLIP)."""
        batch = batch.to(self.device)
        out = self.model.vision_model(pixel_values=batch, **self.vision_kwargs(batch))
        tokens = out.last_hidden_state
        h, w = batch.shape[-2] // self.patch_size, batch.shape[-1] // self.patch_size
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2).contiguous()

    def _project_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled patch tokens -> (N, dim) through the attention-pooling head, as a one-token sequence.

        Like CLIP's region projection this is an approximation: the head was
        trained to pool a whole image's tokens, so region scores are less
        calibrated than whole-image ones. It costs no extra forward pass.
        """
        return self.model.vision_model.head(pooled.to(self.device)[:, None, :])
