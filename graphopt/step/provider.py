"""The speculative step provider: `SpecStepProvider` over SpecStep / SpecPrefill modules or their fused
graphs, the device-side acceptance statistics (`SpecStats`), and `speculative_generate`, a plain host
loop over one batch for tests and benchmarks (the runtime's Engine is the real loop)."""

from __future__ import annotations

import torch

from ..ops.sampling import DEFAULT_MAX_TOP_K
from .contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from .paged import CacheLayout, blocks_for, dense_block_tables
from .spec_step import SpecPrefill, SpecStep, as_outputs, decode_args, prefill_args

__all__ = ["SpecStats", "SpecStepProvider", "accumulate", "speculative_generate", "step_counts"]


# -- statistics -------------------------------------------------------------------------------------

def step_counts(num_emitted: torch.Tensor, finished: torch.Tensor, k: int) -> torch.Tensor:
    """One decode step's contribution to `SpecStats`, int64 [4 + 2k]: tokens emitted, row-steps
    counted, drafts accepted, per draft position the row-steps that kept it [k], the histogram of
    accepted drafts [k + 1]. Plain static-shape maths (a backend may compile it into one kernel)."""
    counted = (num_emitted > 0) & ~finished                                     # [B]
    accepted = (num_emitted - 1).clamp(min=0)
    rows = torch.cat([num_emitted[:, None], counted[:, None].long(), (accepted * counted)[:, None],
                      (accepted[:, None] > torch.arange(k, device=num_emitted.device)) & counted[:, None],
                      (accepted.clamp(max=k)[:, None] == torch.arange(k + 1, device=num_emitted.device))
                      & counted[:, None]], dim=1)                                # [B, 4 + 2k]
    return rows.long().sum(dim=0)


