"""graphopt::mla_paged_attention: MLA attention that reads its keys straight from the paged latent cache.

The reference model (`models/deepseek.py`, MLAttention with a cache) gathers every sequence's whole
context out of the paged cache, then attends with a causal mask; `graphopt::mla_attention` does the
attending. This op is the two together, so that a backend can fuse them: its CUDA kernel
(`backends/inductor/kernels/mla_decode.py`) walks the block table instead of materialising the gather,
and reads only the pages a query can see.

Shapes (B batch, T queries, H heads, dn qk_nope_head_dim, r qk_rope_head_dim, R kv_lora_rank,
dv v_head_dim, N cache blocks, bs block size, M blocks per sequence, S = M * bs gathered keys):

    q_nope [B, T, H, dn]   q_pe [B, T, H, r]   (queries; q_pe already roped)
    kv_cache [N, bs, R + r]                    (one layer's cache: normalised latent, then roped k_pe)
    block_tables [B, M] int64                  (the blocks of each sequence, in order)
    positions [B, T] int64                     (each query's position in its sequence)
    kv_b_weight [H * (dn + dv), R]   w_uk [H, dn, R]   w_uv [H, dv, R]   (as for mla_attention)
    -> out [B, T, H, dv] in q_nope's dtype, contiguous

Semantics: key j of row b is cache[block_tables[b, j // bs], j % bs] (so gathered slot j holds
position j), and it is visible to query (b, t) iff j <= positions[b, t]. Stale slots past a
sequence's length are never read; padding rows (position 0) see key 0 only. The reference below is,
bit for bit, what the model computes today: the gather, cast to q's dtype, then mla_attention, which
picks the absorbed form for T <= absorb_max_tokens and the expanded form above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import ABSORB_MAX_TOKENS, _require, mla_attention
from .kv_int8 import decode_kv_int8, int8_kv_dim

__all__ = ["mla_paged_attention", "mla_paged_attention_reference", "mla_paged_attention_int8",
           "mla_paged_attention_int8_reference"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check(q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, block_tables: Tensor, positions: Tensor,
           kv_b_weight: Tensor, w_uk: Tensor, w_uv: Tensor, stored_dim=None, op="graphopt.mla_paged_attention") -> None:
    _require(q_nope.dim() == 4, f"{op}: q_nope must be [B, T, H, dn], got shape {tuple(q_nope.shape)}")
    B, T, H, dn = q_nope.shape
    _require(q_nope.dtype in _FLOAT_DTYPES,
             f"{op}: q_nope must be float32, bfloat16, float16 or float64, got {q_nope.dtype}")
    _require(q_pe.dim() == 4 and q_pe.shape[0] == B and q_pe.shape[1] == T and q_pe.shape[2] == H,
             f"{op}: q_pe must be [B, T, H, r] = [{B}, {T}, {H}, r], got shape {tuple(q_pe.shape)}")
    _require(q_pe.dtype == q_nope.dtype, f"{op}: q_pe must have q_nope's dtype {q_nope.dtype}, got {q_pe.dtype}")
    _require(w_uk.dim() == 3 and w_uk.shape[0] == H and w_uk.shape[1] == dn,
             f"{op}: w_uk must be [H, dn, R] = [{H}, {dn}, R], got shape {tuple(w_uk.shape)}")
    R, r = w_uk.shape[2], q_pe.shape[3]
    _require(w_uv.dim() == 3 and w_uv.shape[0] == H and w_uv.shape[2] == R,
             f"{op}: w_uv must be [H, dv, R] = [{H}, dv, {R}], got shape {tuple(w_uv.shape)}")
    dv = w_uv.shape[1]
    _require(kv_b_weight.dim() == 2 and kv_b_weight.shape[0] == H * (dn + dv) and kv_b_weight.shape[1] == R,
             f"{op}: kv_b_weight must be [H * (dn + dv), R] = [{H * (dn + dv)}, {R}], "
             f"got shape {tuple(kv_b_weight.shape)}")
    if stored_dim is None:
        _require(kv_cache.dim() == 3 and kv_cache.shape[2] == R + r,
                 f"{op}: kv_cache must be [num_blocks, block_size, R + r] with R + r = {R} + {r} = {R + r} "
                 f"(R from w_uk, r from q_pe), got shape {tuple(kv_cache.shape)}")
        _require(kv_cache.dtype.is_floating_point, f"{op}: kv_cache must be floating point, got {kv_cache.dtype}")
    else:
        _require(kv_cache.dim() == 3 and kv_cache.shape[2] == stored_dim,
                 f"{op}: kv_cache must be int8 [num_blocks, block_size, R + r * rope itemsize] = [N, bs, "
                 f"{stored_dim}] (R = {R} from w_uk, r = {r} from q_pe), got shape {tuple(kv_cache.shape)}")
        _require(kv_cache.dtype == torch.int8, f"{op}: kv_cache must be int8 (C8 storage), got {kv_cache.dtype}")
    _require(block_tables.dim() == 2 and block_tables.shape[0] == B,
             f"{op}: block_tables must be [B, max_blocks] = [{B}, M], got shape {tuple(block_tables.shape)}")
    _require(block_tables.dtype == torch.int64, f"{op}: block_tables must be int64, got {block_tables.dtype}")
    _require(positions.dim() == 2 and positions.shape[0] == B and positions.shape[1] == T,
             f"{op}: positions must be [B, T] = [{B}, {T}], got shape {tuple(positions.shape)}")
    _require(positions.dtype == torch.int64, f"{op}: positions must be int64, got {positions.dtype}")


def mla_paged_attention_reference(q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, block_tables: Tensor,
                                  positions: Tensor, kv_b_weight: Tensor, w_uk: Tensor, w_uv: Tensor,
                                  scale: float, absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    """The op's meaning as plain torch: gather the paged context, mask by position, mla_attention.

    A plain function (no dispatch) so that a backend kernel can fall back to it for the cases it
    does not cover without calling itself again through the op.
    """
    context = kv_cache[block_tables].flatten(1, 2).to(q_nope.dtype)          # [B, S = M * bs, R + r]
    return _attend_context(q_nope, q_pe, context, positions, kv_b_weight, w_uk, w_uv, scale, absorb_max_tokens)


def _attend_context(q_nope, q_pe, context, positions, kv_b_weight, w_uk, w_uv, scale, absorb_max_tokens):
    """mla_attention of q over the gathered context [B, S, R + r], key j visible iff j <= position."""
    R, r = w_uk.shape[2], q_pe.shape[3]
    latent, k_pe = context.split([R, r], dim=-1)
    key_positions = torch.arange(context.shape[1], device=q_nope.device)      # gathered slot j: position j
    visible = key_positions[None, None, None, :] <= positions[:, None, :, None]   # [B, 1, T, S]
    return mla_attention(q_nope, q_pe, latent, k_pe, kv_b_weight, w_uk, w_uv, visible, scale, absorb_max_tokens)


@torch.library.custom_op("graphopt::mla_paged_attention", mutates_args=())
def mla_paged_attention(q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, block_tables: Tensor, positions: Tensor,
                        kv_b_weight: Tensor, w_uk: Tensor, w_uv: Tensor, scale: float,
                        absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    """MLA attention of q over the paged cache through block_tables, causal by position (module doc)."""
    _check(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight, w_uk, w_uv)
    return mla_paged_attention_reference(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight,
                                         w_uk, w_uv, scale, absorb_max_tokens)


@mla_paged_attention.register_fake
def _(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight, w_uk, w_uv, scale,
      absorb_max_tokens=ABSORB_MAX_TOKENS):
    _check(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight, w_uk, w_uv)
    B, T, H = q_nope.shape[:3]
    return q_nope.new_empty((B, T, H, w_uv.shape[1]))


# -- C8: the latent cache stored as int8 (ops/kv_int8.py) ---------------------------------------------

def _check_int8(q_nope, q_pe, kv_cache, kv_scale, rope_dtype, block_tables, positions, kv_b_weight, w_uk, w_uv):
    op = "graphopt.mla_paged_attention_int8"
    R, r = w_uk.shape[2], q_pe.shape[3]
    _require(kv_scale.dim() == 1 and kv_scale.shape[0] == R,
             f"{op}: kv_scale must be the latent's per-channel scales [R = {R}], got shape {tuple(kv_scale.shape)}")
    _require(rope_dtype.is_floating_point, f"{op}: rope_dtype must be a float dtype, got {rope_dtype}")
    _check(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight, w_uk, w_uv,
           stored_dim=int8_kv_dim(R, r, rope_dtype), op=op)


@torch.library.custom_op("graphopt::mla_paged_attention_int8", mutates_args=())
def mla_paged_attention_int8(q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, kv_scale: Tensor,
                             rope_dtype: torch.dtype, block_tables: Tensor, positions: Tensor,
                             kv_b_weight: Tensor, w_uk: Tensor, w_uv: Tensor, scale: float,
                             absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    """mla_paged_attention over an int8 cache (C8): kv_cache int8 [N, bs, R + r * itemsize(rope_dtype)],
    kv_scale fp32 [R]. Each gathered entry is decoded (latent codes x kv_scale, rope bytes as
    rope_dtype) into the float entry the unquantised cache would hold, then attended exactly as
    mla_paged_attention does. CUDA: the Triton MLA decode kernel reads the codes in place
    (backends/inductor/kernels/mla_decode.py)."""
    _check_int8(q_nope, q_pe, kv_cache, kv_scale, rope_dtype, block_tables, positions, kv_b_weight, w_uk, w_uv)
    return mla_paged_attention_int8_reference(q_nope, q_pe, kv_cache, kv_scale, rope_dtype, block_tables, positions,
                                              kv_b_weight, w_uk, w_uv, scale, absorb_max_tokens)


def mla_paged_attention_int8_reference(q_nope: Tensor, q_pe: Tensor, kv_cache: Tensor, kv_scale: Tensor,
                                       rope_dtype: torch.dtype, block_tables: Tensor, positions: Tensor,
                                       kv_b_weight: Tensor, w_uk: Tensor, w_uv: Tensor, scale: float,
                                       absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    """mla_paged_attention_int8's meaning as plain torch (no dispatch, for kernels to fall back to)."""
    context = decode_kv_int8(kv_cache[block_tables].flatten(1, 2), kv_scale, rope_dtype).to(q_nope.dtype)
    return _attend_context(q_nope, q_pe, context, positions, kv_b_weight, w_uk, w_uv, scale, absorb_max_tokens)


@mla_paged_attention_int8.register_fake
def _(q_nope, q_pe, kv_cache, kv_scale, rope_dtype, block_tables, positions, kv_b_weight, w_uk, w_uv, scale,
      absorb_max_tokens=ABSORB_MAX_TOKENS):
    _check_int8(q_nope, q_pe, kv_cache, kv_scale, rope_dtype, block_tables, positions, kv_b_weight, w_uk, w_uv)
    B, T, H = q_nope.shape[:3]
    return q_nope.new_empty((B, T, H, w_uv.shape[1]))
