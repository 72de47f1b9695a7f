"""Quantisation schemes: what a weight (and its input activation) becomes, and the weight maths.

    scheme        weights                                        activations        kernel path
    w8a8          int8, symmetric, per output channel            int8 per token     int8 GEMM
    w8a8_static   int8, per output channel                       int8 per tensor    int8 GEMM
                                                                 (calibrated scale)
    w4a8          int4 per group, progressive: first int8 per    int8 per token     int4 -> int8 in the
                  channel (protective range +-119), then int4                         kernel, int8 GEMM
                  with an int8 scale per group (QServe)
    w8a16         int8 per output channel                        bf16               dequant + bf16 GEMM
    w4a16         int4 per group (symmetric; HQQ: asymmetric     bf16               dequant + bf16 GEMM
                  with a float zero point)
    fp8           e4m3 per output channel                        e4m3 per token     fp8 GEMM
    fp8_block     e4m3, one scale per 128x128 block (DeepSeek)   e4m3 per token per fp8 GEMM, block
                                                                 128 channels       scales inside K
    w2a16         int2 per group, asymmetric min/max with a      bf16               dequant + bf16 GEMM
                  float zero point (4 levels)
    hif8          HiFloat8 codes (uint8) per output channel,     bf16               table dequant +
                  abs-max scaled to 15 (3-bit mantissa range)                       bf16 GEMM
    nf4           NF4 codes (QLoRA's 16 normal quantiles) per    bf16               table dequant +
                  group, abs-max scale                                              bf16 GEMM
    bf16          not quantised (used in overrides / mixed precision)

Weights are [out, K] or stacked experts [E, out, K]; the scale layouts are those of graphopt.ops.quant.
int4 weights (w4a8, w4a16, HQQ's w4a16) and NF4 codes come out packed two per byte along K, uint8
[..., out, K/2], int2 (w2a16) four (graphopt/ops/packing.py): the form they keep in memory, in the
Program and on disk.
`clip` arguments are per-group ratios in (0, 1] that shrink the abs-max a scale is computed from
(clipping search chooses them; w2a16: the min and the max); None means plain round-to-nearest (RTN)
on the abs-max. Codebook schemes (hif8, nf4) carry their table as a `codebook` tensor, so the
dequantisation (graphopt::dequantize_lut) needs nothing but the tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graphopt.ops import quant as qops
from graphopt.ops.hifloat8 import hif8_encode, hif8_values
from graphopt.ops.packing import pack_int2, pack_int4, unpack_int4
from graphopt.ops.quant_schemes import SCHEMES, QuantError, Scheme, get_scheme

__all__ = ["Scheme", "SCHEMES", "QuantError", "get_scheme", "quantize_weight", "int_quantize",
           "W4A8_PROTECT", "HIF8_WEIGHT_MAX"]

W4A8_PROTECT = 119  # 7 * 17: int8 range of w4a8's first step, so int4 * int8 group scale never saturates
# A weight row's abs-max maps to 15 = 1.875 * 2^3, HiF8's largest value with 3 mantissa bits: the
# whole row then lies in the 3-bit binades [2^-3, 2^4) down to abs-max / 120 (smaller weights get
# 2 or 1 bits, relative precision they can spare); mapping it higher would put the largest weights
# on the 2-bit grid.
HIF8_WEIGHT_MAX = 15.0


# -- integer grids ---------------------------------------------------------------------------
def groups_of(k: int, group_size: int) -> int:
    """Number of groups along K; a group larger than K means one group (tiny test models)."""
    g = min(group_size, k)
    if k % g:
        raise QuantError(f"input dimension {k} is not a multiple of group_size {g}; "
                         f"choose a group_size that divides {k}")
    return k // g


def int_quantize(w: Tensor, qmax: int, groups: int, clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric RTN: w [..., out, K] -> q int8 in [-qmax, qmax] and scale fp32 [..., out, groups]."""
    tiles = w.float().unflatten(-1, (groups, -1))                          # [..., out, groups, K/g]
    amax = tiles.abs().amax(dim=-1)
    if clip is not None:
        amax = amax * clip
    scale = amax.clamp_min(qops.SCALE_FLOOR) / qmax
    q = torch.round(tiles / scale.unsqueeze(-1)).clamp_(-qmax, qmax)
    return q.flatten(-2).to(torch.int8), scale


