"""CUDA implementations of the quantised GEMM ops: int8 x int8 -> int32 on the int8 tensor cores
(`torch._int_mm`, cuBLASLt) and e4m3 x e4m3 with per-token x per-channel scales on the FP8 tensor
cores (`torch._scaled_mm`, rowwise scaling).

The reference ops (`graphopt/ops/quant.py`) compute the int8 product with a float BLAS where that
is provably exact and upcast FP8 to float32: each call makes a float copy of the weight, so a
quantised step read more bytes than a bf16 one. Here the weight is read once, in its own dtype:

    int8_matmul  x int8 [..., N, K], w int8 [out, K]  -> int32 [..., N, out]   exact (integer maths:
                 bit-identical to the reference). cuBLASLt wants more than 16 rows and K, out
                 multiples of 8: fewer rows are padded with zero rows (a decode step reads the
                 weight once either way); other shapes and batched weights use the reference.
    fp8_linear   per-channel scales only (x_scale [..., N, 1], w_scale [out, 1]), a bfloat16 output
                 and K, out multiples of 16; the product accumulates in float32 in the tensor core
                 and is scaled in its epilogue (bf16 tolerance against the reference). DeepSeek's
                 128x128 block scales, other output dtypes and shapes use the reference.

    int8_matmul, one row ("int8_gemv" in kernels/__init__.py): gemv.py's GEMV program with int32
                 products and sums, no padding to 17 rows; bit-identical to the reference. Measured
                 on an H100 (`python benchmarks/quant_gemm.py`, benchmarks/results/quant_gemm_h100.md):
                 q_proj 3072 x 2048 4.0 us against cuBLASLt's 9.1 and bf16's 5.3, kv_a_proj 2.7
                 (9.1, 6.0), o_proj 3.2 (9.1, 5.3), dense down 11.1 (27.1, 18.9), lm_head 69.4
                 (80.0, 143): 1.3-2.3x a bf16 GEMM at every V2-Lite linear, 0.53-1.02 of copy
                 bandwidth.

w4a8_matmul takes its int4 weight packed two per byte (uint8 [out, K/2], graphopt/ops/packing.py);
up to 16 rows w4a8_gemm.py reads the packed bytes, above that its reference unpacks and widens it to
an int8 copy and calls int8_matmul, reaching the int8 kernel here;
dequantize_int4 (w4a16) has no CUDA kernel and runs its reference.

    quantized_moe_experts  the reference runs each expert on its routed tokens, which needs the
                 per-expert counts on the host: a CUDA graph cannot capture that. While a graph is
                 being captured, the experts run without host synchronisation instead: with no more
                 (token, expert) assignments than experts (decode), each assignment gathers its
                 expert's quantised tensors (only the selected experts are read); otherwise every
                 expert runs on every token and the routing weights (zero where not routed) combine
                 them (each expert read once). Outside capture (prefill) the reference runs.
                 With the opt-in "int8_moe" route, w8a8 experts at decode sizes run int8_moe.py's
                 two Triton launches instead (captured or not), reading the chosen experts in place.
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from ....ops import quant as _quant
from ....ops.quant_linear import QuantizedLinear, eager_call, emit_linear, moe_linears
from . import gemv, int8_moe

__all__ = ["ROUTE_ROWS", "available", "register", "int8_matmul_cuda", "fp8_linear_cuda", "moe_without_sync"]

_MIN_ROWS = 17   # torch._int_mm on CUDA: more than 16 rows
# rows up to which int8_matmul takes each GEMV route (0: off), set by kernels/__init__.py when the route
# registers: "int8_gemv" (one [out, K] weight), "int8_expert_gemv" (rows per batch entry of batched
# weights, opt-in) and "int8_moe" (w8a8 routed experts in int8_moe.py's two launches, one row per
# assignment, opt-in)
ROUTE_ROWS = {"int8_gemv": 0, "int8_expert_gemv": 0, "int8_moe": 0}


def available() -> bool:
    return torch.cuda.is_available() and hasattr(torch, "_int_mm") and hasattr(torch, "_scaled_mm")


def _batched_gemv_ok(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """[B or 1, M, K] x [B, N, K] with M <= ROUTE_ROWS["int8_expert_gemv"], int8, unit column strides:
    the decode step's routed experts (one row per assignment against its gathered expert, moe_without_sync below)."""
    return (x_q.dim() == w_q.dim() == 3 and 0 < x_q.shape[1] <= ROUTE_ROWS["int8_expert_gemv"]
            and x_q.shape[0] in (1, w_q.shape[0]) and w_q.shape[0] > 0 and gemv.takes(x_q, w_q, int8=True))


