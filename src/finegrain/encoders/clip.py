"""OpenAI CLIP (and compatible) models through Hugging Face ``transformers``.

Registry names look like ``clip:openai/clip-vit-base-patch32`` (a hub id that
must already be in the local Hugging Face cache) or ``clip:/path/to/folder``
(a folder in Hugging Face format: ``config.json``, weights, tokenizer files
and optionally ``preprocessor_config.json``). Nothing is ever downloaded: all
loading uses ``local_files_only=True``. The open_clip-style names in
:data:`ALIASES` (``ViT-B-32/openai`` ...) map to their hub ids.

Preprocessing is done here with PIL and numpy (no ``CLIPProcessor``, so
torchvision is never imported): the image is squash-resized to the tower's
native ``image_size`` (no centre crop, so the whole image is seen) and
normalised with the mean/std of ``preprocessor_config.json`` when present,
else the standard OpenAI CLIP values.

Data flow for an image::

    pixels (3, S, S) -> ViT -> tokens (1 + h*w, C)
      CLS token -> post_layernorm -> visual_projection = image embedding (dim)
      patch tokens -> (C, h, w) = feature map; a pooled region (C,) goes
      through post_layernorm -> visual_projection (see :meth:`CLIPEncoder._project_features`)
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import Encoder

#: open_clip-style model names accepted as aliases of Hugging Face hub ids.
ALIASES: dict[str, str] = {
    "ViT-B-32/openai": "openai/clip-vit-base-patch32",
    "ViT-B-16/openai": "openai/clip-vit-base-patch16",
    "ViT-L-14/openai": "openai/clip-vit-large-patch14",
}
#: Standard OpenAI CLIP normalisation, used when no preprocessor config is found.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: PIL resampling filter id used by CLIP (3 = bicubic) unless the config says otherwise.
CLIP_RESAMPLE = 3

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)



def squash_normalise(image: Image.Image, size: int, resample: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """An RGB image squash-resized to ``size`` x ``size`` and normalised: (3, size, size) float32 (CLIP, SigLIP)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling(resample), reducing_gap=3.0)
    arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * (1.0 / 255.0)
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def interpolation_kwargs(batch: torch.Tensor, image_size: int, can_interpolate: bool, family: str) -> dict[str, Any]:
    """``interpolate_pos_encoding`` for a vision tower fed another size than it was trained at (CLIP, SigLIP)."""
    height, width = batch.shape[-2:]
    if (height, width) == (image_size, image_size):
        return {}
    if not can_interpolate:
        raise ValueError(f"this transformers version cannot interpolate {family} position embeddings; "
                         f"use size={image_size} (got {height}x{width})")
    return {"interpolate_pos_encoding": True}

class ModelWeightsMissing(FileNotFoundError):
    """The requested model is not available locally; ``str(err)`` says how to supply it."""


def default_hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time.

    Follows ``huggingface_hub``: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _looks_like_path(spec: str) -> bool:
    """True if ``spec`` is meant as a filesystem path rather than an ``org/name`` hub id."""
    return (
        spec.startswith((".", "~", os.sep, "/"))
        or os.path.isabs(spec)
        or spec.count("/") != 1
        or (os.sep != "/" and os.sep in spec)
    )


@dataclass(frozen=True)
class ModelFamily:
    """What differs between the Hugging Face dual encoders finegrain loads offline (CLIP, SigLIP)."""

    label: str  # "CLIP"
    prefix: str  # registry family: "clip"
    example: str  # a hub id for the how-to-supply message
    model_class: str  # transformers classes named in the message
    tokenizer_class: str
    tokenizer_files: tuple[tuple[str, ...], ...]  # any one of these sets of files is a tokenizer
    tokenizer_names: str  # how the message names them


CLIP = ModelFamily("CLIP", "clip", "openai/clip-vit-base-patch32", "CLIPModel", "CLIPTokenizer",
                   (("tokenizer.json",), ("vocab.json", "merges.txt")),
                   "tokenizer.json, or vocab.json and merges.txt")


def missing_message(model: str, where: str, hub_id: str | None, problem: str, family: ModelFamily = CLIP) -> str:
    """One paragraph: what was looked for, where, and how to supply it."""
    example = hub_id or family.example
    return (
        f"{family.label} model {model!r} is not available locally: {problem} (looked in {where}). "
        "finegrain never downloads weights. To supply them, on a machine with internet run "
        f"`huggingface-cli download {example}` and copy its Hugging Face cache folder "
        "(~/.cache/huggingface) to this machine, pointing HF_HOME (or HF_HUB_CACHE) at it; "
        f"or save a folder with `{family.model_class}.from_pretrained(...).save_pretrained(folder)` plus "
        f"`{family.tokenizer_class}.from_pretrained(...).save_pretrained(folder)` (and optionally the "
        f"preprocessor_config.json), copy it here and use `{family.prefix}:/that/folder`."
    )


