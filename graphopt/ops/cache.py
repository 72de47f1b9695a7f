"""graphopt::kv_cache_write: write new tokens' entries into a paged cache, in place.

    kv_cache_write(cache [N, bs, D] (mutated), slots [...] int64, entry [..., D]) -> None
    cache.view(N * bs, D)[slots[i]] = entry[i]   for every flat index i (entry cast to cache.dtype)

The captured step graphs write the cache functionally (export's form: `index_copy` over the whole
cache tensor, then a `copy_` of the result back into the cache input), which costs two full copies
of the cache per layer and step. `passes/reinplace_cache_writes.py` replaces each such chain by this
op, whose schema declares `cache` mutated: a step then touches only the slots it writes, whatever
the cache's capacity, on every backend (the eager FX interpreter calls it as is; Inductor keeps the
mutation in place through its functionalise / re-inplace round trip).

Slots are flat (block * block_size + offset, `step/paged.py`); padding tokens point at slot 0 (the
sink block), so several tokens may write slot 0 in one call and which one lands is unspecified; the
sink is never read. Any other slot must appear at most once per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kv_cache_write"]


def _require(cond, message: str) -> None:
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: message)
    elif not cond:
        raise ValueError(message)


def _check(cache: Tensor, slots: Tensor, entry: Tensor) -> None:
    op = "graphopt.kv_cache_write"
    _require(cache.dim() == 3, f"{op}: cache must be [num_blocks, block_size, D], got shape {tuple(cache.shape)}")
    _require(slots.dtype == torch.int64, f"{op}: slots must be int64 flat slot indices, got {slots.dtype}")
    _require(entry.dim() == slots.dim() + 1 and entry.shape[-1] == cache.shape[-1],
             f"{op}: entry must be slots' shape + [D = {cache.shape[-1]}], got entry {tuple(entry.shape)} "
             f"for slots {tuple(slots.shape)}")
    _require(entry.numel() == slots.numel() * cache.shape[-1],
             f"{op}: entry {tuple(entry.shape)} holds another number of tokens than slots {tuple(slots.shape)}")


@torch.library.custom_op("graphopt::kv_cache_write", mutates_args=("cache",))
def kv_cache_write(cache: Tensor, slots: Tensor, entry: Tensor) -> None:
    """cache.view(-1, D)[slots] = entry, in place (see the module doc)."""
    _check(cache, slots, entry)
    D = cache.shape[-1]
    cache.view(-1, D).index_copy_(0, slots.reshape(-1), entry.reshape(-1, D).to(cache.dtype))


@kv_cache_write.register_fake
def _(cache: Tensor, slots: Tensor, entry: Tensor) -> None:
    _check(cache, slots, entry)