def _int_mm_ok(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    k, out = x_q.shape[-1], w_q.shape[-2]
    return w_q.dim() == 2 and k == w_q.shape[-1] and k % 8 == 0 and out % 8 == 0 and x_q.is_cuda and w_q.is_cuda


def int8_matmul_cuda(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, x_q.shape[-1])
    m = x2.shape[0]
    if 0 < m <= ROUTE_ROWS["int8_gemv"] and w_q.dim() == 2 and gemv.takes(x2, w_q, int8=True):
        return gemv.int8_gemv(x2, w_q).reshape(*lead, w_q.shape[0])
    if _batched_gemv_ok(x_q, w_q):
        return gemv.int8_gemv_batched(x_q, w_q)
    if not _int_mm_ok(x_q, w_q):
        return _quant.int8_matmul._init_fn(x_q, w_q)
    if m < _MIN_ROWS:
        x2 = torch.cat([x2, x2.new_zeros(_MIN_ROWS - m, x2.shape[1])])
    y = torch._int_mm(x2.contiguous(), w_q.t())          # w [out, K] row-major = [K, out] column-major
    return y[:m].reshape(*lead, w_q.shape[0])


def _scaled_mm_ok(x_q, x_scale, w_q, w_scale, out_dtype) -> bool:
    k, out = x_q.shape[-1], w_q.shape[-2]
    return (w_q.dim() == 2 and out_dtype == torch.bfloat16 and k % 16 == 0 and out % 16 == 0
            and x_scale.shape[-1] == 1 and tuple(w_scale.shape) == (out, 1) and x_q.is_cuda)


def fp8_linear_cuda(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    if not _scaled_mm_ok(x_q, x_scale, w_q, w_scale, out_dtype):
        return _quant.fp8_linear._init_fn(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, x_q.shape[-1]).contiguous()
    sa = x_scale.reshape(-1, 1).float().expand(x2.shape[0], 1).contiguous()
    sb = w_scale.reshape(1, -1).float().contiguous()
    y = torch._scaled_mm(x2, w_q.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                         bias=None if bias is None else bias.to(torch.bfloat16))
    return y.reshape(*lead, w_q.shape[0])


def _stacked(q: QuantizedLinear, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """x [A or 1, c, K] through the stacked linear q, its [E, ...] tensors indexed by `index` (or all)."""
    if q.scheme == "bf16":
        w = q.tensors["weight"] if index is None else q.tensors["weight"][index]
        return torch.matmul(x, w.transpose(-1, -2))
    t = {k: (v if v.dim() != 3 or index is None else v[index]) for k, v in q.tensors.items()}
    part = QuantizedLinear(q.scheme, t, q.rotate_block, q.act_block, q.input_zero, q.meta)
    return emit_linear(eager_call, x, part, t, x.dtype)


def quantized_moe_experts_cuda(x, weights, ids, gate_up, down, gate_up_scheme, down_scheme, params):
    up, dn = moe_linears(gate_up, down, gate_up_scheme, down_scheme, params)
    if ROUTE_ROWS["int8_moe"] and int8_moe.takes(x, ids, up, dn):
        return int8_moe.moe_experts(x, weights, ids, up, dn)
    if not torch.cuda.is_current_stream_capturing():
        return _quant.quantized_moe_experts._init_fn(x, weights, ids, gate_up, down, gate_up_scheme,
                                                     down_scheme, params)
    return moe_without_sync(x, weights, ids, up, dn)


def moe_without_sync(x, weights, ids, up: QuantizedLinear, dn: QuantizedLinear) -> torch.Tensor:
    """The routed experts with no host synchronisation (what a CUDA graph captures); equals
    `sparse_moe` up to float summation order (every quantiser is row-wise)."""
    n, k = ids.shape
    experts = up.tensors["weight"].shape[0]
    if n * k <= experts:                                   # one row per assignment, its expert gathered
        flat = ids.reshape(-1)
        xa = x.repeat_interleave(k, dim=0).unsqueeze(1)                              # [A, 1, H]
        gate, u = _stacked(up, xa, flat).chunk(2, dim=-1)
        y = _stacked(dn, F.silu(gate) * u, flat).squeeze(1).float()                  # [A, H]
        y = y * weights.reshape(-1, 1).float()
        return y.reshape(n, k, -1).sum(dim=1).to(x.dtype)
    gate, u = _stacked(up, x.unsqueeze(0), None).chunk(2, dim=-1)                   # [E, N, I]
    y = _stacked(dn, F.silu(gate) * u, None).float()                                # [E, N, H]
    dense = torch.zeros(experts, n, dtype=torch.float32, device=x.device)
    dense.scatter_add_(0, ids.t().long(), weights.t().float())                        # [E, N] routing weights
    return torch.einsum("en,enh->nh", dense, y).to(x.dtype)


def register() -> None:
    _quant.int8_matmul.register_kernel("cuda")(int8_matmul_cuda)
    _quant.fp8_linear.register_kernel("cuda")(fp8_linear_cuda)
    _quant.quantized_moe_experts.register_kernel("cuda")(quantized_moe_experts_cuda)
