"""SmoothQuant: move activation outliers into the weight with a per-input-channel scale.

    s_j = max|X_j|^alpha / max|W_j|^beta   (SmoothQuant: beta = 1 - alpha)
    X @ W^T = (X / s) @ (W * s)^T          exactly, before quantisation

max|W_j| is taken over every output row that reads input channel j: over `out` for a linear and over
`E x out` for the experts' gate_up (all experts read the same token); the experts' down_proj reads a
different input per expert, so it gets one scale vector per expert ([E, 1, K]).
The division is fused into the activation quantiser (smooth_inv), never a separate pass over X.
"""

from __future__ import annotations

from ..config import SmoothQuantConfig
from .base import Target, Transformed

__all__ = ["smooth", "smoothquant"]

_FLOOR = 1e-5  # channels that never fire (or all-zero weight columns) keep a finite scale


def smooth(target: Target, alpha: float, beta: float) -> Transformed:
    a = target.observer.channel_amax().float().clamp_min(_FLOOR)                 # [K] or [E, K]
    w = target.weight
    if target.observer.per_expert:
        w_amax = w.abs().amax(dim=-2)                                           # [E, K]
    else:
        w_amax = w.abs().reshape(-1, w.shape[-1]).amax(dim=0)                   # [K]
    s = (a.pow(alpha) / w_amax.clamp_min(_FLOOR).pow(beta)).clamp_min(_FLOOR)
    if target.observer.per_expert:
        s = s.unsqueeze(-2)                                                     # [E, 1, K]
    return Transformed(weight=w * s, smooth_inv=1.0 / s, meta={"alpha": alpha, "beta": beta})


def smoothquant(cfg: SmoothQuantConfig, target: Target) -> Transformed:
    return smooth(target, cfg.alpha, 1.0 - cfg.alpha)
