"""Paged latent KV cache: the cache tensors, a block allocator and per-request block tables.

Layout (see `graphopt.models.deepseek`): one tensor per layer, [num_blocks, block_size, kv_cache_dim]
(kv_cache_dim = kv_lora_rank + qk_rope_head_dim = 576 for DeepSeek-V3), for every main layer and
every MTP layer the step provider uses. Block 0 is the padding sink: padding tokens and inactive
rows write there, so it is never handed to a request.

Sizing from a memory budget in bytes:

    bytes_per_block = block_size * kv_cache_dim * dtype_size * (num_layers + num_mtp_layers)
    num_blocks      = budget // bytes_per_block          (block 0 included, so usable = num_blocks - 1)

e.g. DeepSeek-V3 in bf16, block_size 64, 61 + 1 layers: 64 * 576 * 2 * 62 = 4.57 MB per block of
64 tokens, so 16 GiB hold 3758 blocks = 240k tokens across all requests.

Admission reserves, growth allocates. A request is admitted only when the blocks it could ever need
(prompt + max_new_tokens + the speculative window) are free of other reservations; the blocks
themselves are taken as the request's prompt chunks are scheduled (the rest of the reservation with
its last chunk) and all return when it leaves. Reserving the
worst case means a running request never finds the cache full (no preemption, no recompute); the
price is that an early eos leaves part of the reservation unused until the request leaves.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BlockAllocator", "CacheFullError", "PagedKVCache", "RequestTooLongError", "blocks_for_budget"]

SINK_BLOCK = 0


class RequestTooLongError(ValueError):
    """A request that could never fit: longer than the cache or than the model's positions."""


class CacheFullError(RuntimeError):
    """Internal: an allocation beyond what was reserved (a runtime bug, not a user error)."""


def blocks_for_budget(budget_bytes: int, block_size: int, kv_cache_dim: int, dtype: torch.dtype,
                      num_layers: int, num_mtp_layers: int) -> int:
    """num_blocks (sink included) that fit in `budget_bytes`; see the module docstring."""
    per_block = block_size * kv_cache_dim * dtype.itemsize * (num_layers + num_mtp_layers)
    n = budget_bytes // per_block
    if n < 2:
        raise ValueError(f"a cache budget of {budget_bytes} bytes holds {n} block(s) of {per_block} bytes "
                         f"(block_size {block_size} x kv_cache_dim {kv_cache_dim} x {dtype.itemsize} bytes x "
                         f"{num_layers + num_mtp_layers} layers); need at least 2 (the sink and one usable)")
    return int(n)


