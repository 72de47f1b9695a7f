"""EagerBackend.lower(program, options) -> EagerExecutable (see the package doc)."""

from __future__ import annotations

import torch

from ... import ops as _ops  # noqa: F401  registers the graphopt:: ops the graphs may call
from ...passes.program import CompileOptions, Program
from ...step.contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from ...step.provider import SpecStepProvider
from ...step.reference_provider import ReferenceStepProvider
from ..base import Backend, fresh_cache_forward

__all__ = ["EagerBackend", "EagerExecutable", "check_graph"]


def check_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Nothing to compile: check the graph is well formed, regenerate its code, return it."""
    gm.graph.lint()
    gm.recompile()
    return gm


class EagerExecutable:
    """The step contract and the plain forward over a Program's graphs, run as FX code."""

    def __init__(self, program: Program):
        self.program = program
        for gm in program.graphs.values():
            check_graph(gm)
        layout, k = program.cache, program.state.num_speculative_tokens
        self.config, self.block_size = program.model_config, layout.block_size
        if program.has_step_graphs:
            greedy = program["step_greedy"] if "step_greedy" in program else None
            self._provider = SpecStepProvider(program["step"], program["prefill"], self.config, k, layout.block_size,
                                              layout.dtype, layout.device, greedy_step=greedy, layout=layout)
        else:   # fuse_spec_step switched off: plain decoding over the main graph
            self._provider = ReferenceStepProvider(program.main, self.config, layout)
        self.num_speculative_tokens = self._provider.num_speculative_tokens
        self.max_top_k = self._provider.max_top_k

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self._provider.new_caches(num_blocks)

    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs:
        return self._provider.prefill(inputs)

    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        return self._provider.decode(inputs)

    @property
    def stats(self) -> dict | None:
        """Speculative decoding statistics over every decode step so far (None without drafts)."""
        stats = getattr(self._provider, "stats", None)
        return stats.summary() if stats is not None and self.num_speculative_tokens > 0 else None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]: the main graph over a fresh cache."""
        return fresh_cache_forward(self.program.main, self.program.cache, input_ids)


class EagerBackend(Backend):
    name = "eager"

    def lower(self, program: Program, options: CompileOptions) -> EagerExecutable:
        if program.state.spec is not None and not program.has_step_graphs:
            raise ValueError("spec= needs the step and prefill graphs of fuse_spec_step; the program has "
                             f"only {program.names}")
        return EagerExecutable(program)
