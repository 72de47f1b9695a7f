"""CUDA implementation of graphopt::mla_paged_attention: absorbed MLA decode over the paged cache (Triton).

For T <= absorb_max_tokens (decode, 1 + k speculative queries) the op runs in the absorbed form:

    q_lat = q_nope @ W_UK                                   [B, T, H, R]   (torch bmm over heads, head-major)
    out_lat[b, t, h] = softmax_j((q_lat . latent_j + q_pe . kpe_j) * scale, j <= positions[b, t]) @ latent_j
    out = out_lat @ W_UV^T                                  [B, T, H, dv]  (torch bmm, read in place)

and the middle line is the Triton kernel `mla_paged_decode`, which reads latent_j and kpe_j straight
from the paged cache through the block table; longer queries (prefill) use the reference python
implementation (expanded form). An int8 (C8) cache (ops/kv_int8.py: per token the latent's int8 codes,
then the roped key's bytes) is read by graphopt::mla_paged_attention_int8, served by the same kernel
with INT8 on: each latent tile is decoded as it is loaded, (codes x kv_scale) rounded to the query's
dtype, which is the value the op's reference (dequantize_kv) decodes, and the roped key is read
through a view of the cache in its own dtype. So over an int8 cache the kernel computes what it
computes over the float cache that int8 cache decodes to, reading 1 byte a latent value. The design:

  * rows: the T * H (query, head) pairs of one batch row, flattened and cut into tiles of TILE_H >= 16
    rows (tl.dot wants >= 16 in each dimension; padding rows are masked). The T queries of a row
    share one pass over the cache, so each page is read once per (row tile, split), not once per query.
  * grid (row tiles, splits, B): a program walks the keys of its split in tiles of TILE_N keys, with
    an online softmax in float32 (log2 domain), and writes partial (max, sum, acc) for its rows.
    Programs of one batch row and split are adjacent in launch order, so their page reads meet in L2.
  * keys read: only 0 .. n_keys - 1 with n_keys = min(max over the tile's rows of positions + 1, M * bs);
    the range is cut into `splits` equal parts (in whole key tiles) inside the kernel, from the
    positions it loads, so the split count comes from shapes while the work per split follows the real
    context length. Empty splits write (max = -1e30, sum = 0), which the combine weighs 0.
  * combine: a second small kernel, one program per (row, query, head): rescale each split's partials
    to the largest max, sum, divide, and write out_lat in q's dtype.
  * no host sync anywhere (no .item(), grid and split count from shapes and the device's SM count),
    so a call can be captured in a CUDA graph and replayed with new positions and block tables.
  * R and r need not be powers of two: tiles are the next power of two, loads and stores are masked.
    float32 dots use input_precision="ieee" (exact, for tests and references); bf16 / fp16 use the
    tensor cores with float32 accumulation; probabilities are cast to the cache's compute dtype before
    the value product, as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
from torch import Tensor

from graphopt.ops.attention import ABSORB_MAX_TOKENS
from graphopt.ops.paged_attention import (_check, _check_int8, mla_paged_attention_int8_reference,
                                          mla_paged_attention_reference)

try:
    import triton
    import triton.language as tl
except ImportError:            # the module still imports; available() says False
    triton = None

__all__ = ["available", "int8_cache_supported", "mla_paged_attention_cuda", "mla_paged_attention_int8_cuda",
           "mla_paged_decode", "register"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
# Split rule: aim for this many programs per SM, with at least _MIN_KEYS_PER_SPLIT keys of capacity
# (M * bs) per split and at most _MAX_SPLITS splits (each split costs a partial acc of R floats per row).
# Measured on the H200 at batch 1 (4096-token context): 64 splits ran V2-Lite in 14 us, 32 in 16, 16 in 23.
_PROGRAMS_PER_SM = 2
_MIN_KEYS_PER_SPLIT = 64
_MAX_SPLITS = 64
_COMBINE_TILE_R = 128    # latent outputs per combine program: R = 512 is 4 programs per (row, head)


def available() -> bool:
    """Triton importable, and a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) to run on."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, FP32_DOT: tl.constexpr):
        # FP32_DOT: float32 operands, exact products (no tf32); else tensor cores, float32 accumulate
        if FP32_DOT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _attend_key_tile(m_i, l_i, acc, q_lat, q_pe, pos, k0, end, cache_ptr, table_ptr, qk_scale,
                         stride_cache_n, stride_cache_s, stride_cache_c,
                         pe_ptr, stride_pe_n, stride_pe_s, stride_pe_c, kv_scale,
                         R: tl.constexpr, RP: tl.constexpr, PE_OFFSET: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         TILE_N: tl.constexpr, TILE_R: tl.constexpr, TILE_RP: tl.constexpr, FP32_DOT: tl.constexpr,
                         INT8: tl.constexpr):
        """One online-softmax step over keys k0 .. k0 + TILE_N - 1 (those < end) of one batch row.
        The roped key is element PE_OFFSET on of pe_ptr's entry (the cache itself, or an int8 cache's
        bytes viewed in the rope dtype); INT8: the latent is int8 codes, decoded with kv_scale [TILE_R]."""
        keys = k0 + tl.arange(0, TILE_N)
        key_ok = keys < end
        offs_r, offs_rp = tl.arange(0, TILE_R), tl.arange(0, TILE_RP)
        page = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0)
        in_block = keys % BLOCK_SIZE
        slot = page * stride_cache_n + in_block * stride_cache_s                     # int64 offsets [TILE_N]
        latent = tl.load(cache_ptr + slot[:, None] + offs_r[None, :] * stride_cache_c,
                         mask=key_ok[:, None] & (offs_r < R)[None, :], other=0)      # [TILE_N, TILE_R]
        if INT8:
            latent = latent.to(tl.float32) * kv_scale[None, :]                      # dequantize_kv, then the cast
        latent = latent.to(q_lat.dtype)
        pe_slot = page * stride_pe_n + in_block * stride_pe_s
        k_pe = tl.load(pe_ptr + pe_slot[:, None] + (PE_OFFSET + offs_rp[None, :]) * stride_pe_c,
                       mask=key_ok[:, None] & (offs_rp < RP)[None, :], other=0.0).to(q_lat.dtype)  # [TILE_N, TILE_RP]

        scores = _dot(q_lat, tl.trans(latent), tl.zeros([q_lat.shape[0], TILE_N], dtype=tl.float32), FP32_DOT)
        scores = _dot(q_pe, tl.trans(k_pe), scores, FP32_DOT) * qk_scale             # [TILE_H, TILE_N], log2 units
        scores = tl.where((keys[None, :] <= pos[:, None]) & key_ok[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)                                                 # rescale of what came before
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(latent.dtype), latent, acc * alpha[:, None], FP32_DOT)
        return m_new, l_i, acc

    @triton.jit
    def _paged_decode_split_kernel(
        q_lat_ptr, q_pe_ptr,                 # [B, T, H, R], [B, T, H, RP]: any strides but a unit last one
        cache_ptr,                           # [N, BLOCK_SIZE, R + RP], any strides (INT8: int8 codes first)
        pe_ptr, kv_scale_ptr,                # the roped keys' tensor (the cache, or its rope-dtype view); INT8: [R] fp32
        block_tables_ptr, positions_ptr,     # [B, M], [B, T] int64
        m_ptr, l_ptr, acc_ptr,               # partials [B, ROWS, SPLITS], same, [B, ROWS, SPLITS, R] float32
        qk_scale,                            # softmax scale * log2(e)
        stride_cache_n, stride_cache_s, stride_cache_c, stride_pe_n, stride_pe_s, stride_pe_c,
        stride_table_b, stride_pos_b, stride_pos_t,
        stride_q_b, stride_q_t, stride_q_h, stride_qpe_b, stride_qpe_t, stride_qpe_h,
        ROWS, KEYS, SPLITS,                  # runtime: T * H, M * BLOCK_SIZE, number of splits
        H: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, PE_OFFSET: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE_H: tl.constexpr, TILE_N: tl.constexpr, TILE_R: tl.constexpr, TILE_RP: tl.constexpr,
        FP32_DOT: tl.constexpr, WHILE_LOOP: tl.constexpr, INT8: tl.constexpr,
    ):
        tile, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = tile * TILE_H + tl.arange(0, TILE_H)                       # flattened (t, h) = t * H + h
        row_ok = rows < ROWS
        offs_r, offs_rp = tl.arange(0, TILE_R), tl.arange(0, TILE_RP)
        pos = tl.load(positions_ptr + b * stride_pos_b + (rows // H) * stride_pos_t, mask=row_ok, other=0)

        # keys 0 .. n_keys - 1: all that any row of this tile sees; this split takes its share, whole key tiles
        n_keys = tl.minimum(tl.max(pos, axis=0) + 1, KEYS).to(tl.int32)
        per_split = tl.cdiv(tl.cdiv(n_keys, SPLITS), TILE_N) * TILE_N
        start = split * per_split
        end = tl.minimum(start + per_split, n_keys)

        q_rows = (b * ROWS + rows).to(tl.int64)                            # index into the partials
        t_of, h_of = (rows // H).to(tl.int64), (rows % H).to(tl.int64)
        q_off = b * stride_q_b + t_of * stride_q_t + h_of * stride_q_h
        pe_off = b * stride_qpe_b + t_of * stride_qpe_t + h_of * stride_qpe_h
        q_lat = tl.load(q_lat_ptr + q_off[:, None] + offs_r[None, :],
                        mask=row_ok[:, None] & (offs_r < R)[None, :], other=0.0)      # [TILE_H, TILE_R]
        q_pe = tl.load(q_pe_ptr + pe_off[:, None] + offs_rp[None, :],
                       mask=row_ok[:, None] & (offs_rp < RP)[None, :], other=0.0)    # [TILE_H, TILE_RP]

        if INT8:
            kv_scale = tl.load(kv_scale_ptr + offs_r, mask=offs_r < R, other=0.0)    # [TILE_R] fp32
        else:
            kv_scale = tl.zeros([TILE_R], dtype=tl.float32)                            # unused
        # finite start for the running max: an all-masked tile then gives p = 0 and a rescale of 1, not NaN
        m_i = tl.full([TILE_H], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([TILE_H], dtype=tl.float32)
        acc = tl.zeros([TILE_H, TILE_R], dtype=tl.float32)
        table_ptr = block_tables_ptr + b * stride_table_b
        if WHILE_LOOP:
            # Triton 3.6's interpreter holds scalars as 1-element arrays, which `range` cannot take
            k0 = start
            while k0 < end:
                m_i, l_i, acc = _attend_key_tile(m_i, l_i, acc, q_lat, q_pe, pos, k0, end, cache_ptr, table_ptr,
                                                 qk_scale, stride_cache_n, stride_cache_s, stride_cache_c,
                                                 pe_ptr, stride_pe_n, stride_pe_s, stride_pe_c, kv_scale,
                                                 R, RP, PE_OFFSET, BLOCK_SIZE, TILE_N, TILE_R, TILE_RP, FP32_DOT,
                                                 INT8)
                k0 += TILE_N
        else:
            for k0 in range(start, end, TILE_N):       # a for loop, so that Triton pipelines the page loads
                m_i, l_i, acc = _attend_key_tile(m_i, l_i, acc, q_lat, q_pe, pos, k0, end, cache_ptr, table_ptr,
                                                 qk_scale, stride_cache_n, stride_cache_s, stride_cache_c,
                                                 pe_ptr, stride_pe_n, stride_pe_s, stride_pe_c, kv_scale,
                                                 R, RP, PE_OFFSET, BLOCK_SIZE, TILE_N, TILE_R, TILE_RP, FP32_DOT,
                                                 INT8)

        part = q_rows * SPLITS + split                                     # [TILE_H] index into the partials
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        # a row that saw no key in this split (l = 0) writes no partial: the combine does not read it
        tl.store(acc_ptr + part[:, None] * R + offs_r[None, :], acc,
                 mask=(row_ok & (l_i > 0))[:, None] & (offs_r < R)[None, :])

    @triton.jit
    def _combine_splits_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, ROWS, stride_o_b, stride_o_t, stride_o_h,
                               H: tl.constexpr, R: tl.constexpr, TILE_S: tl.constexpr, TILE_R: tl.constexpr):
        """One (batch row, query, head) and TILE_R of its R outputs: out = sum_s w_s acc_s / sum_s w_s l_s,
        w_s = 2^(m_s - max m). Only splits that saw a key (l_s > 0) are read: the split count follows
        the table's capacity, and a short context leaves most splits empty."""
        row = tl.program_id(0).to(tl.int64)
        offs_s, offs_r = tl.arange(0, TILE_S), tl.program_id(1) * TILE_R + tl.arange(0, TILE_R)
        s_ok, r_ok = offs_s < SPLITS, offs_r < R
        m = tl.load(m_ptr + row * SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + row * SPLITS + offs_s, mask=s_ok, other=0.0)
        weight = tl.exp2(m - tl.max(m, axis=0))                            # empty splits (m = -1e30) weigh 0
        acc = tl.load(acc_ptr + (row * SPLITS + offs_s)[:, None] * R + offs_r[None, :],
                      mask=(s_ok & (l > 0))[:, None] & r_ok[None, :], other=0.0)   # [TILE_S, TILE_R]
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
        b, t, h = row // ROWS, (row % ROWS) // H, row % H                 # out [B, T, H, R], any strides
        tl.store(out_ptr + b * stride_o_b + t * stride_o_t + h * stride_o_h + offs_r,
                 out.to(out_ptr.dtype.element_ty), mask=r_ok)


@dataclasses.dataclass(frozen=True)
class _TileConfig:
    tile_h: int          # (query, head) rows per program, >= 16
    tile_n: int          # keys per step, >= 16
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _config(dtype: torch.dtype, rows: int, R: int) -> _TileConfig:
    """Tiles for T * H = rows query rows of latent width R (measured on an H200, bf16, 4096-token contexts)."""
    if dtype == torch.float32:
        # twice the bytes per element: half the keys per step keeps the tiles in registers and shared memory
        return _TileConfig(tile_h=16, tile_n=16, num_warps=4, num_stages=2)
    if rows >= 64 and R >= 256:
        # many heads (V3: 128): 64 rows per program read each page a quarter as often as 16 rows would;
        # 8 warps hold the [64, 512] float32 accumulator without spilling; 64 keys a step use 216 KiB of
        # shared memory (Hopper has 227). V3, B = 64, T = 1: 291 us against 542 us with 16 x 32 tiles.
        return _TileConfig(tile_h=64, tile_n=64, num_warps=8, num_stages=2)
    # few heads (V2-Lite 16, the embedded model 8): 16 x 32 tiles were the fastest measured
    return _TileConfig(tile_h=16, tile_n=32, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132            # the interpreter: pretend an H200, so the split rule runs as it would there


def _num_splits(keys: int, base_programs: int, device: torch.device) -> int:
    """Splits per (row tile, batch row), from shapes only: enough programs to fill the GPU."""
    wanted = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(device), base_programs)
    return max(1, min(wanted, keys // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def int8_cache_supported(kv_cache: Tensor, R: int, rope_dtype: torch.dtype) -> bool:
    """Whether the kernel reads this int8 cache: its rope bytes start on a rope-dtype boundary (R a
    multiple of the rope itemsize) and an entry's bytes are contiguous, so they can be viewed as that dtype."""
    return (R % rope_dtype.itemsize == 0 and kv_cache.stride(2) == 1
            and kv_cache.stride(0) % rope_dtype.itemsize == 0 and kv_cache.stride(1) % rope_dtype.itemsize == 0)


def mla_paged_decode(q_lat: Tensor, q_pe: Tensor, kv_cache: Tensor, block_tables: Tensor, positions: Tensor,
                     scale: float, num_splits: int | None = None, kv_scale: Tensor | None = None,
                     rope_dtype: torch.dtype | None = None) -> Tensor:
    """The kernel alone: attention of latent queries over the paged cache.

    q_lat [B, T, H, R], q_pe [B, T, H, r] (any strides but a unit last one: read in place), kv_cache
    [N, bs, R + r], block_tables [B, M], positions [B, T] -> out_lat [B, T, H, R] in q_lat's dtype, laid
    out head-major ([H, B, T, R] in memory: the layout the W_UV product reads without a copy).
    num_splits overrides the split rule (tests).
    An int8 cache (C8, ops/kv_int8.py): kv_cache int8 [N, bs, R + r * itemsize(rope_dtype)] with
    kv_scale fp32 [R] and rope_dtype given (int8_cache_supported must hold).
    """
    B, T, H, R = q_lat.shape
    r = q_pe.shape[3]
    int8 = kv_cache.dtype == torch.int8
    if int8:
        if kv_scale is None or rope_dtype is None or not int8_cache_supported(kv_cache, R, rope_dtype):
            raise ValueError("mla_paged_decode: an int8 cache needs kv_scale and rope_dtype, R a multiple of the "
                             "rope itemsize and contiguous entries")
        pe = kv_cache.view(rope_dtype)                                         # [N, bs, R / itemsize + r]
        pe_offset, kv_scale = R // rope_dtype.itemsize, kv_scale.float().contiguous()
    else:
        pe, pe_offset, kv_scale = kv_cache, R, q_lat.new_empty(0, dtype=torch.float32)   # scale unused
    bs, rows, keys = kv_cache.shape[1], T * H, block_tables.shape[1] * kv_cache.shape[1]
    config = _config(q_lat.dtype, rows, R)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    tiles = triton.cdiv(rows, config.tile_h)
    splits = num_splits or _num_splits(keys, B * tiles, q_lat.device)

    if q_lat.stride(-1) != 1:
        q_lat = q_lat.contiguous()
    q_pe = q_pe.to(q_lat.dtype)
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    m = q_lat.new_empty((B, rows, splits), dtype=torch.float32)                # per split: running max (log2),
    l = torch.empty_like(m)                                                    # sum of exponentials,
    acc = q_lat.new_empty((B, rows, splits, R), dtype=torch.float32)           # unnormalised output
    _paged_decode_split_kernel[(tiles, splits, B)](
        q_lat, q_pe, kv_cache, pe, kv_scale, block_tables, positions, m, l, acc, scale * _LOG2E,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), pe.stride(0), pe.stride(1), pe.stride(2),
        block_tables.stride(0), positions.stride(0), positions.stride(1), *q_lat.stride()[:3], *q_pe.stride()[:3],
        rows, keys, splits,
        H=H, R=R, RP=r, PE_OFFSET=pe_offset, BLOCK_SIZE=bs, TILE_H=config.tile_h, TILE_N=config.tile_n,
        TILE_R=max(16, triton.next_power_of_2(R)), TILE_RP=max(16, triton.next_power_of_2(r)),
        # Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits: there, upcast
        # them (bf16 x bf16 products are exact in float32, so this is the tensor cores' arithmetic)
        FP32_DOT=q_lat.dtype == torch.float32 or (interpreted and q_lat.dtype == torch.bfloat16),
        WHILE_LOOP=interpreted, INT8=int8, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    out_lat = q_lat.new_empty((H, B, T, R)).permute(1, 2, 0, 3)              # [B, T, H, R], head-major
    tile_r = min(_COMBINE_TILE_R, triton.next_power_of_2(R))
    _combine_splits_kernel[(B * rows, triton.cdiv(R, tile_r))](m, l, acc, out_lat, splits, rows, *out_lat.stride()[:3],
                                                               H=H, R=R, TILE_S=triton.next_power_of_2(splits),
                                                               TILE_R=tile_r, num_warps=4)
    return out_lat


def _absorb_q(q_nope: Tensor, w_uk: Tensor) -> Tensor:
    """q_nope [B, T, H, D] @ W_UK [H, D, R] -> q_lat [B, T, H, R], as one batched GEMM over heads whose
    result stays head-major ([H, B * T, R]): the kernel reads it through strides, so no layout copy
    (an einsum's [B, T, H, R] result needed one per call from T = 2, an MTP verify)."""
    B, T, H, D = q_nope.shape
    q = q_nope.permute(2, 0, 1, 3).reshape(H, B * T, D)                   # a view when (b, t) merge
    return torch.bmm(q, w_uk).view(H, B, T, -1).permute(1, 2, 0, 3)


def _project_v(out_lat: Tensor, w_uv: Tensor, dtype: torch.dtype) -> Tensor:
    """out_lat [B, T, H, R] (head-major, as mla_paged_decode writes it) @ W_UV^T [H, R, dv] -> a
    contiguous [B, T, H, dv] in `dtype`. The batched GEMM over heads writes each head's [B*T, dv]
    block straight into the token-major result (row stride H * dv, batch stride dv: a layout cuBLAS
    takes as is), so no layout copy follows it (one per call from B * T = 2 on, before)."""
    B, T, H, R = out_lat.shape
    y = out_lat.new_empty((B * T, H, w_uv.shape[1]))                                        # [B*T, H, dv]
    torch.bmm(out_lat.permute(2, 0, 1, 3).reshape(H, B * T, R), w_uv.transpose(1, 2), out=y.transpose(0, 1))
    return y.view(B, T, H, -1).to(dtype)


def mla_paged_attention_cuda(q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, block_tables: Tensor,
                             positions: Tensor, kv_b_weight: Tensor, w_uk: Tensor, w_uv: Tensor, scale: float,
                             absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    """graphopt::mla_paged_attention on CUDA: the Triton kernel for decode-sized T, the reference above."""
    _check(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight, w_uk, w_uv)
    if q_nope.shape[1] > absorb_max_tokens or q_nope.dtype not in _KERNEL_DTYPES:
        return mla_paged_attention_reference(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight,
                                             w_uk, w_uv, scale, absorb_max_tokens)
    out_lat = mla_paged_decode(_absorb_q(q_nope, w_uk), q_pe, kv_cache, block_tables, positions, scale)
    return _project_v(out_lat, w_uv, q_nope.dtype)


def mla_paged_attention_int8_cuda(q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, kv_scale: Tensor,
                                  rope_dtype: torch.dtype, block_tables: Tensor, positions: Tensor,
                                  kv_b_weight: Tensor, w_uk: Tensor, w_uv: Tensor, scale: float,
                                  absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    """graphopt::mla_paged_attention_int8 on CUDA: the kernel over the int8 cache for decode-sized T;
    the op's reference (gather, decode, attention) for prefill and the layouts the kernel does not read."""
    _check_int8(q_nope, q_pe, kv_cache, kv_scale, rope_dtype, block_tables, positions, kv_b_weight, w_uk, w_uv)
    if (q_nope.shape[1] > absorb_max_tokens or q_nope.dtype not in _KERNEL_DTYPES
            or not int8_cache_supported(kv_cache, w_uk.shape[2], rope_dtype)):
        return mla_paged_attention_int8_reference(q_nope, q_pe, kv_cache, kv_scale, rope_dtype, block_tables,
                                                  positions, kv_b_weight, w_uk, w_uv, scale, absorb_max_tokens)
    out_lat = mla_paged_decode(_absorb_q(q_nope, w_uk), q_pe, kv_cache, block_tables, positions, scale,
                               kv_scale=kv_scale, rope_dtype=rope_dtype)
    return _project_v(out_lat, w_uv, q_nope.dtype)


_registered = False


def register() -> bool:
    """Make mla_paged_attention_cuda the op's CUDA kernel, once (later calls do nothing).

    Returns whether the kernel is registered: False, and nothing done, when not available().
    """
    global _registered
    if not _registered and available():
        torch.library.register_kernel("graphopt::mla_paged_attention", "cuda", mla_paged_attention_cuda)
        torch.library.register_kernel("graphopt::mla_paged_attention_int8", "cuda", mla_paged_attention_int8_cuda)
        _registered = True
    return _registered