class BlockAllocator:
    """Hands out blocks 1..num_blocks-1 (block 0 is the sink); tracks who owns each in debug mode."""

    def __init__(self, num_blocks: int, debug: bool = False):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (the sink block 0 and one usable), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._owner: dict[int, object] | None = {} if debug else None

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, owner: object) -> int:
        if not self._free:
            raise CacheFullError("no free cache block: an allocation was not covered by a reservation")
        block = self._free.pop()
        if self._owner is not None:
            assert block != SINK_BLOCK and block not in self._owner, f"block {block} handed out twice"
            self._owner[block] = owner
        return block

    def free(self, blocks: list[int], owner: object) -> None:
        if self._owner is not None:
            for b in blocks:
                assert self._owner.get(b) is owner, f"block {b} freed by {owner!r}, owned by {self._owner.get(b)!r}"
                del self._owner[b]
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """The cache tensors plus each request's block list and reservation.

    kv_caches / mtp_caches: [num_blocks, block_size, kv_cache_dim] each (from the provider's
    `new_caches`). `max_positions` bounds prompt + max_new_tokens (max_position_embeddings).
    """

    def __init__(self, kv_caches: list[torch.Tensor], mtp_caches: list[torch.Tensor], max_positions: int,
                 debug: bool = False):
        if not kv_caches:
            raise ValueError("PagedKVCache needs at least one main-layer cache tensor")
        shapes = {tuple(t.shape) for t in (*kv_caches, *mtp_caches)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"cache tensors must all be [num_blocks, block_size, kv_cache_dim], got {shapes}")
        self.kv_caches, self.mtp_caches = kv_caches, mtp_caches
        self.num_blocks, self.block_size, _ = kv_caches[0].shape
        self.max_positions = max_positions
        # cache bytes one token takes over every layer (main and MTP), in the tensors' own dtype: e.g.
        # 576 x 2 x 62 = 71424 for DeepSeek-V3 in bf16; an int8 (C8) cache about half
        self.bytes_per_token = sum(t[0, 0].numel() * t.element_size() for t in (*kv_caches, *mtp_caches))
        self.allocator = BlockAllocator(self.num_blocks, debug)
        self.tables: dict[object, list[int]] = {}
        self._reserved: dict[object, int] = {}   # request -> blocks it may still take
        self._unreserved = self.allocator.num_usable

    @property
    def device(self) -> torch.device:
        return self.kv_caches[0].device

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_usable * self.block_size


    @property
    def bytes_per_block(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (*self.kv_caches, *self.mtp_caches))

    def blocks_for(self, num_positions: int) -> int:
        return math.ceil(num_positions / self.block_size)

    def check_fits(self, prompt_len: int, max_new_tokens: int, window: int) -> int:
        """Cache positions the request needs over its life; RequestTooLongError if it never fits.

        Its last decode step starts at position prompt_len + max_new_tokens - 2 and writes `window`
        positions from there (see `step.contract.window`).
        """
        total = prompt_len + max_new_tokens
        if total > self.max_positions:
            raise RequestTooLongError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's max_position_embeddings ({self.max_positions})")
        needed = max(prompt_len, prompt_len + max_new_tokens - 2 + window)
        if self.blocks_for(needed) > self.allocator.num_usable:
            raise RequestTooLongError(
                f"request needs {needed} cache slots (prompt {prompt_len} + max_new_tokens {max_new_tokens} - 1 "
                f"+ {window - 1} written ahead by speculative steps) but the whole cache holds {self.capacity_tokens} "
                f"({self.allocator.num_usable} blocks of {self.block_size}); raise the cache budget or "
                "shorten the request")
        return needed

    def can_admit(self, num_positions: int) -> bool:
        return self.blocks_for(num_positions) <= self._unreserved

    def admit(self, request: object, num_positions: int) -> None:
        n = self.blocks_for(num_positions)
        if n > self._unreserved:
            raise CacheFullError(f"admit: {n} blocks wanted, {self._unreserved} unreserved")
        self._unreserved -= n
        self._reserved[request] = n
        self.tables[request] = []

    def grow(self, request: object, num_positions: int) -> list[tuple[int, int]]:
        """Allocate blocks so the request covers positions [0, num_positions); returns new (index, block)."""
        table = self.tables[request]
        new = []
        while len(table) * self.block_size < num_positions:
            if self._reserved[request] == 0:
                raise CacheFullError(f"request {request!r} grew past its reservation ({len(table)} blocks)")
            self._reserved[request] -= 1
            table.append(self.allocator.allocate(request))
            new.append((len(table) - 1, table[-1]))
        return new

    def release(self, request: object) -> None:
        table = self.tables.pop(request)
        self.allocator.free(table, request)
        self._unreserved += len(table) + self._reserved.pop(request)

    def check_invariants(self) -> None:
        """Tables are disjoint, never hold the sink, and free + owned + reserved add up (tests, debug)."""
        owned = [b for t in self.tables.values() for b in t]
        assert SINK_BLOCK not in owned, "the sink block was handed to a request"
        assert len(owned) == len(set(owned)), "a block is in two block tables"
        assert len(owned) + self.allocator.num_free == self.allocator.num_usable, "a block leaked"
        assert self._unreserved + sum(self._reserved.values()) + len(owned) == self.allocator.num_usable
