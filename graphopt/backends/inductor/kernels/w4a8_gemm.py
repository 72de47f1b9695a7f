"""CUDA implementation of graphopt::w4a8_matmul: the packed int4 weight read as it is stored (Triton).

The op (graphopt/ops/quant.py) multiplies int8 activations x [..., M, K] by an int4 weight packed two
a byte (uint8 [out, K/2], low nibble = even k, graphopt/ops/packing.py) with int8 group scales
[out, K/G], QServe's progressive form: w8 = clamp(w4 * s_g, +-127) is an int8 weight, and the
product is exact int32. Its reference unpacks and widens the whole weight to an int8 copy per call
(1.5 bytes read and 1 written per weight, then 1 read again by the int8 GEMM). Here one program owns
BLOCK_N output columns for BLOCK_M rows and, per tile of packed bytes,

    p = W[n, j]            (uint8: weights 2j and 2j+1, the only large read: half a byte a weight)
    lo, hi = p & 15 - 8, p >> 4 - 8                              int4 -> int32 in registers
    w_lo, w_hi = clamp(lo * S[n, 2j // G]), clamp(hi * S[n, (2j+1) // G])   int8, as widen_int4
    acc += x[:, 2j] @ w_lo^T + x[:, 2j+1] @ w_hi^T               int8 x int8 -> int32 tensor cores

so the even and odd columns of x meet the low and high nibbles without interleaving them. Integer
maths throughout: bit-identical to the reference in any order. Rows are padded to BLOCK_M >= 16
(tl.dot's minimum) by masking, K's tail by masked loads (x = 0 there). Batched (per-expert) weights
and non-CUDA tensors run the reference. Equal to the reference on the H200 (its GPU tests, 6 shapes,
before split-K) and, with split-K and the tiles below, on an H100 at the 7 V2-Lite linears x 1-128
rows that benchmarks/quant_gemm.py checks bit for bit before timing each.

Up to MAX_ROWS rows K is also split so that a decode-size GEMM has about two programs per SM (q_proj
at one row: 96 column tiles x 3 splits); each split adds its int32 partial sums atomically into a
zeroed output, exact in any order.

Measured on an H100 (`python benchmarks/quant_gemm.py`, benchmarks/results/quant_gemm_w4a8_h100.md;
history in benchmarks/NOTES.md): at 1-8 rows 7-15x faster than the reference path it replaces
(q_proj 3072 x 2048 at one row: 18.5 against 150 us; kv_a_proj 6.2 against 47) but 1.0-4.1x slower
than a bf16 GEMM (0.03-0.11 of copy bandwidth: the work per byte inside a program is the limit). From
32 rows it is no faster than the reference at small layers (kv_a_proj, 32 rows: 76.8 against 52.4
us), so w4a8_matmul_cuda runs it up to MAX_ROWS = 16 rows and the reference above. Tiles are the
best of a sweep (`--w4a8-sweep`, benchmarks/results/w4a8_tiles_h100.md, q_proj, no split): 16 x 32
columns x 128 packed bytes, 4 warps up to 16 rows; 64 x 32 x 256, 8 warps above.

At one row the GEMV form (`w4a8_gemv`: the same widening, products and sums on the CUDA cores in
gemv.py's program shape, no 16-row MMA tile) is faster still, measured on an H100 (the same command,
benchmarks/results/quant_gemm_h100.md): q_proj 5.5 us (the MMA kernel 18.3, bf16 5.3), kv_a_proj 3.4
(6.2, 6.0), o_proj 4.3 (12.9, 5.3), dense gate_up 25.2 (83.8, 33.6), dense down 20.4 (63.8, 18.9),
lm_head 113 (327, 143): 0.9-1.8x a bf16 GEMM. So w4a8_matmul_cuda runs it at GEMV_MAX_ROWS = 1 row.
The form takes any M and is bit-identical at 1-4 rows (interpreter and GPU tests) but 2-4 rows have
not been timed; raising GEMV_MAX_ROWS waits for `python benchmarks/quant_gemm.py --rows 1 2 4`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ....ops import quant as _quant
from ....ops.packing import check_packed

try:
    import triton
    import triton.language as tl
except ImportError:            # the module still imports; available() says False
    triton = None

__all__ = ["ROUTE_ROWS", "available", "register", "w4a8_gemm", "w4a8_gemv", "w4a8_matmul_cuda"]


def available() -> bool:
    """Triton importable, and a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) to run on."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _widen(nibbles, scale):
        # int4 nibble codes (0..15, value + 8) times the int8 group scale, saturated as widen_int4 does
        return tl.minimum(tl.maximum((nibbles - 8) * scale, -127), 127).to(tl.int8)

    @triton.jit
    def _w4a8_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, stride_x, stride_w, stride_s, stride_out,
                     KP: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_KP: tl.constexpr, SPLIT_K: tl.constexpr):
        # KP (packed bytes of K) and GROUP are compile-time: one build per layer shape, a static loop.
        # Split-K: program k of SPLIT_K takes the byte tiles k, k + SPLIT_K, ... and adds its int32
        # partial sums into the zeroed output atomically (integer addition: exact in any order)
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for t in range(0, (KP + BLOCK_KP * SPLIT_K - 1) // (BLOCK_KP * SPLIT_K)):
            offs_j = (t * SPLIT_K + pid_k) * BLOCK_KP + tl.arange(0, BLOCK_KP)      # packed byte index
            j_ok = offs_j < KP
            w_mask = n_ok[:, None] & j_ok[None, :]
            packed = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_j[None, :],
                             mask=w_mask, other=0).to(tl.int32)                       # [BLOCK_N, BLOCK_KP]
            s_lo = tl.load(s_ptr + offs_n[:, None] * stride_s + (2 * offs_j // GROUP)[None, :],
                           mask=w_mask, other=0).to(tl.int32)
            s_hi = tl.load(s_ptr + offs_n[:, None] * stride_s + ((2 * offs_j + 1) // GROUP)[None, :],
                           mask=w_mask, other=0).to(tl.int32)
            w_lo = _widen(packed & 15, s_lo)
            w_hi = _widen(packed >> 4, s_hi)
            x_mask = m_ok[:, None] & j_ok[None, :]
            x_row = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + 2 * offs_j[None, :]
            x_even = tl.load(x_row, mask=x_mask, other=0)                             # [BLOCK_M, BLOCK_KP] int8
            x_odd = tl.load(x_row + 1, mask=x_mask, other=0)
            acc = tl.dot(x_even, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(x_odd, tl.trans(w_hi), acc, out_dtype=tl.int32)
        out = out_ptr + offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])
        else:
            tl.atomic_add(out, acc, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")

    @triton.jit
    def _w4a8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, stride_x, stride_w, stride_s, stride_out,
                          KP: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_KP: tl.constexpr):
        # the few-row form: products and sums on the CUDA cores (no 16-row MMA padding), one program per
        # BLOCK_N columns streaming its rows' packed bytes once, as gemv.py does for bf16
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)          # past the last column: re-read it, never stored
        offs_m = tl.arange(0, BLOCK_M)
        rows_m = tl.minimum(offs_m, M - 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for j0 in range(0, KP, BLOCK_KP):
            offs_j = j0 + tl.arange(0, BLOCK_KP)
            j_ok = offs_j[None, :] < KP
            packed = tl.load(w_ptr + rows_n[:, None].to(tl.int64) * stride_w + offs_j[None, :],
                             mask=j_ok, other=0).to(tl.int32)                          # [BLOCK_N, BLOCK_KP]
            s_lo = tl.load(s_ptr + rows_n[:, None] * stride_s + (2 * offs_j // GROUP)[None, :], mask=j_ok, other=0)
            s_hi = tl.load(s_ptr + rows_n[:, None] * stride_s + ((2 * offs_j + 1) // GROUP)[None, :], mask=j_ok,
                           other=0)
            w_lo = _widen(packed & 15, s_lo.to(tl.int32)).to(tl.int32)
            w_hi = _widen(packed >> 4, s_hi.to(tl.int32)).to(tl.int32)
            x_row = x_ptr + rows_m[:, None].to(tl.int64) * stride_x + 2 * offs_j[None, :]
            x_even = tl.load(x_row, mask=j_ok, other=0).to(tl.int32)                   # [BLOCK_M, BLOCK_KP]
            x_odd = tl.load(x_row + 1, mask=j_ok, other=0).to(tl.int32)
            acc += tl.sum(x_even[:, None, :] * w_lo[None, :, :] + x_odd[:, None, :] * w_hi[None, :, :], axis=2)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :], acc,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


MAX_ROWS = 16   # w4a8_matmul_cuda's kernel rows; more rows run the reference (measured above)
GEMV_MAX_ROWS = 1   # rows the GEMV form takes once its route registered: timed at one row only (module doc)
ROUTE_ROWS = {"w4a8_gemv": 0}   # set to GEMV_MAX_ROWS by kernels/__init__.py when "w4a8_gemv" registers


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_KP, num_warps) by row count: the sweep's best at 1 and at 64 rows."""
    return (16, 32, 128, 4) if m <= 16 else (64, 32, 256, 8)


def _split_k(programs: int, k_tiles: int, device: torch.device) -> int:
    """Splits of K so that a decode-size GEMM has about two programs per SM (at most one byte tile each)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(k_tiles, -(-2 * sms // programs)))


def _checked(name: str, x_q: Tensor, w_packed: Tensor, w_group_scale: Tensor) -> tuple[int, int]:
    """(K, groups) of a valid call; a ValueError naming what is accepted otherwise."""
    k = x_q.shape[-1]
    check_packed("w4a8_matmul", w_packed, 2, k)
    out, groups = w_packed.shape[0], w_group_scale.shape[-1]
    if w_packed.dim() != 2 or w_group_scale.shape != (out, groups) or k % groups:
        raise ValueError(f"{name}: expected w_packed [out, K/2] and group scales [out, K/G] with G dividing "
                         f"K = {k}; got {tuple(w_packed.shape)} and {tuple(w_group_scale.shape)}")
    return k, groups


def w4a8_gemv(x_q: Tensor, w_packed: Tensor, w_group_scale: Tensor, *,
              tiles: tuple[int, int, int] | None = None) -> Tensor:
    """The few-row form (any M; w4a8_matmul_cuda uses it up to GEMV_MAX_ROWS once enabled): the same
    contract as w4a8_gemm. `tiles` = (BLOCK_N, BLOCK_KP, num_warps); default 4 columns x 512 packed
    bytes (1024 weights, as gemv.py's bf16 tile), 4 warps: a first choice, not swept."""
    k, groups = _checked("w4a8_gemv", x_q, w_packed, w_group_scale)
    lead, out = x_q.shape[:-1], w_packed.shape[0]
    x2 = x_q.reshape(-1, k).contiguous()
    w, s = w_packed.contiguous(), w_group_scale.contiguous()
    m = x2.shape[0]
    block_m = triton.next_power_of_2(max(m, 1))
    block_n, block_kp, warps = tiles or (max(1, 4 // block_m), min(512, triton.next_power_of_2(k // 2)), 4)
    y = torch.empty((m, out), dtype=torch.int32, device=x_q.device)
    _w4a8_gemv_kernel[(triton.cdiv(out, block_n),)](x2, w, s, y, m, out, x2.stride(0), w.stride(0), s.stride(0),
                                                    y.stride(0), KP=k // 2, GROUP=k // groups, BLOCK_M=block_m,
                                                    BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=warps)
    return y.reshape(*lead, out)


def w4a8_gemm(x_q: Tensor, w_packed: Tensor, w_group_scale: Tensor, *,
              tiles: tuple[int, int, int, int] | None = None, split_k: int | None = None) -> Tensor:
    """The kernel alone: x_q int8 [..., M, K], w_packed uint8 [out, K/2], w_group_scale int8 [out, K/G]
    -> int32 [..., M, out], equal to graphopt::w4a8_matmul's reference. `tiles` = (BLOCK_M, BLOCK_N,
    BLOCK_KP, num_warps) overrides the choice by row count, `split_k` the number of K splits (default:
    two programs per SM up to MAX_ROWS rows, none above; benchmarks/quant_gemm.py --w4a8-sweep)."""
    k, groups = _checked("w4a8_gemm", x_q, w_packed, w_group_scale)
    out, lead = w_packed.shape[0], x_q.shape[:-1]
    x2 = x_q.reshape(-1, k).contiguous()
    w, s = w_packed.contiguous(), w_group_scale.contiguous()
    m = x2.shape[0]
    block_m, block_n, block_kp, warps = tiles or _tiles(m)
    tiles_nm = triton.cdiv(out, block_n) * triton.cdiv(m, block_m)
    if split_k is None:
        split_k = _split_k(tiles_nm, triton.cdiv(k // 2, block_kp), x_q.device) if m <= MAX_ROWS else 1
    y = (torch.zeros if split_k > 1 else torch.empty)((m, out), dtype=torch.int32, device=x_q.device)
    grid = (triton.cdiv(out, block_n), triton.cdiv(m, block_m), split_k)
    _w4a8_kernel[grid](x2, w, s, y, m, out, x2.stride(0), w.stride(0), s.stride(0), y.stride(0),
                       KP=k // 2, GROUP=k // groups, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KP=block_kp,
                       SPLIT_K=split_k, num_warps=warps)
    return y.reshape(*lead, out)


def w4a8_matmul_cuda(x_q: Tensor, w_packed: Tensor, w_group_scale: Tensor) -> Tensor:
    """graphopt::w4a8_matmul on CUDA: the kernel for one [out, K/2] weight and up to MAX_ROWS rows;
    batched weights and more rows: the reference (measured faster there, module doc)."""
    if (w_packed.dim() != 2 or x_q.shape[-1] % w_group_scale.shape[-1] or x_q.dtype != torch.int8
            or not 0 < x_q.numel() <= MAX_ROWS * x_q.shape[-1]):
        return _quant.w4a8_matmul._init_fn(x_q, w_packed, w_group_scale)
    if x_q.numel() <= ROUTE_ROWS["w4a8_gemv"] * x_q.shape[-1]:
        return w4a8_gemv(x_q, w_packed, w_group_scale)
    return w4a8_gemm(x_q, w_packed, w_group_scale)


_registered = False


def register() -> bool:
    """Make w4a8_matmul_cuda the op's CUDA kernel, once; False (nothing done) when not available()."""
    global _registered
    if not _registered and available():
        _quant.w4a8_matmul.register_kernel("cuda")(w4a8_matmul_cuda)
        _registered = True
    return _registered
