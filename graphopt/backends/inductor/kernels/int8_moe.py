"""W8A8 routed experts at decode sizes in two Triton launches: graphopt::quantized_moe_experts for
int8 per-channel weights with int8 per-token dynamic activations (scheme "w8a8"), one program group
per (token, expert) assignment, reading each chosen expert's int8 weights in place.

The CUDA graph path of the op (`quant_gemm.moe_without_sync`) gathers every chosen expert's int8
tensors into copies, then runs the linear op sequence (quantise, int8 matmul, dequantise, SwiGLU,
quantise, int8 matmul, dequantise, weight, sum) as ~25 small kernels per MoE layer. Here, with
A = N * k assignments (a = n * k + j: token n's j-th expert e = ids[n, j]):

  1. `_gate_up_kernel`, grid (A, cdiv(I, BLOCK_N)): token n's row times the expert's smoothing
     vector (if any), its abs-max over H (every program of the row recomputes it: H values), the
     row quantised to int8 (scale = max(absmax, 1e-8) / 127, round half to even, clamp to +-127), the
     int32 dot products with the expert's gate and up rows for BLOCK_N columns (CUDA cores; one row
     per assignment needs no MMA), dequantised as acc * x_scale * w_scale in float32 and rounded to
     x's dtype, then silu(gate) * up with the reference's rounding points -> inter [A, I] in x.dtype.
  2. `_down_kernel`, grid (A, cdiv(H, BLOCK_N)): the same for inter's row against the expert's down
     weight -> the expert output rounded to x.dtype, times the routing weight in float32 -> [A, H].
  3. the k terms of a token summed in float32 and cast to x.dtype (torch).

Numerics against the reference (`ops.quant_linear.sparse_moe` through `emit_linear`): the quantised
activations, their scales and the int32 products are the reference's exactly (the same float32
maths in the same order); the dequantised gate / up equal the reference's bits; silu uses Triton's
exp (one-ulp differences in bf16 can move a quantised intermediate by one step); the k terms are
summed in slot order. What it takes (`takes`): both linears "w8a8" without bias, rotation or group
scales, int8 weights [E, out, K] with a unit stride along K, scales [E, out, 1], smoothing vectors
[E, 1, K], [K] or none; x float32 / bfloat16 / float16; at most as many assignments as experts
(decode: each assignment reads its expert once; more assignments would re-read shared experts).

Opt-in (`GRAPHOPT_ENABLE_KERNELS=int8_moe`, kernels/__init__.py) until its GPU tests have passed and it
has been timed against the gathered path; bit-exact int32 and bf16-tolerance results are tested
under Triton's interpreter on the CPU (tests/backends/test_int8_moe_kernel.py).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ....ops.quant_linear import QuantizedLinear

try:
    import triton
    import triton.language as tl
except ImportError:            # the module still imports; available() says False
    triton = None

__all__ = ["available", "moe_experts", "takes"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QMAX = 127.0
_SCALE_FLOOR = 1e-8            # ops/quant.py's SCALE_FLOOR: the smallest abs-max a scale is computed from


def available() -> bool:
    """Triton importable, and a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) to run on."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    # float32 rounded to x's dtype at the reference's rounding points (emulated on the bits where the
    # interpreter truncates bf16): the MoE kernel's helper
    from .moe import _round as _round_to

    @triton.jit
    def _row_scale(row_ptr, smooth_ptr, K: tl.constexpr, BLOCK_K: tl.constexpr, SMOOTH: tl.constexpr):
        # max(|row * smooth|, 1e-8) / 127 over the K values of one row, in float32
        offs = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs
            v = tl.load(row_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            if SMOOTH:
                v = v * tl.load(smooth_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        return tl.maximum(tl.max(amax, axis=0), 1e-8) / 127.0

    @triton.jit
    def _quantized(row_ptr, smooth_ptr, ks, k_ok, scale, SMOOTH: tl.constexpr):
        # the row's values at ks as int32 in -127..127: v / scale rounded half to even (torch.round),
        # on |v / scale| so that every step is exact (its floor and fraction), the sign put back after
        v = tl.load(row_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        if SMOOTH:
            v = v * tl.load(smooth_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        t = v / scale
        a = tl.abs(t)
        r = tl.floor(a)
        f = a - r
        odd = r - 2.0 * tl.floor(r * 0.5) != 0.0
        r = tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)
        r = tl.minimum(r, 127.0)
        return tl.where(t < 0, -r, r).to(tl.int32)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, ids_ptr, w_ptr, w_scale_ptr, smooth_ptr, inter_ptr,
        stride_xn, stride_we, stride_wo, stride_se, stride_so, stride_me, stride_in,
        TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr, SMOOTH: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        a, tile = tl.program_id(0), tl.program_id(1)
        token = a // TOP_K
        expert = tl.load(ids_ptr + a).to(tl.int64)
        x_row = x_ptr + token.to(tl.int64) * stride_xn
        smooth = smooth_ptr + expert * stride_me
        x_scale = _row_scale(x_row, smooth, HIDDEN, BLOCK_K, SMOOTH)

        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)                      # columns of I: gate, and up at + I
        col_ok = cols < INTER
        offs_k = tl.arange(0, BLOCK_K)
        w_gate = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wo
        w_up = w_gate + INTER * stride_wo
        acc_g = tl.zeros([BLOCK_N], dtype=tl.int32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < HIDDEN
            q = _quantized(x_row, smooth, ks, k_ok, x_scale, SMOOTH)[None, :]          # [1, BLOCK_K]
            ok = col_ok[:, None] & k_ok[None, :]
            acc_g += tl.sum(q * tl.load(w_gate + ks[None, :], mask=ok, other=0).to(tl.int32), axis=1)
            acc_u += tl.sum(q * tl.load(w_up + ks[None, :], mask=ok, other=0).to(tl.int32), axis=1)

        # dequantised as the reference's acc.float() * x_scale * w_scale, rounded to x's dtype
        scales = w_scale_ptr + expert * stride_se
        s_g = tl.load(scales + cols * stride_so, mask=col_ok, other=0.0)
        s_u = tl.load(scales + (cols + INTER) * stride_so, mask=col_ok, other=0.0)
        out_ty = inter_ptr.dtype.element_ty
        g = _round_to(acc_g.to(tl.float32) * x_scale * s_g, out_ty, EMULATE_BF16)
        u = _round_to(acc_u.to(tl.float32) * x_scale * s_u, out_ty, EMULATE_BF16)
        act = _round_to(g / (1.0 + tl.exp(-g)), out_ty, EMULATE_BF16)            # silu in x.dtype
        h = _round_to(act * u, out_ty, EMULATE_BF16)
        tl.store(inter_ptr + a.to(tl.int64) * stride_in + cols, h.to(out_ty), mask=col_ok)

    @triton.jit
    def _down_kernel(
        inter_ptr, ids_ptr, weights_ptr, w_ptr, w_scale_ptr, smooth_ptr, out_ptr,
        stride_in, stride_we, stride_wo, stride_se, stride_so, stride_me, stride_om,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, SMOOTH: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        a, tile = tl.program_id(0), tl.program_id(1)
        expert = tl.load(ids_ptr + a).to(tl.int64)
        row = inter_ptr + a.to(tl.int64) * stride_in
        smooth = smooth_ptr + expert * stride_me
        h_scale = _row_scale(row, smooth, INTER, BLOCK_K, SMOOTH)

        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)                      # columns of H
        col_ok = cols < HIDDEN
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wo
        acc = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k0 in range(0, INTER, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < INTER
            q = _quantized(row, smooth, ks, k_ok, h_scale, SMOOTH)[None, :]
            acc += tl.sum(q * tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
                          .to(tl.int32), axis=1)
        s = tl.load(w_scale_ptr + expert * stride_se + cols * stride_so, mask=col_ok, other=0.0)
        y = _round_to(acc.to(tl.float32) * h_scale * s, inter_ptr.dtype.element_ty, EMULATE_BF16)
        route_w = tl.load(weights_ptr + a)
        tl.store(out_ptr + a.to(tl.int64) * stride_om + cols, y * route_w, mask=col_ok)


def _plain_w8a8(q: QuantizedLinear) -> bool:
    t = q.tensors
    w, scale, smooth = t.get("weight"), t.get("scale"), t.get("smooth_inv")
    return (q.scheme == "w8a8" and not q.rotate_block and set(t) <= {"weight", "scale", "smooth_inv"}
            and w is not None and w.dtype == torch.int8 and w.dim() == 3 and w.stride(-1) == 1
            and scale is not None and tuple(scale.shape) == (*w.shape[:2], 1) and scale.dtype == torch.float32
            and (smooth is None or (smooth.dtype == torch.float32 and smooth.stride(-1) == 1
                                    and tuple(smooth.shape) in ((w.shape[2],), (w.shape[0], 1, w.shape[2])))))


def takes(x: Tensor, ids: Tensor, gate_up: QuantizedLinear, down: QuantizedLinear) -> bool:
    """Whether these experts run here (see the module doc); else the caller's path runs."""
    if not (available() and _plain_w8a8(gate_up) and _plain_w8a8(down) and x.dim() == 2 and x.dtype in _DTYPES
            and x.stride(-1) == 1 and ids.dim() == 2):
        return False
    e, two_i, h = gate_up.tensors["weight"].shape
    return (tuple(down.tensors["weight"].shape) == (e, h, two_i // 2) and two_i % 2 == 0 and h == x.shape[1]
            and 0 < ids.numel() <= e)


def _smooth_arg(q: QuantizedLinear, like: Tensor) -> tuple[Tensor, int, bool]:
    """The smoothing vector, its per-expert stride (0 when shared) and whether there is one."""
    smooth = q.tensors.get("smooth_inv")
    if smooth is None:
        return like, 0, False                                  # never read
    return smooth, smooth.stride(0) if smooth.dim() == 3 else 0, True


def _block(n: int, largest: int) -> int:
    return max(16, min(largest, triton.next_power_of_2(n)))


def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, gate_up: QuantizedLinear, down: QuantizedLinear) -> Tensor:
    """x [N, H], weights / ids [N, k] -> [N, H] in x.dtype: the routed experts of a w8a8 MoE layer
    (`takes` must hold). No host synchronisation: a CUDA graph can capture it."""
    if not takes(x, ids, gate_up, down):
        raise ValueError("int8_moe.moe_experts: takes w8a8 gate_up [E, 2I, H] / down [E, H, I] int8 weights (unit "
                         "stride along K) with [E, out, 1] float32 scales, no bias, rotation or group scale, "
                         "smoothing [E, 1, K], [K] or none; x [N, H] float32 / bfloat16 / float16; at most E "
                         f"assignments; and triton with a device to run on. Got x {tuple(x.shape)} {x.dtype}, "
                         f"ids {tuple(ids.shape)}, schemes {gate_up.scheme} / {down.scheme}")
    n, top_k = ids.shape
    w_gu, s_gu = gate_up.tensors["weight"], gate_up.tensors["scale"]
    w_dn, s_dn = down.tensors["weight"], down.tensors["scale"]
    _, two_i, hidden = w_gu.shape
    inter_size = two_i // 2
    assignments = n * top_k
    flat_ids = ids.reshape(-1).contiguous()
    flat_weights = weights.reshape(-1).float().contiguous()
    emulate = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"

    inter = x.new_empty((assignments, inter_size))
    smooth, smooth_stride, has_smooth = _smooth_arg(gate_up, s_gu)
    block_n = _block(inter_size, 32)
    _gate_up_kernel[(assignments, triton.cdiv(inter_size, block_n))](
        x, flat_ids, w_gu, s_gu, smooth, inter,
        x.stride(0), w_gu.stride(0), w_gu.stride(1), s_gu.stride(0), s_gu.stride(1), smooth_stride, inter.stride(0),
        TOP_K=top_k, HIDDEN=hidden, INTER=inter_size, SMOOTH=has_smooth, BLOCK_N=block_n,
        BLOCK_K=_block(hidden, 256), EMULATE_BF16=emulate, num_warps=4)

    terms = torch.empty((assignments, hidden), dtype=torch.float32, device=x.device)
    smooth, smooth_stride, has_smooth = _smooth_arg(down, s_dn)
    block_n = _block(hidden, 32)
    _down_kernel[(assignments, triton.cdiv(hidden, block_n))](
        inter, flat_ids, flat_weights, w_dn, s_dn, smooth, terms,
        inter.stride(0), w_dn.stride(0), w_dn.stride(1), s_dn.stride(0), s_dn.stride(1), smooth_stride, terms.stride(0),
        HIDDEN=hidden, INTER=inter_size, SMOOTH=has_smooth, BLOCK_N=block_n,
        BLOCK_K=_block(inter_size, 256), EMULATE_BF16=emulate, num_warps=4)
    return terms.view(n, top_k, hidden).sum(1).to(x.dtype)
