"""Eager step provider for plain decoding (k = 0): the reference implementation of the step contract.

It runs a main step function (the captured order: `main_fn(input_ids, positions, slot_mapping,
block_tables, kv_caches) -> (logits, hidden)`; the eager model behind `step.model_step.MainStep` or a
lowered main graph) and does every piece of step bookkeeping with tensor ops on the device:
positions, slot mapping, sampling, eos / max_pos checks, the next step's tokens and start positions.
No `.item()`, no host loop over rows, no host sync, so the same code could be captured as a graph and
replayed. The speculative provider (k > 0) is `step/provider.py`, same contract. Sampling uses the
project's ops (`graphopt.ops.sampling`), so its determinism rule is the one every provider shares.
"""

from __future__ import annotations

import torch

from ..ops.sampling import DEFAULT_MAX_TOP_K, sample_from_probs, sampling_probs
from .contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from .model_step import MainStep
from .paged import CacheLayout, slot_mapping

__all__ = ["ReferenceStepProvider"]


class ReferenceStepProvider:
    """`StepProvider` for k = 0 (greedy and sampled plain decoding) over one main step function.

    `layout` gives the caches `new_caches` builds (its MTP caches are never used here)."""

    def __init__(self, main_fn, config, layout: CacheLayout, max_top_k: int = DEFAULT_MAX_TOP_K):
        if layout.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {layout.block_size}")
        self.main_fn, self.config, self.layout = main_fn, config, layout
        self.num_speculative_tokens = 0
        self.block_size = layout.block_size
        self.max_top_k = max_top_k        # the largest top_k the sampling op honours (Engine checks it)

    @classmethod
    def from_model(cls, model, num_speculative_tokens: int = 0, block_size: int = 16,
                   cache_dtype: torch.dtype | None = None, max_top_k: int = DEFAULT_MAX_TOP_K):
        """Over the eager reference model (`DeepseekV3ForCausalLM`); caches of its weights' dtype."""
        if num_speculative_tokens != 0:
            raise ValueError(f"ReferenceStepProvider implements plain decoding only (num_speculative_tokens=0), "
                             f"got {num_speculative_tokens}; speculative steps come from "
                             "graphopt.step.provider.SpecStepProvider")
        w = model.lm_head.weight
        layout = CacheLayout.for_config(model.config, block_size, cache_dtype or w.dtype, w.device, num_mtp=0)
        return cls(MainStep(model), model.config, layout, max_top_k)

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.layout.new_caches(num_blocks, with_mtp=False)

    def _logits(self, ids, positions, slots, inputs) -> torch.Tensor:
        return self.main_fn(ids, positions, slots, inputs.block_tables, inputs.kv_caches)[0]

    @torch.no_grad()
    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs:
        inputs.validate()
        B, T = inputs.ids.shape
        offsets = torch.arange(T, device=inputs.ids.device)[None, :]                 # [1, T]
        valid = offsets < inputs.lengths[:, None]                                     # [B, T]
        positions = torch.where(valid, inputs.start_pos[:, None] + offsets, torch.zeros_like(offsets))
        slots = slot_mapping(positions, inputs.block_tables, self.block_size, valid)
        logits = self._logits(inputs.ids, positions, slots, inputs)
        end = inputs.start_pos + inputs.lengths                                        # [B] prompt so far
        if not inputs.is_last_chunk:  # nothing is emitted before the prompt ends
            none = torch.zeros(B, dtype=torch.bool, device=end.device)
            return SpecStepOutputs(torch.full((B, 1), -1, dtype=torch.int64, device=end.device),
                                   torch.zeros_like(end), torch.full((B, 1), -1, dtype=torch.int64, device=end.device),
                                   end, none)
        last = logits.gather(1, (inputs.lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, logits.shape[-1]))
        active = torch.ones(B, dtype=torch.bool, device=end.device)
        return self._emit(last[:, 0], inputs, end, active)                            # first token at `end`

    @torch.no_grad()
    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        inputs.validate()
        positions = inputs.start_pos[:, None]                                          # [B, 1]
        slots = slot_mapping(positions, inputs.block_tables, self.block_size, inputs.active[:, None])
        positions = torch.where(inputs.active[:, None], positions, torch.zeros_like(positions))
        logits = self._logits(inputs.tokens, positions, slots, inputs)
        return self._emit(logits[:, -1], inputs, inputs.start_pos + 1, inputs.active)

    def _emit(self, logits: torch.Tensor, p, position: torch.Tensor, active: torch.Tensor) -> SpecStepOutputs:
        """Sample the token at `position` [B] from logits [B, V]; build outputs and next inputs."""
        # graphopt::sampling_probs is one-hot at the argmax for greedy rows; the draw for the token at
        # `position` is a function of (seed, position) only, so batch composition cannot change it
        probs = sampling_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p, self.max_top_k)  # [B, V]
        token = sample_from_probs(probs, p.seed, position)                                         # [B]
        stop = (token == p.eos_token_id) | (position >= p.max_pos)
        out = torch.where(active, token, torch.full_like(token, -1))[:, None]                      # [B, 1]
        num_emitted = active.to(torch.int64)
        # inactive rows keep a valid token id (0) so a replayed step can embed it
        nxt = torch.where(active, token, torch.zeros_like(token))[:, None]
        return SpecStepOutputs(out_tokens=out, num_emitted=num_emitted, next_tokens=nxt,
                               next_start_pos=position - 1 + num_emitted, finished=stop | ~active)
