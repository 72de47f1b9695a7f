"""Host-side scheduling: the waiting queue, batch slots, cache reservations and prefill chunks.

Pure bookkeeping on Python lists: it never touches a tensor, so it is tested without a model.

Policy, per engine step:
  * admission is FIFO: the oldest waiting request is admitted when a batch slot is free and the
    cache can reserve its whole life (see `kv_cache`); a request that does not fit yet blocks the
    ones behind it, so a long request is not starved by a stream of short ones;
  * every admitted request advances its prompt by one chunk of at most `prefill_chunk_size` tokens
    per step; the chunk that ends a prompt is a "last" chunk (it samples the first token), so
    prefill runs as up to two batched calls: last chunks and earlier chunks;
  * after its last chunk a request joins the decode batch at its slot; it leaves when finished.
Slots are rows of the persistent decode batch; a request keeps its slot for life, and the decode
call covers rows [0, n) where n = 1 + the highest decoding slot (the others are inactive padding).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from .kv_cache import PagedKVCache
from .request import Request, Status

__all__ = ["Chunk", "Scheduler"]


@dataclass
class Chunk:
    """Prompt tokens [start, start + length) of one request, to prefill this step."""

    request: Request
    start: int
    length: int

    @property
    def is_last(self) -> bool:
        return self.start + self.length == len(self.request.prompt)


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch_size: int, prefill_chunk_size: int, window: int):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.prefill_chunk_size = prefill_chunk_size
        self.window = window                     # positions a decode step writes (step.contract.window)
        self.waiting: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * max_batch_size
        self._free_slots = list(range(max_batch_size))  # a heap: the lowest slot first keeps n small

    # -- joining ------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """Move waiting requests into slots while slots and cache reservations allow (FIFO)."""
        admitted = []
        while self.waiting and self._free_slots and self.cache.can_admit(self.waiting[0].needed_positions):
            r = self.waiting.popleft()
            r.slot = heapq.heappop(self._free_slots)
            r.status = Status.PREFILL
            self.slots[r.slot] = r
            self.cache.admit(r, r.needed_positions)
            admitted.append(r)
        return admitted

    # -- one step's work ----------------------------------------------------------------------
    def prefill_chunks(self) -> tuple[list[Chunk], list[Chunk]]:
        """(last chunks, earlier chunks) for every request still in prefill, in slot order."""
        last, partial = [], []
        for r in self.slots:
            if r is not None and r.status is Status.PREFILL:
                c = Chunk(r, r.prefilled, min(self.prefill_chunk_size, len(r.prompt) - r.prefilled))
                (last if c.is_last else partial).append(c)
        return last, partial

    def decoding(self) -> list[Request]:
        return [r for r in self.slots if r is not None and r.status is Status.DECODE]

    def batch_rows(self) -> int:
        """n: the decode call covers slots [0, n)."""
        return max((r.slot + 1 for r in self.decoding()), default=0)

    def grow(self, chunks: list[Chunk]) -> list[tuple[int, int, int]]:
        """Allocate the blocks this step's prefill chunks write; returns new block-table entries
        (slot, index, block).

        An earlier chunk takes the blocks up to its end; a last chunk takes the request's whole
        reservation (every position its decode steps can write), so a decoding request never waits
        for the host to grow its table and consecutive decode steps need nothing from the host.
        """
        entries = []
        for c in chunks:
            end = c.request.needed_positions if c.is_last else c.start + c.length
            entries += [(c.request.slot, i, b) for i, b in self.cache.grow(c.request, end)]
        return entries

    def table_width(self, requests: list[Request]) -> int:
        """Block-table columns a call over these requests needs (the widest of their tables)."""
        return max((len(self.cache.tables[r]) for r in requests), default=1) or 1

    # -- leaving ------------------------------------------------------------------------------
    def finish(self, request: Request) -> None:
        """Release a request's slot and blocks (or drop it from the queue if it never started)."""
        if request.status is Status.WAITING:
            self.waiting.remove(request)
        elif request.status is not Status.FINISHED:
            self.cache.release(request)
            self.slots[request.slot] = None
            heapq.heappush(self._free_slots, request.slot)
        request.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)
