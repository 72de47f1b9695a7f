"""graphopt:: quantisation ops: reference implementations that define what the fast kernels compute.

A quantised linear is spelled as explicit nodes so a graph dump shows where precision changes:

    int8 activations, int8 weights (w8a8, dynamic per token):
        x_q, x_s = graphopt.quantize_per_token(x, smooth_inv, 127)     # int8 [..., K], fp32 [..., 1]
        acc      = graphopt.int8_matmul(x_q, w_q)                       # int32 [..., N, out]
        y        = graphopt.dequantize_int32(acc, x_s, w_s, bias, bf16) # [..., N, out]
    static activations: graphopt.quantize_per_tensor(x, scale, zero, smooth_inv, -128, 127)
    int4 weights, int8 activations (w4a8): graphopt.w4a8_matmul(x_q, w_packed, w_group_scale) instead of
        int8_matmul; it unpacks the int4 (two a byte) and widens it to int8 by the int8 group scale, so
        accumulation stays integer
    weight only (w8a16): W = graphopt.dequantize_weight(w_q, w_s, w_zero, bf16); aten.linear(x, W)
    packed weight only: W = graphopt.dequantize_int4(w_packed, w_s, w_zero, bf16) (w4a16, two a byte),
        graphopt.dequantize_int2(w_packed, w_s, w_zero, bf16) (w2a16, four a byte), unpacking inside
    codebook weights (hif8, nf4): W = graphopt.dequantize_lut(codes, codebook, w_s, bf16): codebook[code] * scale
        (nf4: graphopt.dequantize_lut4, its codes packed two a byte)
    fp8 (e4m3): graphopt.quantize_fp8 + graphopt.fp8_linear (block scales act inside the K loop, so
        matmul and dequantisation are one op there)
    latent KV cache (C8): graphopt.quantize_kv / graphopt.dequantize_kv, static per-channel scales

Conventions (shared with `graphopt.quant.schemes`, which produces the weights):
  * weights are [out, K] or stacked experts [E, out, K]; int4 / nf4 weights are packed two per byte
    along K, uint8 [..., out, K/2], int2 four (graphopt/ops/packing.py), unpacked inside the op;
    matmuls broadcast like
    `torch.matmul(x, w.transpose(-1, -2))`, so x [N, K] against [E, out, K] gives [E, N, out];
  * weight scales are [..., out, K // group] (per channel: one group, [..., out, 1]); fp8 block scales
    are [..., out / 128, K / 128];
  * rounding is round-half-to-even (`torch.round`), then a saturating clamp; the reciprocal is never
    taken: q = round(x / scale). Scales are float32 and never zero (a zero row gets scale 1e-8 / qmax,
    the row quantises to zeros);
  * integer matmuls are exact int32 results (int8 x int8 products summed over K < 2^17 cannot
    overflow), so the reference result is the bit pattern a correct kernel must produce.

Each op has a fake (meta) implementation so torch.export and FX see shapes and dtypes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .packing import INT4_OFFSET, check_packed, unpack_int2, unpack_int4

__all__ = ["SCALE_FLOOR", "FP8_MAX", "FP8_DTYPE", "hadamard_matrix", "normal_float_codebook", "NF4_VALUES"]

SCALE_FLOOR = 1e-8  # smallest abs-max a scale is computed from; keeps all-zero rows finite
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def _smoothed(x: Tensor, smooth_inv: Optional[Tensor]) -> Tensor:
    x = x.float()
    return x if smooth_inv is None else x * smooth_inv.float()


# -- activation quantisation -------------------------------------------------------------------
@torch.library.custom_op("graphopt::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor, smooth_inv: Optional[Tensor], qmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 per token (last dim): x [..., K] -> q int8 [..., K], scale fp32 [..., 1].

    smooth_inv [K] (or broadcastable, e.g. [E, 1, K] for per-expert inputs) multiplies x first: the
    SmoothQuant division X / s, fused as Ascend's npu_dynamic_quant(smooth_scales=) does.
    """
    xs = _smoothed(x, smooth_inv)
    scale = xs.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR) / qmax
    q = torch.round(xs / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


@quantize_per_token.register_fake
def _(x, smooth_inv, qmax):
    shape = torch.broadcast_shapes(x.shape, smooth_inv.shape) if smooth_inv is not None else x.shape
    return (x.new_empty(shape, dtype=torch.int8), x.new_empty((*shape[:-1], 1), dtype=torch.float32))


@torch.library.custom_op("graphopt::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: Tensor, scale: Tensor, zero_point: int, smooth_inv: Optional[Tensor],
                        qmin: int, qmax: int) -> Tensor:
    """Static int8: q = clamp(round(x * smooth_inv / scale) + zero_point, qmin, qmax); scale is a 0-d fp32."""
    q = torch.round(_smoothed(x, smooth_inv) / scale.float()) + zero_point
    return q.clamp_(qmin, qmax).to(torch.int8)


@quantize_per_tensor.register_fake
def _(x, scale, zero_point, smooth_inv, qmin, qmax):
    shape = torch.broadcast_shapes(x.shape, smooth_inv.shape) if smooth_inv is not None else x.shape
    return x.new_empty(shape, dtype=torch.int8)


# -- integer matmuls ---------------------------------------------------------------------------
def _matmul_out_shape(x: Tensor, w: Tensor) -> tuple[int, ...]:
    batch = torch.broadcast_shapes(x.shape[:-2], w.shape[:-2])
    return (*batch, x.shape[-2], w.shape[-2])


def _check_k(op: str, x: Tensor, w: Tensor) -> None:
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"graphopt::{op}: x has K={x.shape[-1]} but the weight {tuple(w.shape)} "
                         f"has K={w.shape[-1]} (weights are [..., out, K])")


