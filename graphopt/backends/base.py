"""What a backend is: `Backend.lower(program, options) -> Executable`.

An Executable implements the step contract (`graphopt.step.contract.StepProvider`: prefill, decode,
new_caches, num_speculative_tokens, block_size, config, plus max_top_k and stats) and a plain
`forward(input_ids) -> logits` over the main graph (what `CompiledModel.__call__` runs). It owns
whatever execution needs (lowered graphs, static buffers, CUDA graphs per bucket, sessions). The
runtime drives it as any step provider and never asks which backend made it; a backend never
imports the runtime.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..passes.program import CompileOptions, Program
from ..step.contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from ..step.paged import CacheLayout, blocks_for, dense_block_tables, slot_mapping

__all__ = ["Backend", "Executable", "fresh_cache_forward"]


@runtime_checkable
class Executable(Protocol):
    program: Program              # what was lowered (graphs, signatures, cache layout, compile state)
    num_speculative_tokens: int
    block_size: int
    config: object                # graphopt.models.config.DeepseekV3Config
    max_top_k: int                # the largest top_k the step's sampling honours

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs: ...

    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs: ...

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    @property
    def stats(self) -> dict | None: ...


def fresh_cache_forward(main_fn: Callable, layout: CacheLayout, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> logits [B, T, vocab]: `main_fn` (the main graph, however the backend
    lowered it) over a fresh cache, row b in the consecutive blocks 1 + b * per_row .. (block 0: the
    sink). What every Executable's `forward` runs; the cache is dropped afterwards."""
    B, T = input_ids.shape
    per_row = blocks_for(T, layout.block_size)
    tables = dense_block_tables(B, per_row, layout.device)                          # [B, per_row]
    kv, _ = layout.new_caches(1 + B * per_row, with_mtp=False)
    positions = torch.arange(T, device=layout.device).expand(B, T)                  # [B, T]
    slots = slot_mapping(positions, tables, layout.block_size)                      # [B, T]
    logits, _ = main_fn(input_ids.to(layout.device), positions, slots, tables, kv)
    return logits


class Backend:
    """Subclasses set `name` and implement `lower`; register them in `graphopt.backends`."""

    name: str = ""

    def check(self, device: torch.device | str | None = None) -> None:
        """Called by graphopt.compile before capture: raise if this backend cannot run here (missing
        software, wrong device), so the user learns it before any heavy work. Default: nothing."""

    def lower(self, program: Program, options: CompileOptions) -> Executable:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
