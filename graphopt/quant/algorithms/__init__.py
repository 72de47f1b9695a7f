"""Quantisation algorithms, found through registries keyed by their config's type (no if-chains).

    TRANSFORMS[type(cfg)](cfg, target) -> Transformed          SmoothQuant, FlexSmooth, Hadamard
    WEIGHT_METHODS[type(cfg)](cfg, target, transformed) -> {weight, scale, ...}
                                                               RTN, grid / learnable clipping, HQQ

`quantize_target` runs one target through its config's transform and weight method and adds what
the activation side needs (smooth_inv, a static input scale), giving a QuantizedLinear.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import (ClippingConfig, FlexSmoothConfig, HadamardConfig, HQQConfig, LearnableClippingConfig,
                      RTNConfig, SmoothQuantConfig)
from ..observers import mse_threshold
from ..qlinear import QuantizedLinear
from .base import Target, Transformed, rows_in_basis
from .clipping import grid_clipping, learnable_clipping
from .flexsmooth import flexsmooth
from .hadamard import hadamard
from .hqq import hqq
from .rtn import rtn
from .smoothquant import smoothquant

__all__ = ["TRANSFORMS", "WEIGHT_METHODS", "Target", "Transformed", "quantize_target", "register"]

TRANSFORMS: dict[type, Callable] = {
    SmoothQuantConfig: smoothquant,
    FlexSmoothConfig: flexsmooth,
    HadamardConfig: hadamard,
}
WEIGHT_METHODS: dict[type, Callable] = {
    RTNConfig: rtn,
    ClippingConfig: grid_clipping,
    LearnableClippingConfig: learnable_clipping,
    HQQConfig: hqq,
}


def register(config_type: type, fn: Callable, *, transform: bool) -> None:
    """Add an algorithm: `fn(cfg, target)` for a transform, `fn(cfg, target, transformed)` otherwise."""
    (TRANSFORMS if transform else WEIGHT_METHODS)[config_type] = fn


def quantize_target(target: Target) -> QuantizedLinear:
    cfg = target.config
    transform = cfg.transform
    needs_data = transform is not None or target.scheme.activation == "int8_static" or \
        not isinstance(cfg.weight_method, (RTNConfig, HQQConfig))
    if needs_data and target.observer is None:
        raise RuntimeError(f"{target.name}: {cfg.transform or cfg.weight_method} / {target.scheme.name} "
                           "needs calibration statistics, but this matmul was not observed")
    t = TRANSFORMS[type(transform)](transform, target) if transform else Transformed(weight=target.weight)
    tensors = WEIGHT_METHODS[type(cfg.weight_method)](cfg.weight_method, target, t)
    if t.smooth_inv is not None:
        tensors["smooth_inv"] = t.smooth_inv.float()
    if target.scheme.activation == "int8_static":
        tensors["input_scale"] = _static_input_scale(target, t)
    if target.bias is not None:
        tensors["bias"] = target.bias.float()
    act_block = min(cfg.fp8_block, target.k) if target.scheme.blocked else 0
    meta = {k: v for k, v in t.meta.items() if v is not None}
    return QuantizedLinear(target.scheme.name, tensors, rotate_block=t.rotate_block, act_block=act_block,
                           meta=meta)


def _static_input_scale(target: Target, t: Transformed) -> torch.Tensor:
    """Per-tensor int8 scale (per expert for per-expert inputs, [E, 1, 1]) at the MSE-optimal threshold.

    Unsmoothed, unrotated inputs use the observer's full histogram; otherwise a histogram of the
    sampled rows mapped into the weight's basis.
    """
    obs = target.observer
    if t.smooth_inv is None and not t.rotate_block and not obs.per_expert:
        return torch.tensor(mse_threshold(obs.hist, obs.hist_max) / 127, dtype=torch.float32,
                            device=target.weight.device)
    x = rows_in_basis(obs.rows().float(), t).abs()
    per = x if obs.per_expert else x.unsqueeze(0)                                 # [E or 1, R, K]
    scales = []
    for part in per:
        top = float(part.max())
        hist = torch.histc(part.flatten(), obs.bins, 0.0, top).double() if top > 0 else obs.hist * 0
        scales.append(mse_threshold(hist, top) / 127)
    s = torch.tensor(scales, dtype=torch.float32, device=target.weight.device)
    return s.view(-1, 1, 1) if obs.per_expert else s[0]
