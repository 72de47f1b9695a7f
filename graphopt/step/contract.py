"""The step contract between the runtime and whatever computes a step (eager, compiled, speculative).

The runtime (`Engine`) owns requests, cache blocks and batching; a *step provider* owns the maths of
one step. They meet here, in three dataclasses of device tensors and one Protocol:

    SpecPrefillInputs -> provider.prefill -> SpecStepOutputs     (a prompt chunk, first token on the last)
    SpecStepInputs    -> provider.decode  -> SpecStepOutputs     (1 + k tokens verified, 1..k+1 emitted)

Every tensor lives on the model's device and nothing here asks the host to look at a value: the next
step's `tokens` and `start_pos` are the previous step's `next_tokens` and `next_start_pos`, so a
provider can be replayed step after step (CUDA graphs, multi-step) while the host only copies out
`out_tokens`, `num_emitted` and `finished` to stream them.

Shapes: B = batch rows, k = num_speculative_tokens (0 = plain decoding), M = block-table width,
T = prompt-chunk length. Positions: the token emitted at position p is the (p - prompt_len + 1)-th
generated token; a row finishes when it emits eos or the token at position `max_pos`
(= prompt_len + max_new_tokens - 1).

Both providers (`step/reference_provider.py`, `step/provider.py`) and every backend's Executable
import these names from here; field names are part of the contract, keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from graphopt.models.config import DeepseekV3Config

__all__ = ["IDLE_SAMPLING", "SAMPLING_FIELDS", "SpecPrefillInputs", "SpecStepInputs", "SpecStepOutputs",
           "StepProvider"]

# Per-row request parameters shared by prefill and decode inputs: (name, dtype).
SAMPLING_FIELDS = (
    ("temperature", torch.float32),   # 0 = greedy
    ("top_k", torch.int64),           # 0 = off
    ("top_p", torch.float32),         # 1 = off
    ("min_p", torch.float32),         # 0 = off
    ("seed", torch.int64),            # draws are a function of (seed, position): see ops.sampling
    ("eos_token_id", torch.int64),    # -1 = none
    ("max_pos", torch.int64),         # finish after emitting the token at this position
)

# The fields' values for a row that holds no request (padding rows of a batch bucket): greedy, no
# filters; such a row is also inactive, so it emits nothing and writes only the sink slot.
IDLE_SAMPLING = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0, "eos_token_id": -1,
                 "max_pos": 0}


@dataclass
class SpecStepInputs:
    """One decode step for B rows: verify `tokens` (last emitted + k drafts), emit 1..k+1 tokens each."""

    tokens: torch.Tensor          # [B, 1+k] int64
    start_pos: torch.Tensor       # [B] int64, position of tokens[:, 0] (its KV is not cached yet)
    block_tables: torch.Tensor    # [B, M] int64, padding entries 0 (the sink block)
    temperature: torch.Tensor     # [B] float32
    top_k: torch.Tensor           # [B] int64
    top_p: torch.Tensor           # [B] float32
    min_p: torch.Tensor           # [B] float32
    seed: torch.Tensor            # [B] int64
    eos_token_id: torch.Tensor    # [B] int64
    max_pos: torch.Tensor         # [B] int64
    active: torch.Tensor          # [B] bool, False: padding row (writes the sink slot, emits nothing)
    kv_caches: list[torch.Tensor] = field(default_factory=list)   # per main layer, updated in place
    mtp_caches: list[torch.Tensor] = field(default_factory=list)  # per MTP layer, updated in place
    greedy: bool = False          # host-side hint: every row has temperature 0, so a provider may run
                                  # its greedy-only step (same outputs, no sampling work)

    def validate(self, num_speculative_tokens: int | None = None) -> None:
        """Raise ValueError naming the field whose shape or dtype breaks the contract; with
        num_speculative_tokens, also when a row does not hold 1 + k tokens."""
        if not isinstance(self.greedy, bool):
            raise ValueError(f"SpecStepInputs.greedy: expected a python bool, got {type(self.greedy).__name__}")
        if self.tokens.dim() != 2:
            raise ValueError(f"SpecStepInputs.tokens: expected [B, 1+k] int64, got shape {tuple(self.tokens.shape)}")
        B, k1 = self.tokens.shape
        if num_speculative_tokens is not None and k1 != 1 + num_speculative_tokens:
            raise ValueError(f"SpecStepInputs.tokens: this step verifies 1 + k = {1 + num_speculative_tokens} "
                             f"tokens per row, got {k1}")
        _check(self, "tokens", (B, k1), torch.int64)
        _check(self, "start_pos", (B,), torch.int64)
        _check_table(self, B)
        _check_sampling(self, B)
        _check(self, "active", (B,), torch.bool)


@dataclass
class SpecPrefillInputs:
    """One prompt chunk per row, right-padded. lengths[b] real tokens start at position start_pos[b].

    On the last chunk (`is_last_chunk`, one flag for the whole batch) the provider samples the first
    token at position start_pos + lengths and, when k > 0, the first k drafts.
    """

    ids: torch.Tensor             # [B, T] int64, right-padded
    lengths: torch.Tensor         # [B] int64, real tokens in this chunk (>= 1)
    start_pos: torch.Tensor       # [B] int64, 0 or the tokens already prefilled (chunked prefill)
    block_tables: torch.Tensor    # [B, M] int64
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seed: torch.Tensor
    eos_token_id: torch.Tensor
    max_pos: torch.Tensor
    is_last_chunk: bool = True
    kv_caches: list[torch.Tensor] = field(default_factory=list)
    mtp_caches: list[torch.Tensor] = field(default_factory=list)

    def validate(self) -> None:
        if self.ids.dim() != 2:
            raise ValueError(f"SpecPrefillInputs.ids: expected [B, T] int64, got shape {tuple(self.ids.shape)}")
        B = self.ids.shape[0]
        _check(self, "ids", tuple(self.ids.shape), torch.int64)
        _check(self, "lengths", (B,), torch.int64)
        _check(self, "start_pos", (B,), torch.int64)
        _check_table(self, B)
        _check_sampling(self, B)
        if not isinstance(self.is_last_chunk, bool):
            raise ValueError(f"SpecPrefillInputs.is_last_chunk: expected a python bool, got "
                             f"{type(self.is_last_chunk).__name__}")


@dataclass
class SpecStepOutputs:
    """What a step emitted, and the inputs of the next step (still on the device)."""

    out_tokens: torch.Tensor      # [B, 1+k] int64, left-aligned, -1 past num_emitted
    num_emitted: torch.Tensor     # [B] int64, 1..k+1 for active rows, 0 for inactive rows
    next_tokens: torch.Tensor     # [B, 1+k] int64, last emitted token + k new drafts
    next_start_pos: torch.Tensor  # [B] int64, start_pos + num_emitted (prefill: start_pos + lengths)
    finished: torch.Tensor        # [B] bool, eos emitted, max_pos reached, or row inactive


@runtime_checkable
class StepProvider(Protocol):
    """What `Engine` needs from a step implementation.

    `new_caches(num_blocks)` returns (kv_caches, mtp_caches): zeroed tensors [num_blocks, block_size,
    kv_cache_dim], one per main layer and one per MTP layer the provider uses (none for k = 0). The
    engine sizes num_blocks from its memory budget, owns the tensors and passes them in every input.
    """

    num_speculative_tokens: int
    block_size: int
    config: DeepseekV3Config

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs: ...

    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs: ...

    # Optional: `decode_shape(rows, width) -> (rows, width)`, the rows and block-table width the
    # provider runs a decode batch of `rows` rows and `width` table columns with (e.g. a CUDA-graph
    # bucket). A runtime that passes inputs of that shape, padded with inactive rows, as views of the
    # same tensors every step, lets a replaying provider read them in place instead of copying them.


def window(num_speculative_tokens: int) -> int:
    """Cache positions a decode step at start_pos s may write: s .. s + window - 1, window = 2k + 1.

    The main model writes the k + 1 verified positions s..s+k; the chained MTP drafts 2..k write
    k - 1 positions starting at s + num_emitted (<= s + k + 1). One spare position keeps the bound
    safe whichever way a provider indexes its chain: a write past the block table would land in
    another position's slot, so the runtime always allocates the whole window ahead.
    """
    return 2 * num_speculative_tokens + 1


def _check(obj, name: str, shape: tuple, dtype: torch.dtype) -> None:
    t = getattr(obj, name)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{type(obj).__name__}.{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{type(obj).__name__}.{name}: expected shape {tuple(shape)} {dtype}, "
                         f"got {tuple(t.shape)} {t.dtype}")


def _check_table(obj, B: int) -> None:
    t = obj.block_tables
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != B or t.dtype != torch.int64:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{type(obj).__name__}.block_tables: expected [{B}, M] int64, got {got}")


def _check_sampling(obj, B: int) -> None:
    for name, dtype in SAMPLING_FIELDS:
        _check(obj, name, (B,), dtype)

