"""SmoothQuant: move activation outliers into the weight with a per-input-channel scale.

    s_j = max|X_j|^alpha / max|W_j|^beta   (SmoothQuant: beta = 1 - alpha)
    X @ W^T = (X / s) @ (W * s)^T          exactly, before quantisation

max|W_j| is taken over every output row that reads input channel j: over `out` for a linear and over
`E x out` for the experts' gate_up (all experts read the same token); the experts' down_proj reads a
different input per expert, so it gets one scale vector per expert ([E, 1, K]). With scope "input"
(SmoothQuantConfig.scope) it is taken over every smoothed linear that reads the same tensor
(Target.column_amax: `shared_column_amax` of their weights, grouped by quantize_model and by the
graph pass quant_insert alike), so those linears share one s, which folds into the norm that
produced the tensor (msModelSlim's layout).
The division is fused into the activation quantiser (smooth_inv), never a separate pass over X.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import QuantConfig, SmoothQuantConfig
from .base import Target, Transformed

__all__ = ["smooth", "smoothquant", "column_amax", "shared_column_amax", "shares_input_factor"]

_FLOOR = 1e-5  # channels that never fire (or all-zero weight columns) keep a finite scale


def smooth(target: Target, alpha: float, beta: float) -> Transformed:
    a = target.observer.channel_amax().float().clamp_min(_FLOOR)                 # [K] or [E, K]
    w = target.weight
    if target.observer.per_expert:
        w_amax = w.abs().amax(dim=-2)                                           # [E, K]
    elif target.column_amax is not None:
        w_amax = target.column_amax                                             # [K], shared by the input's readers
    else:
        w_amax = column_amax(w)
    s = (a.pow(alpha) / w_amax.clamp_min(_FLOOR).pow(beta)).clamp_min(_FLOOR)
    if target.observer.per_expert:
        s = s.unsqueeze(-2)                                                     # [E, 1, K]
    return Transformed(weight=w * s, smooth_inv=1.0 / s, meta={"alpha": alpha, "beta": beta})


def column_amax(w: Tensor) -> Tensor:
    """max|W_j| over every row reading input channel j: w [out, K] or [E, out, K] -> [K]."""
    return w.abs().reshape(-1, w.shape[-1]).amax(dim=0)


def shared_column_amax(weights: list[Tensor]) -> Tensor:
    """max|W_j| over every row of every weight reading one input (each [out, K] or [E, out, K]) -> [K]:
    Target.column_amax of each of them, so that they get one s."""
    return torch.stack([column_amax(w) for w in weights]).amax(dim=0)


def shares_input_factor(config: QuantConfig) -> bool:
    """SmoothQuant with scope "input": the smoothed linears reading one tensor share one factor."""
    t = config.transform
    return isinstance(t, SmoothQuantConfig) and t.scope == "input"


def smoothquant(cfg: SmoothQuantConfig, target: Target) -> Transformed:
    return smooth(target, cfg.alpha, 1.0 - cfg.alpha)
