"""FlexSmooth (msModelSlim's flexible SmoothQuant): s = A^alpha / W^beta with both exponents searched.

Per linear, on its calibration rows, minimising the output error of the fully quantised linear
(activations and weights on the scheme's RTN grid) against the float one:
  stage 1: alpha over the grid with beta = 1 - alpha (plain SmoothQuant family);
  stage 2: that alpha fixed, beta over its grid.
"No smoothing" is also a candidate, so the result is never worse than RTN on the calibration rows.
The chosen (alpha, beta) go into the linear's metadata and are saved with the weights.
"""

from __future__ import annotations

import torch

from ..config import FlexSmoothConfig
from ..qlinear import QuantizedLinear, eager_call, emit_linear
from ..schemes import quantize_weight
from .base import Target, Transformed, rows_in_basis

__all__ = ["flexsmooth", "quantized_output_error"]


def quantized_output_error(target: Target, t: Transformed) -> float:
    """Mean squared error of the RTN-quantised linear on the target's rows vs the float linear."""
    x = target.rows()
    cfg = target.config
    tensors = quantize_weight(target.scheme, t.weight, cfg.group_size, cfg.fp8_block)
    if t.smooth_inv is not None:
        tensors["smooth_inv"] = t.smooth_inv
    if target.scheme.activation == "int8_static":
        x_s = rows_in_basis(x, t).abs().amax() / 127
        tensors["input_scale"] = x_s.clamp_min(1e-8)
    q = QuantizedLinear(target.scheme.name, tensors, rotate_block=t.rotate_block,
                        act_block=min(cfg.fp8_block, target.k) if target.scheme.blocked else 0)
    ref = torch.matmul(x, target.weight.transpose(-1, -2))
    got = emit_linear(eager_call, x, q, tensors, torch.float32)
    return float((got - ref).square().mean())


def flexsmooth(cfg: FlexSmoothConfig, target: Target) -> Transformed:
    from .smoothquant import smooth

    best = Transformed(weight=target.weight, meta={"alpha": None, "beta": None})
    best_err = quantized_output_error(target, best)
    alpha_best = None
    for alpha in cfg.alpha_grid:                                   # stage 1: beta = 1 - alpha
        t = smooth(target, alpha, 1.0 - alpha)
        err = quantized_output_error(target, t)
        if err < best_err:
            best, best_err, alpha_best = t, err, alpha
    if alpha_best is not None:
        for beta in cfg.beta_grid:                                 # stage 2: alpha fixed
            t = smooth(target, alpha_best, beta)
            err = quantized_output_error(target, t)
            if err < best_err:
                best, best_err = t, err
    best.meta["output_mse"] = best_err
    return best
