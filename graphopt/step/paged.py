"""The paged KV cache in one place: where a position's entry lives, and the layout of the caches.

A cache is [num_blocks, block_size, kv_cache_dim]; block 0 is the sink, never handed to a request, so
padding tokens and rows past their table write there and batches need no masks on the write side.

    slot(p) = block_tables[b, p // block_size] * block_size + p % block_size
            = 0 (the sink)   where the position is not valid or p // block_size is past the table

Every caller (capture's example inputs, the step template, the providers, calibration, evaluation,
`CompiledModel.__call__`) goes through `slot_mapping`; a second copy of the formula once clamped
positions past the table onto its last block, overwriting a live entry instead of the sink.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CacheLayout", "blocks_for", "dense_block_tables", "slot_mapping"]


def slot_mapping(positions: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Flat cache slot per position [B, T]; the sink slot 0 where not `valid` or past the block table.

    positions, valid: [B, T] (valid None: every position); block_tables: [B, M] int64."""
    block = positions.clamp(min=0) // block_size
    inside = block < block_tables.shape[1]
    slots = block_tables.gather(1, block.clamp(max=block_tables.shape[1] - 1)) * block_size \
        + positions % block_size
    keep = inside if valid is None else valid & inside
    return torch.where(keep, slots, torch.zeros_like(slots))


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions (ceil division)."""
    return -(-tokens // block_size)


def dense_block_tables(batch: int, blocks_per_row: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, blocks_per_row]: row b owns the consecutive blocks 1 + b * blocks_per_row ..; block 0 stays
    the sink, so caches for these tables need 1 + batch * blocks_per_row blocks."""
    return 1 + torch.arange(batch * blocks_per_row, device=device).view(batch, blocks_per_row)


@dataclass(frozen=True)
class CacheLayout:
    """What a step's caches look like: `num_layers` main caches and `num_mtp` MTP caches, each
    [num_blocks, block_size, kv_cache_dim] of `dtype` on `device` (num_blocks is the runtime's choice)."""

    num_layers: int
    block_size: int
    kv_cache_dim: int
    dtype: torch.dtype
    device: torch.device
    num_mtp: int = 0

    def new_caches(self, num_blocks: int, with_mtp: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(kv_caches, mtp_caches), zeroed; no MTP caches when with_mtp is False (plain decoding)."""
        new = lambda n: [torch.zeros(num_blocks, self.block_size, self.kv_cache_dim, dtype=self.dtype,
                                     device=self.device) for _ in range(n)]
        return new(self.num_layers), new(self.num_mtp if with_mtp else 0)

    @classmethod
    def for_config(cls, config, block_size: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", num_mtp: int | None = None) -> "CacheLayout":
        """The layout a DeepseekV3Config implies (num_mtp defaults to its MTP layers)."""
        mtp = config.num_nextn_predict_layers if num_mtp is None else num_mtp
        return cls(config.num_hidden_layers, block_size, config.kv_cache_dim, dtype, torch.device(device), mtp)
