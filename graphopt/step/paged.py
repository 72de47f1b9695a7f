"""The paged KV cache in one place: where a position's entry lives, and the layout of the caches.

A cache is [num_blocks, block_size, kv_cache_dim]; block 0 is the sink, never handed to a request, so
padding tokens and rows past their table write there and batches need no masks on the write side.

    slot(p) = block_tables[b, p // block_size] * block_size + p % block_size
            = 0 (the sink)   where the position is not valid or p // block_size is past the table

Every caller (capture's example inputs, the step template, the providers, calibration, evaluation,
`CompiledModel.__call__`) goes through `slot_mapping` (defined in `ops/paged.py`, re-exported here); a second copy of the formula once clamped
positions past the table onto its last block, overwriting a live entry instead of the sink.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.paged import blocks_for, dense_block_tables, slot_mapping

__all__ = ["CacheLayout", "blocks_for", "dense_block_tables", "slot_mapping"]


@dataclass(frozen=True)
class CacheLayout:
    """What a step's caches look like: `num_layers` main caches and `num_mtp` MTP caches, each
    [num_blocks, block_size, kv_cache_dim] of `storage_dtype` on `device` (num_blocks is the runtime's
    choice). `dtype` is the model's float dtype; the caches hold it too unless `cache_dtype` says
    otherwise (C8: int8, the latent as int8 codes and the rope part's bytes: ops/kv_int8.py)."""

    num_layers: int
    block_size: int
    kv_cache_dim: int
    dtype: torch.dtype
    device: torch.device
    num_mtp: int = 0
    cache_dtype: torch.dtype | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.cache_dtype or self.dtype

    def bytes_per_token(self, with_mtp: bool = True) -> int:
        """Cache bytes one token position costs over every layer (and the MTP layers)."""
        layers = self.num_layers + (self.num_mtp if with_mtp else 0)
        return self.kv_cache_dim * self.storage_dtype.itemsize * layers

    def new_caches(self, num_blocks: int, with_mtp: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(kv_caches, mtp_caches), zeroed; no MTP caches when with_mtp is False (plain decoding)."""
        new = lambda n: [torch.zeros(num_blocks, self.block_size, self.kv_cache_dim, dtype=self.storage_dtype,
                                     device=self.device) for _ in range(n)]
        return new(self.num_layers), new(self.num_mtp if with_mtp else 0)

    @classmethod
    def for_config(cls, config, block_size: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", num_mtp: int | None = None) -> "CacheLayout":
        """The layout a DeepseekV3Config implies (num_mtp defaults to its MTP layers)."""
        mtp = config.num_nextn_predict_layers if num_mtp is None else num_mtp
        return cls(config.num_hidden_layers, block_size, config.kv_cache_dim, dtype, torch.device(device), mtp)
