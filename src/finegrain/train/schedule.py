"""The learning-rate schedule and optimiser step both aligner recipes (:mod:`.aligner`, :mod:`.aligner_v2`) share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def lr_scale(step: int, warmup: int, total: int) -> float:
    """The factor on each group's base learning rate at ``step``: a linear warm-up, then a cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def scheduled_step(opt: torch.optim.Optimizer, base_lrs: Sequence[float], loss: torch.Tensor, step: int,
                   warmup: int, total: int) -> float:
    """One optimiser step on ``loss`` with every group's learning rate set for ``step``; the loss as a float."""
    scale = lr_scale(step, warmup, total)
    for group, lr in zip(opt.param_groups, base_lrs):
        group["lr"] = lr * scale
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()
