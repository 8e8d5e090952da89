"""The warm-up + cosine learning rate and the optimiser step both aligner recipes share (finegrain.train.schedule)."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.train.schedule import lr_scale, scheduled_step


def test_lr_scale_warms_up_linearly_then_follows_a_cosine_to_zero():
    assert [lr_scale(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_scale(4, 4, 20) == 1.0  # the cosine starts at its top
    assert lr_scale(12, 4, 20) == pytest.approx(0.5)  # half way through the decay
    assert lr_scale(20, 4, 20) == pytest.approx(0.0, abs=1e-12) and lr_scale(99, 4, 20) == lr_scale(20, 4, 20)
    assert lr_scale(0, 0, 1) == 1.0 and lr_scale(5, 0, 5) == pytest.approx(0.0, abs=1e-12)  # no warm-up
    decay = [lr_scale(s, 4, 20) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_scale(8, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 16)))


def test_scheduled_step_sets_every_group_and_steps_once():
    a, b = torch.nn.Parameter(torch.tensor([1.0])), torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1.0}])
    a.grad = torch.tensor([100.0])  # a stale gradient: zeroed before the backward pass
    loss = 3 * a.sum() + 5 * b.sum()
    value = scheduled_step(opt, [0.1, 1.0], loss, step=1, warmup=4, total=20)  # scale 0.5
    assert value == pytest.approx(8.0) and isinstance(value, float)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.5]
    assert a.item() == pytest.approx(1 - 0.05 * 3) and b.item() == pytest.approx(1 - 0.5 * 5)