def _snapshot_folder(repo_dir: Path) -> Path | None:
    """The snapshot folder of a cached hub repo: ``refs/main`` if present, else the newest one."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()] if (repo_dir / "snapshots").is_dir() else []
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def resolve_model_folder(model: str, cache_dir: str | os.PathLike | None = None,
                         family: ModelFamily = CLIP) -> tuple[Path, str | None]:
    """Find the local folder holding ``model`` (alias, hub id or folder path).

    Parameters
    ----------
    model:
        A folder in Hugging Face format, a hub id (``org/name``) already in the
        local cache, or an alias from :data:`ALIASES`.
    cache_dir:
        Hugging Face hub cache to search for hub ids; defaults to
        :func:`default_hf_cache_dir`.

    Returns
    -------
    (folder, hub_id)
        The folder with ``config.json``, weights and tokenizer files, and the
        hub id (``None`` for a plain folder).

    Raises
    ------
    ModelWeightsMissing
        If the folder, the cached repo or any required file is missing.
    """
    spec = ALIASES.get(model, model) if family is CLIP else model
    hub_id: str | None = None
    folder = Path(spec).expanduser()
    if folder.is_dir():
        where = str(folder)
    elif _looks_like_path(spec):
        raise ModelWeightsMissing(missing_message(model, str(folder), None, "the folder does not exist", family))
    else:
        hub_id = spec
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_hf_cache_dir()
        repo_dir = cache / ("models--" + hub_id.replace("/", "--"))
        where = f"the Hugging Face cache {cache}"
        snap = _snapshot_folder(repo_dir) if repo_dir.is_dir() else None
        if snap is None:
            raise ModelWeightsMissing(missing_message(model, where, hub_id, f"hub id {hub_id!r} is not in the cache",
                                                       family))
        folder, where = snap, f"{where} ({snap})"
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("config.json is missing")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        problems.append("no weights file (model.safetensors or pytorch_model.bin) was found")
    if not any(all((folder / f).is_file() for f in files) for files in family.tokenizer_files):
        problems.append(f"no tokenizer files ({family.tokenizer_names}) were found")
    if problems:
        raise ModelWeightsMissing(missing_message(model, where, hub_id, "; ".join(problems), family))
    return folder, hub_id


def read_preprocessor_config(folder: Path, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                             resample: int = CLIP_RESAMPLE) -> dict[str, Any]:
    """Mean, std and resample filter from ``preprocessor_config.json``; the defaults (CLIP's) where it says nothing."""
    cfg: dict[str, Any] = {}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            cfg = {}
    found = cfg.get("resample", resample)
    return {
        "mean": tuple(float(v) for v in (cfg.get("image_mean") or mean)),
        "std": tuple(float(v) for v in (cfg.get("image_std") or std)),
        "resample": int(found) if isinstance(found, int) else resample,
    }


def features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output object (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    return out[1] if isinstance(out, (tuple, list)) else out[0]


class CLIPEncoder(Encoder):
    """A Hugging Face ``CLIPModel`` as a finegrain :class:`Encoder`, loaded offline.

    Parameters
    ----------
    model:
        Folder in Hugging Face format, hub id already in the local HF cache
        (``openai/clip-vit-base-patch32``), or an alias from :data:`ALIASES`
        (``ViT-B-32/openai``).
    device:
        torch device to run on.
    cache_dir:
        Hugging Face hub cache to look in for hub ids (default: from
        ``HF_HUB_CACHE`` / ``HF_HOME``, else ``~/.cache/huggingface/hub``).

    Raises
    ------
    ModelWeightsMissing
        (a ``FileNotFoundError``) when the model is not available locally.
    """

    def __init__(self, model: str, device: str = "cpu", cache_dir: str | os.PathLike | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        self.model_spec = model
        self.folder, self.hub_id = resolve_model_folder(model, cache_dir)
        try:
            clip = CLIPModel.from_pretrained(str(self.folder), local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelWeightsMissing(
                missing_message(model, str(self.folder), self.hub_id,
                                 f"transformers could not load it ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})")
            ) from exc
        self.device = torch.device(device)
        self.model = clip.float().eval().to(self.device)
        self.tokenizer = tokenizer
        vision = self.model.config.vision_config
        self.name = f"clip:{model}"
        self.dim = int(self.model.config.projection_dim)
        self.image_size = int(vision.image_size)
        self.patch_size = int(vision.patch_size)
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        pre = read_preprocessor_config(self.folder)
        self.mean = np.asarray(pre["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(pre["std"], np.float32).reshape(3, 1, 1)
        self.resample = pre["resample"]
        vision_forward = inspect.signature(self.model.vision_model.forward)
        self._can_interpolate = "interpolate_pos_encoding" in vision_forward.parameters

    # hooks ------------------------------------------------------------------
    def prepare_image(self, image: Image.Image, size: int | None = None) -> np.ndarray:
        """Squash-resize a loaded RGB image to ``size`` x ``size`` (default ``image_size``) and CLIP-normalise.

        Returns
        -------
        np.ndarray
            (3, size, size) float32.
        """
        return squash_normalise(image, int(size or self.image_size), self.resample, self.mean, self.std)

    def _vision_kwargs(self, batch: torch.Tensor) -> dict[str, Any]:
        return interpolation_kwargs(batch, self.image_size, self._can_interpolate, "CLIP")

    def embed_image_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dim) unnormalised image embeddings (CLS token, projected)."""
        batch = batch.to(self.device)
        return features(self.model.get_image_features(pixel_values=batch, **self._vision_kwargs(batch)))

    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (B, dim) unnormalised text embeddings; truncated at the model's context length."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt")
        out = self.model.get_text_features(
            input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
        )
        return features(out)

    def feature_map_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/patch, W/patch): final-layer patch tokens, CLS dropped, no layer norm."""
        batch = batch.to(self.device)
        out = self.model.vision_model(pixel_values=batch, **self._vision_kwargs(batch))
        tokens = out.last_hidden_state[:, 1:, :]
        h, w = batch.shape[-2] // self.patch_size, batch.shape[-1] // self.patch_size
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2).contiguous()

    def _project_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled patch tokens -> (N, dim) via ``post_layernorm`` then ``visual_projection``.

        This is an approximation: CLIP was trained to project only the CLS
        token, so a pooled region of patch tokens lands near, not exactly in,
        the distribution of whole-image embeddings; expect region scores to be
        less calibrated than whole-image ones. It costs no extra forward pass.
        """
        pooled = pooled.to(self.device)
        return self.model.visual_projection(self.model.vision_model.post_layernorm(pooled))
