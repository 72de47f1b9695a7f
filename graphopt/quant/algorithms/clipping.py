"""Clipping search: shrink each weight group's range when that lowers the linear's output error.

Round-to-nearest on the abs-max wastes grid steps on a few large weights; clipping them to r * max
(r < 1) makes every other step finer. Which r is best depends on the inputs, so it is chosen per
output channel (per (channel, group) for grouped schemes) on calibration rows x:

    err_o(r) = sum_rows (x (w_o - Q_r(w_o))^T)^2            (base.weight_error)

grid: every r in ClippingConfig.grid, the best kept independently per entry.
learnable ("learnable clipping", OmniQuant's LWC idea): r = sigmoid(theta) per entry, trained by
Adam on the same error with straight-through rounding, started from the grid's answer; an entry keeps
the grid's r unless the learnt one is better under the scheme's real quantiser.
"""

from __future__ import annotations

import math

import torch

from ..config import ClippingConfig, LearnableClippingConfig
from ..schemes import dequantize, quantize_weight
from .base import Target, Transformed, group_count, rows_in_basis, weight_error

__all__ = ["grid_clipping", "learnable_clipping"]


def _errors(target: Target, t: Transformed, x, ratio: torch.Tensor) -> torch.Tensor:
    c = target.config
    wq = dequantize(quantize_weight(target.scheme, t.weight, c.group_size, c.fp8_block, clip=ratio), target.scheme)
    return weight_error(x, t.weight, wq, group_count(target))


def _grid(target: Target, t: Transformed, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ratio per entry and its error, both [..., out, groups]."""
    x = rows_in_basis(target.search_rows(), t)
    shape = (*t.weight.shape[:-1], group_count(target))
    dev = t.weight.device
    best_r = torch.ones(shape, device=dev)
    best_e = torch.full(shape, math.inf, device=dev)
    for r in grid:
        e = _errors(target, t, x, torch.full(shape, float(r), device=dev))
        better = e < best_e
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        best_e = torch.where(better, e, best_e)
    return best_r, best_e


def grid_clipping(cfg: ClippingConfig, target: Target, t: Transformed) -> dict:
    ratio, _ = _grid(target, t, cfg.grid)
    c = target.config
    out = quantize_weight(target.scheme, t.weight, c.group_size, c.fp8_block, clip=ratio)
    t.meta["clip_mean"] = float(ratio.mean())
    return out


def learnable_clipping(cfg: LearnableClippingConfig, target: Target, t: Transformed) -> dict:
    grid_r, grid_e = _grid(target, t, cfg.grid)
    x = rows_in_basis(target.search_rows(), t)
    groups = group_count(target)
    qmax = 127 if target.scheme.weight == "int8" else 7
    w = t.weight.unflatten(-1, (groups, -1))                                    # [..., out, G, k]
    amax = w.abs().amax(dim=-1).clamp_min(1e-8)
    theta = torch.logit(grid_r.clamp(0.02, 0.999)).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    scale_x = 1.0 / float(x.square().mean().clamp_min(1e-12))                  # keeps the loss O(1)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            step = (torch.sigmoid(theta) * amax / qmax).unsqueeze(-1)
            v = w / step
            q = (torch.round(v) - v).detach() + v                               # straight-through round
            wq = q.clamp(-qmax, qmax) * step
            loss = weight_error(x, t.weight, wq.flatten(-2), groups).mean() * scale_x
            opt.zero_grad()
            loss.backward()
            opt.step()
    learnt = torch.sigmoid(theta.detach())
    learnt_e = _errors(target, t, x, learnt)
    ratio = torch.where(learnt_e < grid_e, learnt, grid_r)
    t.meta["clip_mean"] = float(ratio.mean())
    c = target.config
    return quantize_weight(target.scheme, t.weight, c.group_size, c.fp8_block, clip=ratio)
