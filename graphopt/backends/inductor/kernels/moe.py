"""CUDA implementation of graphopt::moe_experts: grouped expert matmuls that read only the chosen experts.

    out[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]),  expert_e(v) = (silu(v Wg^T) * v Wu^T) Wd^T

The op's reference groups tokens by expert on the host (`.tolist()` of the counts), so it cannot be
captured in a CUDA graph. Here the grouping happens on the device, and every size the host needs
comes from tensor shapes. With M = N * k assignments (a = n * k + j is token n's j-th expert):

  1. align (torch, `_align_to_blocks`): assignments sorted by expert (stable argsort); counts per
     expert by scatter_add into a fixed [E]; each count padded up to a multiple of BLOCK_M; a
     `sorted_ids` array of the worst-case padded size, ceil((M + min(E, M) * (BLOCK_M - 1)) / BLOCK_M)
     blocks, filled with the sentinel M and the sorted assignments scattered into their padded slots;
     `block_expert[b]` = the expert owning block b, or E for blocks past the last used one.
     Up to _ALIGN_KERNEL_MAX assignments this is one Triton program (`_align_kernel`: each
     assignment's rank within its expert from an atomic increment, a scan of the padded counts, the
     scatter) instead of the ~30 small torch kernels: 4-37 us against 38-79 us on the H200
     (`benchmarks/moe_align.py`). Its blocks and block experts equal the torch alignment's; an
     expert's assignments may sit in another order over its blocks, which changes no result (a
     row's product does not depend on its row). ATOMIC=False ranks by comparison (stable, the torch
     order exactly) in O(M^2): kept as the reference the tests hold the atomic form to.
     Few assignments (one token, or M^2 <= 2E: `_one_per_block`): no alignment at all; block a holds
     assignment a alone in its row 0 and block_expert is the flat ids (an expert two assignments
     chose is then read twice, cheaper than the ~15 kernels of the sort at these sizes).
  2. kernel 1 (`_gate_up_kernel`), grid (blocks, cdiv(I, BLOCK_N)): a block's BLOCK_M rows of x
     (token = a // k, padding rows masked to 0) times that expert's Wg and Wu tiles, SwiGLU fused,
     written to an intermediate [blocks * BLOCK_M, I] buffer in x.dtype.
  3. kernel 2 (`_down_kernel`), grid (blocks, cdiv(H, BLOCK_N)): intermediate rows times the expert's
     Wd, times the routing weight in float32, written per assignment to [M, H] float32.
  4. out = that.view(N, k, H).sum(1).to(x.dtype): a deterministic sum over k (no atomics).
     graphopt::moe_expert_terms is steps 1-3 alone (`moe_expert_terms_cuda`): the Inductor backend's
     decode steps call it and leave step 4 to the graph, where it fuses into the consumer's kernel
     (two launches fewer per MoE layer: the eager sum and the cast).

Expert pruning (routing weight 0, `passes/prune_routed_experts.py`): with one block per assignment
the block's programs return without reading its expert (the down kernel writes its zero term), so a
pruned expert's bytes are saved at batch 1; in the sorted layout a pruned assignment is computed and
weighted by 0 (the same result, no bytes saved).
Programs of a block with block_expert == E return at once, so the grid (worst case, from shapes) can be
larger than the real block count (known only on the device). Only experts some token chose are read:
at batch 1, k of E experts. No host sync anywhere (no .item(), .tolist(), nonzero or data-dependent
shape), so a call can be captured in a CUDA graph and replayed with new x, weights and ids.

Tiles: BLOCK_M 16 for decode sizes (few assignments per expert; padding costs up to BLOCK_M - 1 rows
per used expert) and 64 once experts average many rows; BLOCK_N / BLOCK_K the next power of two of
the dimension, clamped to [16, 64] / [16, 128] (64 for float32). E, I and H need not be powers of
two: loads and stores are masked.

Numerics (the reference's rounding points): gate and up rounded to x.dtype, SwiGLU computed in float32
from them and rounded to x.dtype, the down product rounded to x.dtype before the float32 weighted sum,
as the reference's x.dtype matmuls and elementwise ops do. Differences left: the dots' accumulation
order (tl.dot vs cuBLAS / CPU), silu as g / (1 + exp(-g)) with Triton's exp, and the k terms of a token
summed in slot order j rather than expert order. float32 dots use input_precision="ieee" (no tf32);
bf16 / fp16 dots use the tensor cores with float32 accumulation.

Which implementation runs (`moe_experts_cuda`, registered as the op's CUDA kernel by `register()`):
  * Triton available (importable, with a CUDA device or TRITON_INTERPRET=1): the kernels above, any N.
  * otherwise, when the gathered copies of the chosen experts fit _GATHER_BUDGET_BYTES (decode-sized
    N * k): `moe_experts_gathered`, pure torch, also sync-free and capturable.
  * otherwise (prefill without Triton): the op's reference, which syncs and cannot be captured.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops import core
from graphopt.ops.core import _check_moe_experts

try:
    import triton
    import triton.language as tl
except ImportError:            # the module still imports; available() says False
    triton = None

__all__ = ["available", "moe_expert_terms_cuda", "moe_experts_cuda", "moe_experts_gathered", "register"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The gathered fallback copies 3 * I * H weights per assignment; above this many bytes in all it is
# slower than the reference's grouping (prefill), which then runs instead.
_GATHER_BUDGET_BYTES = 2 << 30


def available() -> bool:
    """Triton importable, and a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) to run on."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    # EMULATE_BF16 (bf16 under TRITON_INTERPRET=1 only): the interpreter multiplies bf16 tiles as their
    # raw uint16 bits and truncates float32 -> bf16. So dots run on float32 copies (the same sums:
    # products of bf16 values are exact in float32) and the rounding to nearest even is done on the bits.

    @triton.jit
    def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
        if EMULATE_BF16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _round(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
        # float32 v rounded to dtype (to nearest even), kept in float32: the reference's rounding points
        if EMULATE_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return bits.to(tl.float32, bitcast=True)
        else:
            return v.to(dtype).to(tl.float32)

    @triton.jit
    def _align_kernel(
        ids_ptr,                     # [M] int64: the expert of assignment a
        sorted_ids_ptr,              # [blocks * BLOCK_M] int64 out: as _align_to_blocks
        block_expert_ptr,            # [blocks] int64 out
        start_ptr,                   # [E_PAD] int64 scratch: each expert's first padded slot
        count_ptr,                   # [E_PAD] int32 scratch (ATOMIC): assignments per expert
        n_assign, n_slots, n_blocks,
        N_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, M_PAD: tl.constexpr, CHUNK: tl.constexpr,
        E_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, MAX_BLOCKS: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        # loops run to bounds known from M_PAD (MAX_BLOCKS: the block count for M_PAD assignments),
        # masked by the real n_slots / n_blocks, so one compile serves every M of the same M_PAD
        # _align_to_blocks in one program (one CTA, so a barrier orders its global writes)
        offs = tl.arange(0, M_PAD)
        ok = offs < n_assign
        ids = tl.load(ids_ptr + offs, mask=ok, other=N_EXPERTS)           # padding lanes: expert E, unused
        experts = tl.arange(0, E_PAD)
        if ATOMIC:
            # rank = the count an atomic increment of its expert returns: O(M) work, but the order of
            # one expert's assignments is the atomics' (a row's result does not depend on its row)
            tl.store(count_ptr + experts, tl.zeros([E_PAD], dtype=tl.int32))
            tl.debug_barrier()
            rank = tl.atomic_add(count_ptr + ids, tl.full([M_PAD], 1, tl.int32), mask=ok)
            tl.debug_barrier()
            counts = tl.load(count_ptr + experts, mask=experts < N_EXPERTS, other=0)
        else:
            counts = tl.zeros([E_PAD], dtype=tl.int32)                    # assignments per expert
            for c0 in range(0, M_PAD, E_CHUNK):
                other = c0 + tl.arange(0, E_CHUNK)
                other_ids = tl.load(ids_ptr + other, mask=other < n_assign, other=E_PAD)
                counts += tl.sum((experts[:, None] == other_ids[None, :]).to(tl.int32), axis=1)
            # rank of each assignment among the earlier ones of its expert (a stable sort's order)
            rank = tl.zeros([M_PAD], dtype=tl.int32)
            for c0 in range(0, M_PAD, CHUNK):
                other = c0 + tl.arange(0, CHUNK)
                other_ids = tl.load(ids_ptr + other, mask=other < n_assign, other=N_EXPERTS + 1)
                same = (ids[:, None] == other_ids[None, :]) & (other[None, :] < offs[:, None])
                rank += tl.sum(same.to(tl.int32), axis=1)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, 0)                                  # one past expert e's last slot
        tl.store(start_ptr + experts, (padded_end - padded).to(tl.int64))
        for s0 in range(0, MAX_BLOCKS * BLOCK_M, M_PAD):                   # every slot: the sentinel M
            slots = s0 + offs
            tl.store(sorted_ids_ptr + slots, tl.zeros([M_PAD], dtype=tl.int64) + n_assign, mask=slots < n_slots)
        tl.debug_barrier()                                                 # fills and starts written
        start = tl.load(start_ptr + ids, mask=ok, other=0)
        tl.store(sorted_ids_ptr + start + rank, offs.to(tl.int64), mask=ok)
        # block b's expert: the number of experts whose padded range ends at or before b's first slot
        for b0 in range(0, MAX_BLOCKS, CHUNK):
            blocks = b0 + tl.arange(0, CHUNK)
            ended = (padded_end[None, :] <= blocks[:, None] * BLOCK_M) & (experts[None, :] < N_EXPERTS)
            tl.store(block_expert_ptr + blocks, tl.sum(ended.to(tl.int64), axis=1), mask=blocks < n_blocks)

    @triton.jit
    def _block_assignments(sorted_ids_ptr, rows, block, n_assign, BLOCK_M: tl.constexpr,
                           ONE_PER_BLOCK: tl.constexpr):
        # the assignments a block's rows hold (n_assign = padding). ONE_PER_BLOCK: block b is
        # assignment b alone in row 0 (no sorted layout exists; block_expert is the flat expert ids)
        if ONE_PER_BLOCK:
            return tl.where(tl.arange(0, BLOCK_M) == 0, block, n_assign).to(tl.int64)
        else:
            return tl.load(sorted_ids_ptr + rows)

    @triton.jit
    def _gate_up_kernel(
        x_ptr,                       # [N, H] any strides
        gate_up_ptr,                 # [E, 2I, H] any strides: rows 0..I-1 are Wg, I..2I-1 are Wu
        inter_ptr,                   # [blocks * BLOCK_M, I] out, x.dtype
        weights_ptr,                 # [M] float32 routing weights (read for ONE_PER_BLOCK: 0 = pruned)
        sorted_ids_ptr,              # [blocks * BLOCK_M] int64: assignment n * k + j, or the sentinel M
        block_expert_ptr,            # [blocks] int64: the block's expert, or E past the last used block
        n_assign,                    # M = N * k, also the padding sentinel
        stride_xn, stride_xh, stride_ge, stride_gr, stride_gh, stride_in,
        TOP_K: tl.constexpr, N_EXPERTS: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, ONE_PER_BLOCK: tl.constexpr,
    ):
        block, tile = tl.program_id(0), tl.program_id(1)
        expert = tl.load(block_expert_ptr + block)
        if expert >= N_EXPERTS:      # past the real blocks (the grid is the worst case)
            return
        if ONE_PER_BLOCK:            # a pruned assignment (weight 0): its expert is never read
            if tl.load(weights_ptr + block) == 0.0:
                return

        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)                    # slots of the padded layout
        assign = _block_assignments(sorted_ids_ptr, rows, block, n_assign, BLOCK_M, ONE_PER_BLOCK)
        row_ok = assign < n_assign                                        # padding slots hold the sentinel
        token = (assign // TOP_K).to(tl.int64)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)                     # columns of I
        col_ok = cols < INTER
        offs_k = tl.arange(0, BLOCK_K)

        x_rows = x_ptr + token[:, None] * stride_xn                       # [BLOCK_M, 1]
        w_expert = gate_up_ptr + expert.to(tl.int64) * stride_ge          # int64: E * 2I * H overflows int32
        wg_cols = w_expert + cols[None, :] * stride_gr                    # [1, BLOCK_N], Wg row i as column i
        wu_cols = w_expert + (cols[None, :] + INTER) * stride_gr

        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < HIDDEN
            xt = tl.load(x_rows + ks[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(wg_cols + ks[:, None] * stride_gh, mask=w_mask, other=0.0)    # [BLOCK_K, BLOCK_N]
            wu = tl.load(wu_cols + ks[:, None] * stride_gh, mask=w_mask, other=0.0)
            acc_gate = _dot(xt, wg, acc_gate, DOT_PRECISION, EMULATE_BF16)
            acc_up = _dot(xt, wu, acc_up, DOT_PRECISION, EMULATE_BF16)

        # the reference's rounding points: gate / up in x.dtype, silu(gate) in x.dtype, the product too
        dtype = x_ptr.dtype.element_ty
        gate = _round(acc_gate, dtype, EMULATE_BF16)
        up = _round(acc_up, dtype, EMULATE_BF16)
        act = _round(gate / (1.0 + tl.exp(-gate)), dtype, EMULATE_BF16)
        h = _round(act * up, dtype, EMULATE_BF16).to(dtype)
        tl.store(inter_ptr + rows[:, None].to(tl.int64) * stride_in + cols[None, :], h, mask=col_ok[None, :])

    @triton.jit
    def _down_kernel(
        inter_ptr,                   # [blocks * BLOCK_M, I] x.dtype, from _gate_up_kernel
        down_ptr,                    # [E, H, I] any strides
        weights_ptr,                 # [M] float32 routing weights
        out_ptr,                     # [M, H] out, float32
        sorted_ids_ptr, block_expert_ptr,                                  # as in _gate_up_kernel
        n_assign,
        stride_in, stride_de, stride_dh, stride_di, stride_om,
        N_EXPERTS: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, ONE_PER_BLOCK: tl.constexpr,
    ):
        block, tile = tl.program_id(0), tl.program_id(1)
        expert = tl.load(block_expert_ptr + block)
        if expert >= N_EXPERTS:
            return

        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        assign = _block_assignments(sorted_ids_ptr, rows, block, n_assign, BLOCK_M, ONE_PER_BLOCK)
        row_ok = assign < n_assign
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)                     # columns of H
        col_ok = cols < HIDDEN
        if ONE_PER_BLOCK:            # pruned: _gate_up_kernel skipped it; its term is 0, not read
            if tl.load(weights_ptr + block) == 0.0:
                tl.store(out_ptr + block.to(tl.int64) * stride_om + cols, tl.zeros([BLOCK_N], dtype=tl.float32),
                         mask=col_ok)
                return
        offs_k = tl.arange(0, BLOCK_K)

        a_rows = inter_ptr + rows[:, None].to(tl.int64) * stride_in       # [BLOCK_M, 1]
        wd_cols = down_ptr + expert.to(tl.int64) * stride_de + cols[None, :] * stride_dh

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < INTER
            a = tl.load(a_rows + ks[None, :], mask=k_ok[None, :], other=0.0)          # [BLOCK_M, BLOCK_K]
            wd = tl.load(wd_cols + ks[:, None] * stride_di, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, wd, acc, DOT_PRECISION, EMULATE_BF16)

        # the expert output rounded to x.dtype, then weighted in float32 (the reference's h.float() * w)
        y = _round(acc, inter_ptr.dtype.element_ty, EMULATE_BF16)
        route_w = tl.load(weights_ptr + assign, mask=row_ok, other=0.0)
        out_rows = out_ptr + assign[:, None].to(tl.int64) * stride_om
        tl.store(out_rows + cols[None, :], y * route_w[:, None], mask=row_ok[:, None] & col_ok[None, :])


def _one_per_block(n_tokens: int, n_assign: int, n_experts: int) -> bool:
    """Whether each assignment gets a block of its own instead of the sorted layout. The sort, counts,
    scans and scatters of `_align_to_blocks` are ~15 small kernels (~40 us per layer at decode sizes,
    measured on the H200); without them an expert chosen by two assignments is read twice. One token
    (its k experts are distinct) never reads twice; for M random assignments over E experts about
    M^2 / 2E are repeats, so up to M^2 <= 2E (about one repeated expert read) the sort costs more."""
    return n_tokens == 1 or n_assign * n_assign <= 2 * n_experts


def _block_m(n_assign: int, n_experts: int) -> int:
    """Rows per block: 16 while experts see few assignments each (decode), 64 once they average many."""
    per_expert = n_assign / min(n_experts, n_assign)
    return 16 if per_expert <= 32 else 64


def _tile(dim: int, largest: int) -> int:
    # tl.dot wants every dimension >= 16; larger dims are cut into tiles of `largest` with masked tails
    return max(16, min(largest, triton.next_power_of_2(dim)))


def _max_blocks(n_assign: int, n_experts: int, block_m: int) -> int:
    """Worst-case number of padded blocks, from shapes: each used expert (at most min(E, M) of them)
    pads its count by at most block_m - 1."""
    return -(-(n_assign + min(n_experts, n_assign) * (block_m - 1)) // block_m)     # ceil, without triton


# one program aligns up to this many assignments (its rank step compares M_PAD x CHUNK ids at a time)
_ALIGN_KERNEL_MAX = 2048


def _align_triton(flat_ids: Tensor, n_experts: int, block_m: int, atomic: bool = False) -> tuple[Tensor, Tensor]:
    """`_align_to_blocks` as one kernel launch (its torch form is ~30 small kernels); same outputs
    (atomic=True: same blocks and block experts, an expert's assignments in any order)."""
    n_assign, device = flat_ids.numel(), flat_ids.device
    n_blocks = _max_blocks(n_assign, n_experts, block_m)
    sorted_ids = torch.empty(n_blocks * block_m, dtype=torch.int64, device=device)
    block_expert = torch.empty(n_blocks, dtype=torch.int64, device=device)
    e_pad = triton.next_power_of_2(n_experts + 1)
    start = torch.empty(e_pad, dtype=torch.int64, device=device)
    counts = torch.empty(e_pad, dtype=torch.int32, device=device)
    m_pad = max(16, triton.next_power_of_2(n_assign))
    _align_kernel[(1,)](flat_ids, sorted_ids, block_expert, start, counts, n_assign, n_blocks * block_m, n_blocks,
                        N_EXPERTS=n_experts, E_PAD=e_pad, M_PAD=m_pad, CHUNK=max(16, min(64, 8192 // m_pad)),
                        E_CHUNK=max(16, min(m_pad, 8192 // e_pad)), BLOCK_M=block_m,
                        MAX_BLOCKS=_max_blocks(m_pad, n_experts, block_m), ATOMIC=atomic,
                        num_warps=4 if m_pad <= 256 else 8)
    return sorted_ids, block_expert


def _align_to_blocks(flat_ids: Tensor, n_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Assignments grouped by expert into blocks of block_m rows, on the device.

    flat_ids [M] int64 (the expert of assignment a = n * k + j) -> sorted_ids [blocks * block_m] int64
    (an assignment, or the sentinel M in padding slots) and block_expert [blocks] int64 (the expert of
    each block's rows, or E for the blocks past the last used one).
    """
    n_assign, device = flat_ids.numel(), flat_ids.device
    n_blocks = _max_blocks(n_assign, n_experts, block_m)
    order = torch.argsort(flat_ids, stable=True)                           # [M] assignments by expert
    sorted_expert = flat_ids[order]                                        # [M] non-decreasing
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))            # [E], fixed size
    padded = (counts + block_m - 1) // block_m * block_m                   # [E] slots per expert
    padded_end = torch.cumsum(padded, 0)                                   # [E] one past expert e's last slot
    start = torch.cumsum(counts, 0) - counts                               # [E] expert e's first sorted index
    rank = torch.arange(n_assign, device=device) - start[sorted_expert]    # [M] position within its expert
    slot = padded_end[sorted_expert] - padded[sorted_expert] + rank        # [M] slot in the padded layout
    sorted_ids = torch.full((n_blocks * block_m,), n_assign, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, slot, order)                                    # slots are distinct
    # block b belongs to the first expert whose padded range ends after b's first slot
    block_start = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # [blocks] in 0..E
    return sorted_ids, block_expert


def _expert_terms_triton(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Steps 1-3 of the module doc: float32 [N, k, H], one weighted expert output per assignment."""
    n_tokens, top_k = ids.shape
    n_experts, hidden, inter = down.shape
    n_assign = n_tokens * top_k
    if n_assign == 0:
        return x.new_zeros((n_tokens, top_k, hidden), dtype=torch.float32)
    one_per_block = _one_per_block(n_tokens, n_assign, n_experts)
    flat_ids = ids.reshape(-1).long()                                      # [M]
    if one_per_block:            # block a = assignment a: no sort, no padding layout, ~15 kernels fewer
        block_m, sorted_ids, block_expert = 16, flat_ids, flat_ids
    else:
        block_m = _block_m(n_assign, n_experts)
        if n_assign <= _ALIGN_KERNEL_MAX:
            sorted_ids, block_expert = _align_triton(flat_ids.contiguous(), n_experts, block_m, atomic=True)
        else:
            sorted_ids, block_expert = _align_to_blocks(flat_ids, n_experts, block_m)
    n_blocks = block_expert.numel()
    flat_weights = weights.reshape(-1).float().contiguous()               # [M], 0: pruned (one_per_block skips it)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"             # tf32 is ignored for half types
    emulate_bf16 = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    # the model's sizes are compile-time constants (one compile per model; tile loops of known length)
    options = dict(N_EXPERTS=n_experts, HIDDEN=hidden, INTER=inter, DOT_PRECISION=precision,
                   EMULATE_BF16=emulate_bf16, ONE_PER_BLOCK=one_per_block, num_warps=4)
    largest_k = 64 if x.dtype == torch.float32 else 128

    inter_buf = x.new_empty((n_blocks * block_m, inter))                   # [blocks * BLOCK_M, I]
    block_n, block_k = _tile(inter, 64), _tile(hidden, largest_k)
    _gate_up_kernel[(n_blocks, triton.cdiv(inter, block_n))](
        x, gate_up, inter_buf, flat_weights, sorted_ids, block_expert, n_assign,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), inter_buf.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **options,
    )

    per_assign = torch.empty((n_assign, hidden), dtype=torch.float32, device=x.device)   # [M, H]
    block_n, block_k = _tile(hidden, 64), _tile(inter, largest_k)
    _down_kernel[(n_blocks, triton.cdiv(hidden, block_n))](
        inter_buf, down, flat_weights, per_assign, sorted_ids, block_expert, n_assign,
        inter_buf.stride(0), down.stride(0), down.stride(1), down.stride(2), per_assign.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **options,
    )
    return per_assign.view(n_tokens, top_k, hidden)


def moe_experts_gathered(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """graphopt::moe_experts in plain torch without a host sync: each assignment gathers its expert's
    weights (index_select) and runs batched matmuls over the assignments.

    Reads only the chosen experts, but copies 3 * I * H weights per assignment, so it is meant for
    decode-sized N * k (see _GATHER_BUDGET_BYTES). Same rounding points as the reference.
    """
    _check_moe_experts(x, weights, ids, gate_up, down)
    return _expert_terms_gathered(x, weights, ids, gate_up, down).sum(1).to(x.dtype)


def _expert_terms_gathered(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    n_tokens, top_k = ids.shape
    hidden, inter = down.shape[1], down.shape[2]
    flat_ids = ids.reshape(-1).long()                                      # [M]
    tokens = torch.arange(flat_ids.numel(), device=x.device) // top_k     # [M] token of assignment
    xs = x.index_select(0, tokens)[:, None, :]                             # [M, 1, H]
    gu = torch.bmm(xs, gate_up.index_select(0, flat_ids).transpose(1, 2))  # [M, 1, 2I] in x.dtype
    act = F.silu(gu[..., :inter]) * gu[..., inter:]                        # [M, 1, I]
    y = torch.bmm(act, down.index_select(0, flat_ids).transpose(1, 2))     # [M, 1, H] in x.dtype
    y = y[:, 0].float() * weights.reshape(-1, 1).float()                   # [M, H] float32
    return y.view(n_tokens, top_k, hidden)


def _reference(op, x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    # the op's own implementation (host grouping), with this CUDA kernel switched off while it runs
    registered = _registered and x.is_cuda
    with op.set_kernel_enabled("cuda", False) if registered else contextlib.nullcontext():
        return op(x, weights, ids, gate_up, down)


def _terms_on_device(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor | None:
    """The weighted expert outputs [N, k, H] float32 without a host sync: the Triton kernels when
    available(), else the gathered form for decode-sized N * k; None where neither applies."""
    if available() and x.dtype in _KERNEL_DTYPES and gate_up.dtype == down.dtype == x.dtype:
        return _expert_terms_triton(x, weights, ids, gate_up, down)
    n_inter, hidden = down.shape[2], down.shape[1]
    if ids.numel() * 3 * n_inter * hidden * gate_up.element_size() <= _GATHER_BUDGET_BYTES:
        return _expert_terms_gathered(x, weights, ids, gate_up, down)
    return None


def moe_experts_cuda(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """graphopt::moe_experts on CUDA: the Triton kernels when available(), else the gathered fallback for
    decode-sized N * k, else the reference (see the module doc)."""
    _check_moe_experts(x, weights, ids, gate_up, down)
    terms = _terms_on_device(x, weights, ids, gate_up, down)
    return _reference(core.moe_experts, x, weights, ids, gate_up, down) if terms is None else terms.sum(1).to(x.dtype)


def moe_expert_terms_cuda(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """graphopt::moe_expert_terms on CUDA: moe_experts_cuda before its sum over k."""
    _check_moe_experts(x, weights, ids, gate_up, down)
    terms = _terms_on_device(x, weights, ids, gate_up, down)
    return _reference(core.moe_expert_terms, x, weights, ids, gate_up, down) if terms is None else terms


_registered = False


def register() -> bool:
    """Make moe_experts_cuda the op's CUDA kernel, once (later calls do nothing). Always registers:
    without Triton the kernel still avoids the host sync for decode-sized calls. Returns True."""
    global _registered
    if not _registered:
        torch.library.register_kernel("graphopt::moe_experts", "cuda", moe_experts_cuda)
        torch.library.register_kernel("graphopt::moe_expert_terms", "cuda", moe_expert_terms_cuda)
        _registered = True
    return _registered
