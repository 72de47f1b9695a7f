"""CUDA implementation of graphopt::linear for few rows: a Triton GEMV that streams the weight once.

At decode sizes (a step's rows are the batch times 1+k tokens) a dense projection reads an [N, K]
weight for a handful of rows, so it is bound by the weight's bytes and by launch ramp-up. cuBLAS
spends ~6 us on each of V2-Lite's 2-12 MB projections at one row on the H200, cold weights
(`benchmarks/results/gemv_sweep.md`). Here one program owns BLOCK_N output columns for all M rows
(padded to a power of two BLOCK_M):

    for each K tile:  w = W[n0:n0+BLOCK_N, k0:k0+BLOCK_K]          (read once, the only large read)
                      x = X[:, k0:k0+BLOCK_K]                        (M rows, from L2)
                      acc[m, n] += sum_k float(x[m, k]) * float(w[n, k])
    Y[:, n0:n0+BLOCK_N] = acc cast to the output dtype

The products run on the CUDA cores and grow with M, so the op uses it for few rows, by the weight's
size (`ROW_LIMITS`, from the H200 sweep `benchmarks/results/gemv_sweep.md`, best tiles against cuBLAS,
cold weights): one row always (3.6 against 6.2 us on kv_a_proj, 5.2 / 6.1 on o_proj, 94 / 101 on
lm_head); two rows up to 12 MiB (kv_a_proj 3.9 / 5.9, o_proj 5.8 / 6.1, shared down 7.5 / 8.2, q_proj
6.6 / 6.5; the 45 MB dense gate 16.1 / 13.6 is cuBLAS's); three or four rows up to 2.5 MiB (kv_a_proj
4.7 / 5.9; o_proj 6.7 / 6.1 is cuBLAS's). Two rows is an MTP k = 1 verify at batch 1, four k = 3 or
batch 2 at k = 1. The kernel itself takes any M (the tests run it at up to 8 rows).
float32 accumulation as cuBLAS does; the sums run in another order, so results agree to rounding
(bf16: one ulp of the output), not bit for bit. No split over K and no atomics: every output is one
program's sum, the same on every run. Tiles come from `config(M, N, K)` (measured on the H200,
`benchmarks/gemv.py`); more rows than ROW_LIMITS allows for the weight, another dtype pair, or a
weight that is not row-major run aten.linear (cuBLAS). The op's reference (`graphopt/ops/core.py:
linear`) is the definition.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:            # the module still imports; available() says False
    triton = None

__all__ = ["MAX_ROWS", "ROW_LIMITS", "available", "config", "gemv", "int8_gemv", "int8_gemv_batched", "linear_cuda",
           "register", "takes"]

# (rows, largest weight in bytes the GEMV takes at that many rows); past the last entry cuBLAS is faster
ROW_LIMITS = ((1, float("inf")), (2, 12 << 20), (4, 5 << 19))
MAX_ROWS = ROW_LIMITS[-1][0]
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    """Triton importable, and a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) to run on."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, stride_x, stride_w, stride_y, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     ACC: tl.constexpr = tl.float32, stride_xb=0, stride_wb=0, stride_yb=0):
        # ACC: float32 for float operands; int32 for int8 x int8 (int8_gemv: exact integer sums).
        # Axis 1 of the grid is a batch of independent products (int8_gemv_batched; one for the rest):
        # x, w, y advance by their batch strides (0 where a side is broadcast).
        pid = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        x_ptr += batch * stride_xb
        w_ptr += batch * stride_wb
        y_ptr += batch * stride_yb
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)          # past the last column: re-read it, never stored
        offs_m = tl.arange(0, BLOCK_M)
        rows_m = tl.minimum(offs_m, M - 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w_ptrs = w_ptr + rows_n[:, None] * stride_w + offs_k[None, :]
            x_ptrs = x_ptr + rows_m[:, None] * stride_x + offs_k[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                k_mask = offs_k[None, :] < K
                w = tl.load(w_ptrs, mask=k_mask, other=0)
                x = tl.load(x_ptrs, mask=k_mask, other=0)
            acc += tl.sum(x.to(ACC)[:, None, :] * w.to(ACC)[None, :, :], axis=2)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M rows of an [N, K] weight: the sweep's best on
    the H200 (`benchmarks/gemv.py --sweep`) was 4 columns x 1024 of K for every V2-Lite projection at
    one to four rows (many programs, each with 8 KB of weight in flight), 8 columns for lm_head's
    102400 at one row; 512 of K at 8 rows, 256 at 16."""
    block_m = triton.next_power_of_2(m)
    block_k = min(1024 if m <= 4 else 512 if m <= 8 else 256, triton.next_power_of_2(k))
    block_n = 8 if n >= 32768 and m == 1 else 4
    return block_m, block_n, block_k, 4


def _problem(x3: Tensor, w3: Tensor, int8: bool) -> str | None:
    """What the kernel cannot take about these operands (it would read out of bounds), or None."""
    if x3.dim() != 3 or w3.dim() != 3:
        return (f"x and the weight must be 2-D (or 3-D for the batched form), got "
                f"{tuple(x3.shape[1:] if x3.dim() == 3 else x3.shape)} and {tuple(w3.shape)}")
    if x3.shape[2] != w3.shape[2] or x3.shape[2] == 0:
        return f"x has K={x3.shape[2]} but the weight is [N, K={w3.shape[2]}] (K must match, > 0)"
    if x3.shape[0] not in (1, w3.shape[0]) and w3.shape[0] != 1:
        return f"batches of {x3.shape[0]} inputs and {w3.shape[0]} weights (one side 1, or equal)"
    if x3.stride(2) != 1 or w3.stride(2) != 1:
        return f"x and the weight need a unit stride along K (got {x3.stride(2)}, {w3.stride(2)})"
    if int8 and not x3.dtype == w3.dtype == torch.int8:
        return f"int8 x and weight expected, got {x3.dtype} and {w3.dtype}"
    if not int8 and not (x3.dtype == w3.dtype and x3.dtype in _DTYPES):
        return f"x and the weight must share one of {_DTYPES}, got {x3.dtype} and {w3.dtype}"
    return None


def _check(name: str, x3: Tensor, w3: Tensor, int8: bool) -> None:
    problem = _problem(x3, w3, int8)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")


def takes(x: Tensor, weight: Tensor, int8: bool = False) -> bool:
    """Whether the entry points accept these operands (both 2-D: gemv / int8_gemv; both 3-D: the batched
    form) rather than raising: the test a caller routes on, the same one the entry points check."""
    if x.dim() == weight.dim() == 2:
        x, weight = x.unsqueeze(0), weight.unsqueeze(0)
    return _problem(x, weight, int8) is None


def _launch(x3: Tensor, w3: Tensor, out_dtype: torch.dtype, tiles, **acc) -> Tensor:
    """x3 [B or 1, M, K] @ w3 [B or 1, N, K]^T -> [B, M, N]; a batch of one on either side is broadcast."""
    _, m, k = x3.shape
    n = w3.shape[1]
    batches = max(x3.shape[0], w3.shape[0])
    block_m, block_n, block_k, warps = tiles or config(m, n, k)
    y = torch.empty(batches, m, n, dtype=out_dtype, device=x3.device)
    _gemv_kernel[(triton.cdiv(n, block_n), batches)](
        x3, w3, y, m, n, x3.stride(1), w3.stride(1), y.stride(1), k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=warps,
        stride_xb=x3.stride(0) if x3.shape[0] > 1 else 0, stride_wb=w3.stride(0) if w3.shape[0] > 1 else 0,
        stride_yb=y.stride(0), **acc)
    return y


def gemv(x2: Tensor, weight: Tensor, tiles: tuple[int, int, int, int] | None = None) -> Tensor:
    """x2 [M, K] (row stride any, unit column stride) @ weight [N, K]^T -> [M, N] in x2's dtype."""
    _check("gemv", x2.unsqueeze(0), weight.unsqueeze(0), int8=False)
    return _launch(x2.unsqueeze(0), weight.unsqueeze(0), x2.dtype, tiles)[0]


def int8_gemv(x2: Tensor, weight: Tensor, tiles: tuple[int, int, int, int] | None = None) -> Tensor:
    """int8 x2 [M, K] (unit column stride) @ int8 weight [N, K]^T -> exact int32 [M, N]: the same
    program shape, products and sums in int32 (graphopt::int8_matmul's few-row path, quant_gemm.py).
    The weight is half of bf16's bytes; tiles default to the bf16 sweep's (not yet swept for int8)."""
    _check("int8_gemv", x2.unsqueeze(0), weight.unsqueeze(0), int8=True)
    return _launch(x2.unsqueeze(0), weight.unsqueeze(0), torch.int32, tiles, ACC=tl.int32)[0]


def int8_gemv_batched(x3: Tensor, weights: Tensor, tiles: tuple[int, int, int, int] | None = None) -> Tensor:
    """int8 x3 [B or 1, M, K] @ int8 weights [B, N, K]^T -> exact int32 [B, M, N]: int8_gemv once per
    batch entry in one launch (grid axis 1), e.g. each routed assignment of a decode step against its
    own expert's weight (quant_gemm.py's batched int8_matmul). Unit column strides; x broadcast when
    its batch is 1."""
    _check("int8_gemv_batched", x3, weights, int8=True)
    return _launch(x3, weights, torch.int32, tiles, ACC=tl.int32)


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether the GEMV runs this call (else aten.linear does)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    limit = next((size for most, size in ROW_LIMITS if rows <= most), -1)
    return (0 < rows and weight.numel() * weight.element_size() <= limit and x.dtype == weight.dtype
            and x.dtype in _DTYPES and weight.dim() == 2
            and weight.stride(1) == 1 and weight.shape[0] > 0 and x.shape[-1] > 0)


def linear_cuda(x: Tensor, weight: Tensor) -> Tensor:
    if not usable(x, weight):
        return F.linear(x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return gemv(x2, weight).reshape(*x.shape[:-1], weight.shape[0])


_registered = False


def register() -> bool:
    """Make linear_cuda the op's CUDA kernel, once (later calls do nothing)."""
    global _registered
    if not _registered:
        torch.library.register_kernel("graphopt::linear", "cuda", linear_cuda)
        _registered = True
    return _registered
