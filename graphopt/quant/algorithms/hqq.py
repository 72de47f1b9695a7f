"""HQQ-style calibration-free quantisation (half-quadratic optimisation of the zero point).

Asymmetric grid per group, w ~= (q - z) * s with q in [0, 2^bits - 1]. Starting from min/max, HQQ
alternates (Badri & Shaji 2023):
    e  = shrink_p(w - (q - z) s)             sparse outlier error under an l_p norm, p < 1
    z  = mean_group(q - (w - e) / s)         closed-form zero point given e
    q  = clamp(round(w / s + z))             re-quantise; beta *= kappa tightens the shrinkage
with shrink_p(x) = sign(x) * relu(|x| - |x|^(p-1) / beta). No data needed: the l_p error lets a few
large weights stay wrong so all the others fit better. The best iterate (plain l2 error) is kept.
"""

from __future__ import annotations

import torch

from ..config import HQQConfig
from graphopt.ops.packing import pack_int4

from ..schemes import QuantError, groups_of, hqq_initial
from .base import Target, Transformed

__all__ = ["hqq"]


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def hqq(cfg: HQQConfig, target: Target, t: Transformed) -> dict:
    scheme = target.scheme
    if scheme.weight not in ("int4", "int8") or scheme.activation != "none":
        raise QuantError(f"HQQ needs a weight-only integer scheme (w4a16, w8a16), got {scheme.name!r}")
    bits = 4 if scheme.weight == "int4" else 8
    if bits == 4 and target.k % 2:
        raise QuantError(f"{target.name}: int4 weights are stored two per byte along the input dimension, "
                         f"which must be even; got K={target.k}")
    groups = groups_of(target.k, target.config.group_size) if scheme.grouped else 1
    init = hqq_initial(t.weight, bits, groups)
    w = t.weight.float().unflatten(-1, (groups, -1))                          # [..., out, G, k]
    s, z = init["scale"].unsqueeze(-1), init["zero"].unsqueeze(-1)
    top = 2 ** bits - 1
    beta = cfg.beta
    best_z = z.clone()
    best_err = ((torch.round(w / s + z).clamp(0, top) - z) * s - w).square().sum(dim=-1, keepdim=True)
    for _ in range(cfg.iters):
        q = torch.round(w / s + z).clamp(0, top)
        e = _shrink(w - (q - z) * s, beta, cfg.lp_norm)
        z = (q - (w - e) / s).mean(dim=-1, keepdim=True)
        beta *= cfg.kappa
        err = ((torch.round(w / s + z).clamp(0, top) - z) * s - w).square().sum(dim=-1, keepdim=True)
        better = err < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, err, best_err)
    q = torch.round(w / s + best_z).clamp(0, top).flatten(-2).to(torch.uint8)
    return {"weight": pack_int4(q) if bits == 4 else q, "scale": init["scale"], "zero": best_z.squeeze(-1)}
