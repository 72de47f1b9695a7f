"""Paged-cache arithmetic shared by every layer: where a position's entry lives, and dense block tables.

A cache is [num_blocks, block_size, kv_cache_dim]; block 0 is the sink, never handed to a request, so
padding tokens and rows past their table write there and batches need no masks on the write side.

    slot(p) = block_tables[b, p // block_size] * block_size + p % block_size
            = 0 (the sink)   where the position is not valid or p // block_size is past the table

It lives in `ops` (the lowest layer) so that `models` (evaluation), `step`, capture, the backends and
the runtime all use this one copy; `graphopt.step.paged` re-exports it next to the cache layout.
"""

from __future__ import annotations

import torch

__all__ = ["blocks_for", "dense_block_tables", "slot_mapping"]


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