def quantize_w4a8(w: Tensor, groups: int, clip: Tensor | None = None) -> dict[str, Tensor]:
    """Progressive int4: int8 per channel in +-119, then int4 per group with an int8 scale (1..17).

    w ~= scale[o] * q4[o, k] * group_scale[o, g(k)]; q4 * group_scale is an int8 by construction.
    `clip` [..., out, groups] shrinks each group's int8 range before the int4 step.
    """
    w8, scale = int_quantize(w, W4A8_PROTECT, 1)                            # [..., out, K], [..., out, 1]
    tiles = w8.float().unflatten(-1, (groups, -1))
    amax = tiles.abs().amax(dim=-1)
    if clip is not None:
        amax = amax * clip
    group_scale = torch.ceil(amax / 7).clamp_(1, 17)                        # integer, |q4 * s| <= 119
    q4 = torch.round(tiles / group_scale.unsqueeze(-1)).clamp_(-7, 7)
    return {"weight": pack_int4(q4.flatten(-2).to(torch.int8)), "group_scale": group_scale.to(torch.int8),
            "scale": scale}


def quantize_fp8(w: Tensor, block: int | None) -> dict[str, Tensor]:
    """e4m3 per output channel (block None) or per square tile of min(block, K) (ragged last row-block)."""
    if block is None:
        scale = w.float().abs().amax(dim=-1, keepdim=True).clamp_min(qops.SCALE_FLOOR) / qops.FP8_MAX
        return {"weight": (w.float() / scale).to(qops.FP8_DTYPE), "scale": scale}
    out, k = w.shape[-2], w.shape[-1]
    bk = min(block, k)
    if k % bk:
        raise QuantError(f"fp8_block needs the input dimension ({k}) to be a multiple of the block ({bk})")
    br = bk                       # square blocks: kernels read the block size off K / scale columns
    rows = math.ceil(out / br)
    pad = rows * br - out
    wp = torch.nn.functional.pad(w.float(), (0, 0, 0, pad))                # [..., rows*br, K]
    tiles = wp.unflatten(-2, (rows, br)).unflatten(-1, (k // bk, bk))       # [..., rows, br, nb, bk]
    scale = tiles.abs().amax(dim=(-3, -1)).clamp_min(qops.SCALE_FLOOR) / qops.FP8_MAX  # [..., rows, nb]
    q = (tiles / scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :out, :]
    return {"weight": q.to(qops.FP8_DTYPE), "scale": scale}


def hqq_initial(w: Tensor, bits: int, groups: int, clip: Tensor | None = None) -> dict[str, Tensor]:
    """Asymmetric min/max grid (HQQ's starting point, w2a16's RTN): q in [0, 2^bits - 1],
    w ~= (q - zero) * scale; `clip` [..., out, groups] shrinks both ends towards zero."""
    tiles = w.float().unflatten(-1, (groups, -1))
    lo, hi = tiles.amin(dim=-1), tiles.amax(dim=-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(qops.SCALE_FLOOR)
    zero = -lo / scale
    q = torch.round(tiles / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp_(0, 2 ** bits - 1)
    return {"weight": q.flatten(-2).to(torch.uint8), "scale": scale, "zero": zero}


def quantize_hif8(w: Tensor, clip: Tensor | None = None) -> dict[str, Tensor]:
    """HiFloat8 per output channel: codes = hif8(w / scale), scale = abs-max / HIF8_WEIGHT_MAX (saturating)."""
    amax = w.float().abs().amax(dim=-1, keepdim=True)                       # [..., out, 1]
    if clip is not None:
        amax = amax * clip
    scale = amax.clamp_min(qops.SCALE_FLOOR) / HIF8_WEIGHT_MAX
    codes = hif8_encode((w.float() / scale).clamp_(-HIF8_WEIGHT_MAX, HIF8_WEIGHT_MAX))
    return {"weight": codes, "scale": scale, "codebook": hif8_values(w.device).clone()}


def quantize_nf4(w: Tensor, groups: int, clip: Tensor | None = None) -> dict[str, Tensor]:
    """NF4 per group: the nearest of the 16 normal-float values to w / abs-max (ties: the lower one)."""
    tiles = w.float().unflatten(-1, (groups, -1))                           # [..., out, groups, K/g]
    amax = tiles.abs().amax(dim=-1)
    if clip is not None:
        amax = amax * clip
    scale = amax.clamp_min(qops.SCALE_FLOOR)
    book = qops.NF4_VALUES.to(w.device)
    v = (tiles / scale.unsqueeze(-1)).clamp_(-1, 1)
    codes = torch.bucketize(v, (book[1:] + book[:-1]) / 2)                  # index of the nearest entry
    return {"weight": pack_int4(codes.flatten(-2).to(torch.uint8)), "scale": scale, "codebook": book.clone()}


def quantize_weight(scheme: Scheme, w: Tensor, group_size: int, fp8_block: int,
                    clip: Tensor | None = None) -> dict[str, Tensor]:
    """Float weight [..., out, K] -> the scheme's tensors: weight, scale[, group_scale / zero / codebook]."""
    k = w.shape[-1]
    if scheme.quantized and not bool(torch.isfinite(w).all()):
        raise QuantError(f"{scheme.name}: the weight {tuple(w.shape)} holds NaN or Inf values; "
                         "a quantisation grid cannot represent them")
    if scheme.weight == "int8":
        q, s = int_quantize(w, 127, 1, clip)
        return {"weight": q, "scale": s}
    if k % scheme.per_byte:
        raise QuantError(f"{scheme.name}: {scheme.weight} weights are stored {scheme.per_byte} per byte along the "
                         f"input dimension, which must be a multiple of {scheme.per_byte}; got {tuple(w.shape)}")
    if scheme.weight == "int4" and scheme.activation == "int8_dynamic":
        return quantize_w4a8(w, groups_of(k, group_size), clip)
    if scheme.weight == "int4":
        q, s = int_quantize(w, 7, groups_of(k, group_size), clip)
        return {"weight": pack_int4(q), "scale": s}
    if scheme.weight == "int2":
        t = hqq_initial(w, 2, groups_of(k, group_size), clip)
        return {**t, "weight": pack_int2(t["weight"])}
    if scheme.weight == "hif8":
        return quantize_hif8(w, clip)
    if scheme.weight == "nf4":
        return quantize_nf4(w, groups_of(k, group_size), clip)
    if scheme.weight == "fp8":
        if clip is not None:
            raise QuantError("clipping search applies to integer schemes, not fp8")
        return quantize_fp8(w, fp8_block if scheme.blocked else None)
    raise QuantError(f"scheme {scheme.name!r} does not quantise weights")


def dequantize(t: dict[str, Tensor], scheme: Scheme) -> Tensor:
    """The float32 weight [..., out, K] a scheme's tensors stand for (in the smoothed/rotated basis)."""
    w = t["weight"]
    if scheme.weight == "int4" and "group_scale" in t:
        return qops.dequantize_weight(qops.widen_int4(unpack_int4(w, signed=True), t["group_scale"]),
                                      t["scale"], None, torch.float32)
    if scheme.weight == "int4":
        return qops.dequantize_int4(w, t["scale"], t.get("zero"), torch.float32)
    if scheme.weight == "int2":
        return qops.dequantize_int2(w, t["scale"], t["zero"], torch.float32)
    if scheme.weight == "nf4":
        return qops.dequantize_lut4(w, t["codebook"], t["scale"], torch.float32)
    if "codebook" in t:
        return qops.dequantize_lut(w, t["codebook"], t["scale"], torch.float32)
    if w.dtype == qops.FP8_DTYPE:
        s = t["scale"]
        if s.shape[-1] == 1 and s.shape[-2] == w.shape[-2]:
            return w.float() * s
        bk = w.shape[-1] // s.shape[-1]                                     # square blocks
        full = s.repeat_interleave(bk, dim=-2)[..., : w.shape[-2], :].repeat_interleave(bk, dim=-1)
        return w.float() * full
    return qops.dequantize_weight(w, t["scale"], t.get("zero"), torch.float32)


def weight_bits_per_element(scheme: Scheme, k: int, group_size: int) -> float:
    """Storage bits per weight including scales (fp32 per channel / group), for size budgets."""
    if not scheme.quantized:
        return 16.0
    bits = float(scheme.weight_bits)
    if scheme.grouped:
        g = min(group_size, k)
        bits += (8 if scheme.activation == "int8_dynamic" else 32) / g   # int8 / fp32 group scales
        if scheme.weight == "int2":
            bits += 32 / g                                               # and fp32 zero points
    return bits + 32.0 / k                                               # per-channel fp32 scale