_EXACT_FP32_K = (1 << 24) // (128 * 128)  # K up to which every partial sum of int8 products is < 2^24


@torch.library.custom_op("graphopt::int8_matmul", mutates_args=())
def int8_matmul(x_q: Tensor, w_q: Tensor) -> Tensor:
    """int8 [..., N, K] x int8 [..., out, K] -> exact int32 [..., N, out] (x @ w^T, broadcasting).

    Computed with a float BLAS where that is provably exact: every partial sum is an integer of
    magnitude <= K * 128^2, exactly representable in float32 for K <= 1024 (in float64 far beyond),
    whatever the summation order, so the result is bit-identical to int32 accumulation.
    """
    _check_k("int8_matmul", x_q, w_q)
    dtype = torch.float32 if x_q.shape[-1] <= _EXACT_FP32_K else torch.float64
    return torch.matmul(x_q.to(dtype), w_q.to(dtype).transpose(-1, -2)).to(torch.int32)


@int8_matmul.register_fake
def _(x_q, w_q):
    return x_q.new_empty(_matmul_out_shape(x_q, w_q), dtype=torch.int32)


def widen_int4(w_q4: Tensor, group_scale: Tensor) -> Tensor:
    """int4 values [..., out, K] (int8) times int8 group scales [..., out, K/G] -> int8 [..., out, K].

    The product is an exact integer; the saturating clamp to +-127 only bites for weights that were
    not produced by `schemes.quantize_w4a8` (its protective range keeps |q4 * s_g| <= 119).
    """
    groups = group_scale.shape[-1]
    w = w_q4.to(torch.int32).unflatten(-1, (groups, -1)) * group_scale.to(torch.int32).unsqueeze(-1)
    return w.flatten(-2).clamp_(-127, 127).to(torch.int8)


@torch.library.custom_op("graphopt::w4a8_matmul", mutates_args=())
def w4a8_matmul(x_q: Tensor, w_packed: Tensor, w_group_scale: Tensor) -> Tensor:
    """int8 x [..., N, K] against packed int4 w (uint8 [..., out, K/2], two a byte, graphopt/ops/packing.py)
    with int8 group scales [..., out, K/G] -> exact int32 [..., N, out].

    QServe-style progressive dequantisation: int4 -> int8 inside the op (unpack, times the group
    scale), then the int8 GEMM (graphopt::int8_matmul, so a registered int8 kernel serves it too); the
    per-channel float scale is applied later by dequantize_int32.
    """
    check_packed("w4a8_matmul", w_packed, 2, x_q.shape[-1])
    return int8_matmul(x_q, widen_int4(unpack_int4(w_packed, signed=True), w_group_scale))


