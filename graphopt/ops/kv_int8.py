"""C8 cache storage: the MLA latent as int8 codes, the roped key part as its own bytes, in one int8 tensor.

One cache entry (one token of one layer), R = kv_lora_rank, r = qk_rope_head_dim, rope dtype = the
float dtype the cache held before (the model's: bf16 or float32):

    [ latent codes int8 [R] | k_pe, its rope-dtype bytes viewed as int8 [r * itemsize] ]
      q = round(latent / kv_scale) in [-127, 127]      (graphopt::quantize_kv, static per channel)

    bf16 model:    512 + 64 * 2 = 640 bytes a token a layer, against 576 * 2 = 1152 in bf16 (0.56)
    float32 model: 512 + 64 * 4 = 768 bytes, against 2304 (0.33)

The latent read back is dequantize_kv(q, kv_scale, rope dtype): exactly the value the C8 emulation
(quantize_kv -> dequantize_kv before a float cache) stored, so an int8 cache changes the bytes, not
the numbers. The 64-d roped key stays in 16 bit, as in DeepSeek's FlashMLA fp8 cache (it is a small
part of the bytes and rotary precision matters). `passes/store_int8_kv_cache.py` switches a
Program's caches to this layout; `graphopt::mla_paged_attention_int8` (ops/paged_attention.py) reads it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import quant as _quant  # noqa: F401  registers graphopt::quantize_kv / dequantize_kv

__all__ = ["int8_kv_dim", "kv_int8_entry", "encode_kv_int8", "decode_kv_int8"]

OPS = torch.ops.graphopt


def int8_kv_dim(kv_lora_rank: int, rope_dim: int, rope_dtype: torch.dtype) -> int:
    """Width (int8 elements) of one int8 cache entry."""
    return kv_lora_rank + rope_dim * rope_dtype.itemsize


def _rope_bytes(k_pe: Tensor, rope_dtype: torch.dtype) -> Tensor:
    return k_pe.to(rope_dtype).contiguous().view(torch.int8)                     # [..., r * itemsize]


@torch.library.custom_op("graphopt::kv_int8_entry", mutates_args=())
def kv_int8_entry(latent_q: Tensor, k_pe: Tensor, rope_dtype: torch.dtype) -> Tensor:
    """The int8 cache entry of new tokens: latent codes int8 [..., R] and k_pe [..., r] (cast to
    rope_dtype, stored as its bytes) -> int8 [..., R + r * itemsize]."""
    if latent_q.dtype != torch.int8:
        raise ValueError(f"graphopt::kv_int8_entry: latent_q must be the int8 codes of quantize_kv, got {latent_q.dtype}")
    return torch.cat([latent_q, _rope_bytes(k_pe, rope_dtype)], dim=-1)


@kv_int8_entry.register_fake
def _(latent_q, k_pe, rope_dtype):
    return latent_q.new_empty((*latent_q.shape[:-1], int8_kv_dim(latent_q.shape[-1], k_pe.shape[-1], rope_dtype)),
                              dtype=torch.int8)


def encode_kv_int8(entry: Tensor, kv_scale: Tensor, rope_dtype: torch.dtype) -> Tensor:
    """A float cache (entries [..., R + r], R = len(kv_scale)) in the int8 layout: what the writes store."""
    R = kv_scale.shape[-1]
    latent, k_pe = entry.split([R, entry.shape[-1] - R], dim=-1)
    return kv_int8_entry(OPS.quantize_kv(latent, kv_scale), k_pe, rope_dtype)


def decode_kv_int8(stored: Tensor, kv_scale: Tensor, rope_dtype: torch.dtype) -> Tensor:
    """int8 entries [..., R + r * itemsize] -> float [..., R + r] in rope_dtype (the float cache's value)."""
    R = kv_scale.shape[-1]
    codes, rope = stored.split([R, stored.shape[-1] - R], dim=-1)
    latent = OPS.dequantize_kv(codes, kv_scale, rope_dtype)
    return torch.cat([latent, rope.contiguous().view(rope_dtype)], dim=-1)
