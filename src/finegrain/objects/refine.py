"""Stage B of MaO: refine an image's descriptor so each crop's relevance map matches its object's mask.

Relevance map: Grad-CAM on the image tower's last feature map. For a crop
with feature map F (C, h, w), GeM vector g_c = (mean_xy F_cxy^p)^(1/p) and
descriptor v, the score is s = v . g. Its gradient is

    ds/dF_cxy = v_c * g_c^(1-p) * F_cxy^(p-1) / (h w)

so Grad-CAM's channel weights (the gradient averaged over the grid) are
v_c * w_c with w_c = g_c^(1-p) * mean_xy F_cxy^(p-1) / (h w), and the map is

    E(v)_xy = ReLU( sum_c v_c w_c F_cxy ) = ReLU( v . A_xy ),   A = w * F.

The tower is frozen, so A is computed once per crop and E is linear in v
before the ReLU: the optimisation needs no backward pass through the CNN
(tested against autograd Grad-CAM in tests/test_objects.py).

Two objectives (``ObjectConfig.refine_variant``), over objects i = 1..n
(the first ``refine_objects`` proposals; crop 0 is the whole image), with
m_i the object's mask inside crop i (its region, or its box), v kept on the
unit sphere, Adam for ``refine_iters`` steps:

* ``paper`` (MaO as published):

      max_v  sum_i softIoU( E_i(v) / max E_i(v), m_i )  +  alpha * v . sum_i v_i

  starting from the plain average of the object crops' vectors; the anchor
  sums the object crops only; alpha 0.03, step 0.1 by default.

* ``finegrain`` (default):

      max_v  mean_i softIoU( E_i(v) / max E_i(v), m_i )  +  alpha * v . sum_{i>=0} v_i

  starting from the ``pool_p`` generalised-mean descriptor; the anchor sums
  every crop vector, the whole image's included. Averaging keeps alpha's
  weight independent of the number of objects; Adam is invariant to the
  loss scale, so with 24 objects this acts like the paper's sum with
  alpha = 0.72. The default step (1e-3, not the paper's 0.1) is the largest
  that did not wreck retrieval on needles: on a 1280-d unit vector, 0.1 per
  coordinate per step replaces the descriptor within a few steps
  (docs/mao.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.base import l2_normalize
from .config import ObjectConfig
from .descriptor import GEM_P


def gradcam_operators(fmaps: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """(K, C, h, w) feature maps -> (K, C, h*w) operators A with Grad-CAM map = ReLU(v @ A)."""
    x = fmaps.float().clamp(min=eps)
    k, c, h, w = x.shape
    g = x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)  # (K, C)
    weights = g.pow(1.0 - p) * x.pow(p - 1.0).mean(dim=(-2, -1)) / (h * w)  # (K, C)
    return (weights[:, :, None, None] * x).reshape(k, c, h * w)


def relevance_maps(v: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """(K, h*w) Grad-CAM maps of descriptor ``v`` (C,), each scaled to a maximum of 1."""
    e = torch.relu(torch.einsum("c,kcn->kn", v, ops))
    return e / (e.amax(dim=1, keepdim=True) + 1e-8)


def soft_iou(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(K,) soft IoU of maps and masks in [0, 1] (both (K, n))."""
    inter = (maps * masks).sum(dim=1)
    union = (maps + masks - maps * masks).sum(dim=1)
    return inter / union.clamp(min=1e-8)


def stage_b_objective(v: torch.Tensor, vectors: torch.Tensor, ops: torch.Tensor, grid: torch.Tensor,
                      config: ObjectConfig) -> dict[str, torch.Tensor]:
    """The terms Stage B maximises for unit descriptor ``v`` (C,).

    ``vectors`` (N, C): crop vectors, row 0 the whole image; ``ops`` (n, C,
    h*w) and ``grid`` (n, h*w): Grad-CAM operators and masks of objects
    1..n. Returns ``iou`` (n,) per object, ``iou_term`` (their sum for
    ``paper``, mean for ``finegrain``), ``anchor`` (v . the anchor sum) and
    ``objective`` = ``iou_term + alpha * anchor``.
    """
    n = len(ops)
    iou = soft_iou(relevance_maps(v, ops), grid)
    if config.refine_variant == "paper":
        iou_term, anchor = iou.sum(), v @ vectors[1:1 + n].sum(dim=0)
    else:
        iou_term, anchor = iou.mean(), v @ vectors.sum(dim=0)
    return {"iou": iou, "iou_term": iou_term, "anchor": anchor, "objective": iou_term + config.alpha * anchor}


def stage_b_start(initial: np.ndarray, vectors: np.ndarray, n_obj: int, config: ObjectConfig) -> np.ndarray:
    """Where the optimisation starts: ``initial`` (finegrain) or the plain average of object crops 1..n_obj (paper)."""
    if config.refine_variant == "paper":
        return np.asarray(vectors[1:1 + n_obj], np.float32).mean(axis=0)
    return np.asarray(initial, np.float32)


def refine_descriptor(initial: np.ndarray, vectors: np.ndarray, fmaps: torch.Tensor, masks: np.ndarray,
                      config: ObjectConfig) -> np.ndarray:
    """The Stage B descriptor of one image (L2-normalised, (C,)).

    ``initial``: the fused descriptor (the ``finegrain`` start; the
    ``paper`` variant starts from the object crops' average instead);
    ``vectors`` (N, C): crop vectors (row 0 the whole image); ``fmaps`` (N,
    C, h, w): their feature maps; ``masks`` (N, r, r): object masks inside
    the crops. Objects 1..``refine_objects`` enter the objective.
    """
    n_obj = min(len(vectors) - 1, config.refine_objects)
    if n_obj <= 0 or config.refine_iters <= 0:
        return np.asarray(initial, np.float32)
    with torch.enable_grad(), torch.inference_mode(False):
        maps = fmaps[1:1 + n_obj].clone()
        ops = gradcam_operators(maps)
        grid = object_grid(masks, n_obj, maps.shape[-2:])
        crops = torch.from_numpy(np.ascontiguousarray(vectors)).float()
        u = torch.tensor(stage_b_start(initial, vectors, n_obj, config), requires_grad=True)
        opt = torch.optim.Adam([u], lr=config.step_size)
        for _ in range(config.refine_iters):
            v = u / u.norm().clamp(min=1e-8)
            loss = -stage_b_objective(v, crops, ops, grid, config)["objective"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = u.detach().numpy()
    return l2_normalize(out[None])[0]


def object_grid(masks: np.ndarray, n_obj: int, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(n_obj, h*w) masks of objects 1..n_obj pooled onto the (h, w) feature grid."""
    grid = (int(size[0]), int(size[1]))
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(masks[1:1 + n_obj]))[:, None], grid)
    return pooled[:, 0].reshape(n_obj, -1)


def refinement_gain(initial: np.ndarray, refined: np.ndarray, fmaps: torch.Tensor, masks: np.ndarray,
                    n_obj: int) -> tuple[float, float]:
    """Mean soft IoU of the object crops' maps before and after refinement (a diagnostic)."""
    ops = gradcam_operators(fmaps[1:1 + n_obj])
    grid = object_grid(masks, n_obj, fmaps.shape[-2:])
    before = soft_iou(relevance_maps(torch.from_numpy(initial).float(), ops), grid).mean().item()
    after = soft_iou(relevance_maps(torch.from_numpy(refined).float(), ops), grid).mean().item()
    return before, after