def accumulate(sums: torch.Tensor, num_emitted: torch.Tensor, finished: torch.Tensor) -> None:
    """sums += step_counts(...) in place, k read from sums' size (4 + 2k): what `SpecStats.update` does."""
    sums.add_(step_counts(num_emitted, finished, (sums.numel() - 4) // 2))


class SpecStats:
    """Acceptance statistics accumulated on the device from decode-step outputs; read back on demand.

    A row-step counts when the row was active and did not finish in that step (a finishing step's
    count may have been cut by eos / max_pos). Its accepted drafts = num_emitted - 1. The counters are
    one int64 tensor laid out as `step_counts` returns them.
    """

    def __init__(self):
        self._sums: torch.Tensor | None = None
        self.k: int | None = None

    def prepare(self, k: int, device: torch.device) -> None:
        """Allocate the counters (zero) for k drafts; `update` then only adds in place, so it can be
        recorded into a CUDA graph and accumulate on every replay."""
        if self._sums is None:
            self.k = k
            self._sums = torch.zeros(4 + 2 * k, dtype=torch.int64, device=device)

    def update(self, outputs: SpecStepOutputs, add=accumulate) -> None:
        """Add one step's counts. `add` is `accumulate` or a compiled copy of it (the CUDA backend's:
        one kernel inside its step graph instead of about twenty)."""
        n = outputs.num_emitted
        k = outputs.out_tokens.shape[1] - 1
        self.prepare(k, n.device)
        if k != self.k:
            raise ValueError(f"SpecStats: outputs of a k = {k} step added to statistics of k = {self.k}")
        add(self._sums, n, outputs.finished)

    def summary(self) -> dict:
        """Reads the counters back (one host sync). Rates are None before any counted step."""
        if self._sums is None:
            return {"steps": 0, "tokens_emitted": 0, "accepted": 0, "proposed": 0, "acceptance_rate": None, "mean_accepted_length": None,
                    "per_position_acceptance": [], "accepted_histogram": []}
        k = self.k
        sums = self._sums.tolist()
        tokens, steps, accepted = sums[:3]
        per_position, histogram = sums[3:3 + k], sums[3 + k:]
        return {
            "steps": steps,
            "tokens_emitted": tokens,
            "accepted": accepted,                                                   # drafts kept
            "proposed": steps * k,                                                  # drafts offered
            "acceptance_rate": accepted / (steps * k) if steps and k else None,     # accepted / proposed
            "mean_accepted_length": 1 + accepted / steps if steps else None,        # tokens per step
            "per_position_acceptance": [c / steps for c in per_position] if steps else [],
            "accepted_histogram": histogram,
        }

    def reset(self) -> None:
        """Zero the counters in place (graphs recorded over them keep adding to the same tensor)."""
        if self._sums is not None:
            self._sums.zero_()


# -- a StepProvider over the step modules or their fused graphs ----------------------------------------

class SpecStepProvider:
    """`step.contract.StepProvider` for speculative decoding: calls `step` / `prefill`, which are
    SpecStep / SpecPrefill modules or the graphs `passes.fuse_spec_step.build_spec_step` returns, and
    accumulates `stats` (SpecStats) from every decode step."""

    def __init__(self, step, prefill, config, num_speculative_tokens: int, block_size: int,
                 cache_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 max_top_k: int = DEFAULT_MAX_TOP_K, greedy_step=None, layout: CacheLayout | None = None):
        self.step, self.prefill_fn, self.config = step, prefill, config
        self.layout = layout     # the caches the graphs were compiled for (C8: int8); None: the config's
        self.greedy_step = greedy_step   # run instead of `step` when SpecStepInputs.greedy says all rows are
        self.num_speculative_tokens, self.block_size = num_speculative_tokens, block_size
        self.cache_dtype, self.device = cache_dtype, torch.device(device)
        self.max_top_k = max_top_k   # the engine rejects requests with a larger top_k (it would be clamped)
        self.stats = SpecStats()

    @classmethod
    def from_model(cls, model, num_speculative_tokens: int, block_size: int = 16, **kw) -> "SpecStepProvider":
        """The eager reference provider: SpecStep / SpecPrefill over the model's own forward."""
        w = model.lm_head.weight
        return cls(SpecStep.from_model(model, num_speculative_tokens, block_size, **kw),
                   SpecPrefill.from_model(model, num_speculative_tokens, block_size, **kw),
                   model.config, num_speculative_tokens, block_size, w.dtype, w.device)

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layout = self.layout or CacheLayout.for_config(self.config, self.block_size, self.cache_dtype, self.device)
        return layout.new_caches(num_blocks, with_mtp=self.num_speculative_tokens > 0)

    @torch.no_grad()
    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs:
        inputs.validate()
        return as_outputs(self.prefill_fn(*prefill_args(inputs)))

    @torch.no_grad()
    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        inputs.validate(self.num_speculative_tokens)
        step = self.greedy_step if inputs.greedy and self.greedy_step is not None else self.step
        out = as_outputs(step(*decode_args(inputs)))
        self.stats.update(out)
        return out


@torch.no_grad()
def speculative_generate(provider, prompts: list[list[int]], max_new_tokens: int,
                         eos_token_id: int | None = None, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Plain host loop for tests and benchmarks: one prefill of the (ragged) batch, then decode steps
    until every row finished. Each row owns consecutive blocks (block 0 is the sink). Returns the
    generated ids per prompt (without the prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts) or max_new_tokens < 1:
        raise ValueError("speculative_generate needs non-empty prompts and max_new_tokens >= 1")
    B, bs, dev = len(prompts), provider.block_size, provider.device
    k = provider.num_speculative_tokens
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    per_row = blocks_for(max(map(len, prompts)) + max_new_tokens + max(1, 2 * k), bs)
    kv, mtp = provider.new_caches(1 + B * per_row)
    tables = dense_block_tables(B, per_row, dev)
    ids = torch.zeros(B, int(lengths.max()), dtype=torch.int64, device=dev)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p, device=dev)
    rows = dict(temperature=torch.full((B,), float(temperature), device=dev),
                top_k=torch.zeros(B, dtype=torch.int64, device=dev), top_p=torch.ones(B, device=dev),
                min_p=torch.zeros(B, device=dev), seed=seed + torch.arange(B, device=dev),
                eos_token_id=torch.full((B,), -1 if eos_token_id is None else eos_token_id, device=dev),
                max_pos=lengths + max_new_tokens - 1)
    out = provider.prefill(SpecPrefillInputs(ids, lengths, torch.zeros_like(lengths), tables, **rows,
                                             kv_caches=kv, mtp_caches=mtp))
    result: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    while True:
        for b, (toks, n) in enumerate(zip(out.out_tokens.tolist(), out.num_emitted.tolist())):
            result[b] += toks[:n]
        finished = finished | out.finished
        if bool(finished.all()):
            return result
        out = provider.decode(SpecStepInputs(out.next_tokens, out.next_start_pos, tables, **rows,
                                             active=~finished, kv_caches=kv, mtp_caches=mtp,
                                             greedy=temperature == 0))
