"""An inference-only copy of the ``effnet-minilm`` image tower, cheaper on CPU (the ``cnn`` local extractor's network).

``EfficientNet-Lite0`` as loaded (``efficientnet_lite_pytorch``) runs every
convolution as three or four separate passes over memory: TF-style "same"
padding (a ``ZeroPad2d`` copy), the convolution, an eval-mode ``BatchNorm2d``
and ``ReLU6``. A profile of ``finegrain index --local cnn`` put the padding,
batch-norm and ReLU6 passes at about half of the feature-map time, the
convolutions at the other half. :class:`FoldedTower` computes the same
function with:

- each batch norm folded into the preceding convolution's weights and bias
  (``w * g / sqrt(v + eps)``, ``b - m * g / sqrt(v + eps)``);
- symmetric "same" padding passed to the convolution itself (no copy); the
  asymmetric remainder of the stride-2 layers (one more zero row/column at the
  bottom/right) is padded onto the block's input, 6x narrower than the
  expanded map, and the expanded margin zeroed after the 1x1 expansion;
- ReLU6 in place.

The results equal the original tower's up to float32 rounding (checked by
``tests/test_local_speed.py``); the encoder itself is left untouched, so the
joint-space ``global`` field is computed exactly as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FoldedConv", "FoldedBlock", "FoldedTower", "fold_tower"]


def _static_padding(conv: nn.Module) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding a ``Conv2dStaticSamePadding`` applies before its convolution."""
    pad = getattr(conv, "static_padding", None)
    if pad is None or not isinstance(pad, nn.ZeroPad2d):
        return (0, 0, 0, 0)
    left, right, top, bottom = (int(v) for v in pad.padding)
    return left, right, top, bottom


class FoldedConv(nn.Module):
    """A convolution with its batch norm folded in, its padding, and optionally ReLU6 (in place)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool):
        super().__init__()
        if tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1):
            raise ValueError("expected a 'same'-padded convolution without its own padding or dilation")
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None or bn.training:
            raise ValueError("the image tower's batch norms must be in eval mode with running statistics")
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(var + bn.eps)
            bias = bn.bias - mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            weight = conv.weight * scale[:, None, None, None]
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        self.stride = tuple(int(s) for s in conv.stride)
        self.groups = int(conv.groups)
        left, right, top, bottom = _static_padding(conv)
        ph, pw = min(top, bottom), min(left, right)
        self.padding = (ph, pw)  # the symmetric part, done by the convolution
        rest = (left - pw, right - pw, top - ph, bottom - ph)
        self.pre_pad = rest if any(rest) else None  # the asymmetric remainder, as an explicit (small) pad
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(F.pad(x, self.pre_pad) if self.pre_pad is not None else x)

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of an input that already has the ``pre_pad`` remainder."""
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return F.hardtanh_(x, 0.0, 6.0) if self.relu6 else x


class FoldedBlock(nn.Module):
    """One MBConv block (no squeeze-excitation, as in EfficientNet-Lite) of folded convolutions."""

    def __init__(self, block: Any):  # an efficientnet_lite_pytorch MBConvBlock (untyped)
        super().__init__()
        if getattr(block, "has_se", False) or not isinstance(getattr(block, "_swish", None), nn.ReLU6):
            raise ValueError("only EfficientNet-Lite blocks (ReLU6, no squeeze-excitation) can be folded")
        args = block._block_args
        self.expand = FoldedConv(block._expand_conv, block._bn0, True) if args.expand_ratio != 1 else None
        self.depthwise = FoldedConv(block._depthwise_conv, block._bn1, True)
        self.project = FoldedConv(block._project_conv, block._bn2, False)
        # the library's own test (a stride given as a list, [1], takes no skip)
        self.skip = bool(args.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.depthwise.pre_pad
        if self.expand is None:
            y = self.depthwise(x)
        elif pad is None:
            y = self.depthwise.convolve(self.expand(x))
        else:
            # Pad the block's input (6x fewer channels than the expanded map the depthwise convolution reads):
            # the 1x1 expansion keeps the margin a margin, which then gets the zeros padding would give it.
            y = self.expand(F.pad(x, pad))
            left, right, top, bottom = pad
            h, w = y.shape[-2:]
            y[..., :top, :] = 0.0
            y[..., h - bottom:, :] = 0.0
            y[..., :, :left] = 0.0
            y[..., :, w - right:] = 0.0
            y = self.depthwise.convolve(y)
        y = self.project(y)
        return y.add_(x) if self.skip else y  # inference: no drop-connect


class FoldedTower(nn.Module):
    """Stem, MBConv blocks and head of the image tower: (B, 3, H, W) pixels -> (B, 1280, H/32, W/32)."""

    def __init__(self, trunk: Any, top: Any):  # effnet_minilm ImageTrunk and ImageTop
        super().__init__()
        stem_conv, stem_bn, stem_act = trunk.stem
        head_conv, head_bn, head_act = top.head
        if not (isinstance(stem_act, nn.ReLU6) and isinstance(head_act, nn.ReLU6)):
            raise ValueError("only EfficientNet-Lite towers (ReLU6) can be folded")
        self.stem = FoldedConv(stem_conv, stem_bn, True)
        self.blocks = nn.ModuleList([FoldedBlock(b) for b in trunk.blocks] + [FoldedBlock(top.block)])
        self.head = FoldedConv(head_conv, head_bn, True)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        for block in self.blocks:
            x = block(x)
        return self.head(x).contiguous()


def fold_tower(encoder: Any) -> FoldedTower:
    """The folded copy of an ``effnet-minilm`` encoder's image tower (its ``trunk`` and ``aligner.image_top``).

    Raises ``ValueError`` for a tower of another structure; the encoder is not modified.
    """
    trunk = getattr(encoder, "trunk", None)
    top = getattr(getattr(encoder, "aligner", None), "image_top", None)
    if trunk is None or top is None:
        raise ValueError(f"cannot fold the image tower of {getattr(encoder, 'name', encoder)!r}")
    return FoldedTower(trunk, top)