@w4a8_matmul.register_fake
def _(x_q, w_packed, w_group_scale):
    check_packed("w4a8_matmul", w_packed, 2, x_q.shape[-1])
    return x_q.new_empty(_matmul_out_shape(x_q, w_packed), dtype=torch.int32)


@torch.library.custom_op("graphopt::dequantize_int32", mutates_args=())
def dequantize_int32(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                     out_dtype: torch.dtype) -> Tensor:
    """acc int32 [..., N, out] * x_scale [..., N, 1] (or 0-d) * w_scale [..., out, 1] (+ bias) in fp32."""
    y = acc.float() * x_scale.float() * w_scale.float().transpose(-1, -2)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@dequantize_int32.register_fake
def _(acc, x_scale, w_scale, bias, out_dtype):
    return acc.new_empty(acc.shape, dtype=out_dtype)


# -- weight-only ---------------------------------------------------------------------------------
@torch.library.custom_op("graphopt::dequantize_weight", mutates_args=())
def dequantize_weight(w_q: Tensor, scale: Tensor, zero: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """Integer weight [..., out, K] -> (w_q - zero) * scale per group, in out_dtype.

    scale / zero are [..., out, K/G] float32 (zero: HQQ's float zero point; None for symmetric).
    """
    return _dequantize_groups(w_q.float(), scale, zero, out_dtype)


@dequantize_weight.register_fake
def _(w_q, scale, zero, out_dtype):
    return w_q.new_empty(w_q.shape, dtype=out_dtype)


def _dequantize_groups(values: Tensor, scale: Tensor, zero: Tensor | float | None, out_dtype: torch.dtype) -> Tensor:
    """(values - zero) * scale per group: values [..., out, K] float32, scale / zero [..., out, K/G]."""
    w = values.unflatten(-1, (scale.shape[-1], -1))
    if zero is not None:
        w = w - (zero.float().unsqueeze(-1) if isinstance(zero, Tensor) else zero)
    return (w * scale.float().unsqueeze(-1)).flatten(-2).to(out_dtype)


@torch.library.custom_op("graphopt::dequantize_int4", mutates_args=())
def dequantize_int4(w_packed: Tensor, scale: Tensor, zero: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """Packed int4 weight uint8 [..., out, K/2] -> (nibble - zero) * scale per group, [..., out, K] in out_dtype.

    Nibbles are 0..15 (graphopt/ops/packing.py). zero [..., out, K/G] float32: HQQ's asymmetric grid;
    None: symmetric int4, stored offset by 8, so zero = 8 (the same value the unpacked int8 held).
    """
    check_packed("dequantize_int4", w_packed)
    zero = zero if zero is not None else float(INT4_OFFSET)
    return _dequantize_groups(unpack_int4(w_packed, signed=False).float(), scale, zero, out_dtype)


@dequantize_int4.register_fake
def _(w_packed, scale, zero, out_dtype):
    check_packed("dequantize_int4", w_packed)
    return w_packed.new_empty((*w_packed.shape[:-1], 2 * w_packed.shape[-1]), dtype=out_dtype)


@torch.library.custom_op("graphopt::dequantize_int2", mutates_args=())
def dequantize_int2(w_packed: Tensor, scale: Tensor, zero: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Packed int2 weight uint8 [..., out, K/4] (codes 0..3, four a byte) -> (code - zero) * scale per
    group, [..., out, K] in out_dtype; zero [..., out, K/G] float32 (w2a16's asymmetric grid)."""
    check_packed("dequantize_int2", w_packed, 4)
    return _dequantize_groups(unpack_int2(w_packed).float(), scale, zero, out_dtype)


@dequantize_int2.register_fake
def _(w_packed, scale, zero, out_dtype):
    check_packed("dequantize_int2", w_packed, 4)
    return w_packed.new_empty((*w_packed.shape[:-1], 4 * w_packed.shape[-1]), dtype=out_dtype)


def normal_float_codebook(bits: int = 4) -> Tensor:
    """QLoRA's NormalFloat codebook, float32 [2^bits] ascending in [-1, 1] (NF4 for bits=4).

    Quantiles of N(0, 1), normalised by the largest: 2^(bits-1) positive ones at probabilities
    evenly spaced from `offset` to 1/2 (exclusive), 2^(bits-1) - 1 negative ones the same way, and an
    exact zero. offset = 1 - (1/(2(n-1)) + 1/(2n)) / 2 with n = 2^bits (0.9677 for NF4) keeps the end
    quantiles finite (Dettmers et al. 2023, appendix E).
    """
    n = 2 ** bits
    offset = 1 - (1 / (2 * (n - 1)) + 1 / (2 * n)) / 2
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return (values / values.max()).sort().values.float()


NF4_VALUES = normal_float_codebook(4)


@torch.library.custom_op("graphopt::dequantize_lut", mutates_args=())
def dequantize_lut(codes: Tensor, codebook: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Codebook weight [..., out, K] -> codebook[code] * scale per group, in out_dtype.

    codes uint8 [..., out, K] index codebook float32 [L] (NF4: L = 16; HiFloat8: the 256-entry decode
    table of graphopt.ops.hifloat8); scale float32 [..., out, K/G] (per channel: [..., out, 1]).
    """
    groups = scale.shape[-1]
    w = codebook.float()[codes.long()].unflatten(-1, (groups, -1))
    return (w * scale.float().unsqueeze(-1)).flatten(-2).to(out_dtype)


@dequantize_lut.register_fake
def _(codes, codebook, scale, out_dtype):
    return codes.new_empty(codes.shape, dtype=out_dtype)


@torch.library.custom_op("graphopt::dequantize_lut4", mutates_args=())
def dequantize_lut4(codes_packed: Tensor, codebook: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dequantize_lut with 4-bit codes packed two per byte: uint8 [..., out, K/2] -> [..., out, K] (NF4)."""
    check_packed("dequantize_lut4", codes_packed)
    return dequantize_lut._init_fn(unpack_int4(codes_packed, signed=False), codebook, scale, out_dtype)


@dequantize_lut4.register_fake
def _(codes_packed, codebook, scale, out_dtype):
    check_packed("dequantize_lut4", codes_packed)
    return codes_packed.new_empty((*codes_packed.shape[:-1], 2 * codes_packed.shape[-1]), dtype=out_dtype)


# -- fp8 -------------------------------------------------------------------------------------------
@torch.library.custom_op("graphopt::quantize_fp8", mutates_args=())
def quantize_fp8(x: Tensor, smooth_inv: Optional[Tensor], block: int) -> tuple[Tensor, Tensor]:
    """Dynamic e4m3: per token (block=0, scale [..., 1]) or per token per `block` channels ([..., K/block])."""
    xs = _smoothed(x, smooth_inv)
    k = xs.shape[-1]
    tiles = xs.unflatten(-1, (k // block if block else 1, -1))                  # [..., nb, b]
    scale = tiles.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR) / FP8_MAX
    q = (tiles / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).flatten(-2)
    return q, scale.squeeze(-1)


@quantize_fp8.register_fake
def _(x, smooth_inv, block):
    shape = torch.broadcast_shapes(x.shape, smooth_inv.shape) if smooth_inv is not None else x.shape
    nb = shape[-1] // block if block else 1
    return x.new_empty(shape, dtype=FP8_DTYPE), x.new_empty((*shape[:-1], nb), dtype=torch.float32)


@torch.library.custom_op("graphopt::fp8_linear", mutates_args=())
def fp8_linear(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
               out_dtype: torch.dtype) -> Tensor:
    """e4m3 x [..., N, K] and w [..., out, K] -> [..., N, out], fp32 accumulation.

    Per channel: x_scale [..., N, 1], w_scale [..., out, 1]. DeepSeek blocks: x_scale [..., N, K/128],
    w_scale [..., ceil(out/128), K/128] (square blocks, the last row-block may be ragged); every 128-wide K slice is scaled before it is summed.
    """
    _check_k("fp8_linear", x_q, w_q)
    x, w = x_q.float(), w_q.float()
    if x_scale.shape[-1] == 1 and w_scale.shape[-1] == 1 and w_scale.shape[-2] == w.shape[-2]:  # per channel
        y = torch.matmul(x, w.transpose(-1, -2)) * x_scale.float() * w_scale.float().transpose(-1, -2)
    else:
        nb = x_scale.shape[-1]
        block = w.shape[-1] // nb                                                # square weight blocks
        ws = w_scale.float().repeat_interleave(block, dim=-2)[..., : w.shape[-2], :]  # [..., out, nb]
        xt, wt = x.unflatten(-1, (nb, -1)), w.unflatten(-1, (nb, -1))            # [..., N, nb, b], [..., out, nb, b]
        partial = torch.matmul(xt.transpose(-2, -3), wt.transpose(-2, -3).transpose(-1, -2))  # [..., nb, N, out]
        scaled = partial * x_scale.float().transpose(-1, -2).unsqueeze(-1) * ws.transpose(-1, -2).unsqueeze(-2)
        y = scaled.sum(dim=-3)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@fp8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return x_q.new_empty(_matmul_out_shape(x_q, w_q), dtype=out_dtype)


# -- latent KV cache (C8) --------------------------------------------------------------------------
@torch.library.custom_op("graphopt::quantize_kv", mutates_args=())
def quantize_kv(x: Tensor, scale: Tensor) -> Tensor:
    """Static symmetric int8 per channel: x [..., C], scale fp32 [C] -> int8 [..., C]."""
    return torch.round(x.float() / scale.float()).clamp_(-127, 127).to(torch.int8)


@quantize_kv.register_fake
def _(x, scale):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("graphopt::dequantize_kv", mutates_args=())
def dequantize_kv(q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """int8 [..., C] * scale [C] -> out_dtype: what attention reads back from an int8 cache."""
    return (q.float() * scale.float()).to(out_dtype)


@dequantize_kv.register_fake
def _(q, scale, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype)


# -- routed experts ----------------------------------------------------------------------------------
@torch.library.custom_op("graphopt::quantized_moe_experts", mutates_args=())
def quantized_moe_experts(x: Tensor, weights: Tensor, ids: Tensor, gate_up: list[Optional[Tensor]],
                          down: list[Optional[Tensor]], gate_up_scheme: str, down_scheme: str,
                          params: list[int]) -> Tensor:
    """graphopt::moe_experts (sparse routed experts) with quantised stacked matmuls.

    x [N, H]; weights / ids [N, top_k]; gate_up / down: the tensors of a quantised [E, out, K] matmul in
    graphopt.ops.quant_linear.TENSOR_FIELDS order (None where the scheme has none; scheme "bf16": just
    the float weight); params [rotate_block, act_block, input_zero] of gate_up
    then down. Each expert runs only on its routed tokens, through the same op sequence as a
    quantised linear (every quantiser is row-wise, so this equals the dense dispatch up to float
    summation order). Out: [N, H] in x.dtype, accumulated in float32.
    """
    from .quant_linear import moe_linears, sparse_moe  # imported late: it imports this module

    return sparse_moe(x, weights, ids, *moe_linears(gate_up, down, gate_up_scheme, down_scheme, params))


@quantized_moe_experts.register_fake
def _(x, weights, ids, gate_up, down, gate_up_scheme, down_scheme, params):
    return torch.empty_like(x)


# -- rotation ----------------------------------------------------------------------------------------
def hadamard_matrix(n: int, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal Sylvester Hadamard matrix [n, n] (n a power of two), fp32, on `device` (default: CPU)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device if device is not None else "cpu")
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


@torch.library.custom_op("graphopt::hadamard_transform", mutates_args=())
def hadamard_transform(x: Tensor, block: int) -> Tensor:
    """x [..., K] -> x rotated by a block-diagonal orthonormal Hadamard (blocks of `block` channels).

    The weight was rotated the same way offline (W H), so (x H)(W H)^T = x W^T while outliers are
    spread over each block before quantisation (QuaRot).
    """
    h = hadamard_matrix(block, x.device)
    return torch.matmul(x.float().unflatten(-1, (-1, block)), h).flatten(-2).to(x.dtype)


@hadamard_transform.register_fake
def _(x, block):
    return torch.empty_like(x)
