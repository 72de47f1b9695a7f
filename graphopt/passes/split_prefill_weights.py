"""Give the prefill graph its own weights: a copy of the main graph, `main_prefill`, that the quant
phase quantises with `QuantConfig.prefill_scheme` while `main` gets `scheme`.

Why: prefill is compute-bound (many tokens per weight read) and decode is bound by the bytes it
reads, so the best scheme differs: e.g. W8A8 prefill (int8 tensor-core GEMMs, closer to float) and
W4A8 decode (half the weight bytes). A module pass, in its own phase between spec and quant, present
only when the config asks for it (`QuantConfig.separate_prefill`).

Cases: the Program's `main` graph (normalised and rewritten already), with or without MTP graphs.
The copy shares main's tensors (a new GraphModule over a deep copy of the graph, as FunctionalStep
makes one), has main's signature and inputs, and is calibrated on main's calibration inputs; sites
main observed already are not observed again (the same float graph on the same data gives the same
statistics). fuse_spec_step builds `prefill` over `main_prefill` and `step` / `step_greedy` over
`main`, then removes the copy: its nodes live on in `prefill`. The MTP graphs are shared by both
(`mtp_scheme`, else `scheme`), and `compiled(input_ids)` runs `main`, the decode weights.
Not handled: tp= / ep= (graphopt.compile refuses prefill_scheme with them).

Before: Program(main, mtp0). After: Program(main, mtp0, main_prefill), main_prefill a copy of main:
    linear: "f32[s18, s5, 32]" = torch.ops.aten.linear.default(mul_46, model_model_layers_0_self_attn_q_a_proj_weight)
(in both graphs; after the quant phase, main's is a w4a8_matmul and main_prefill's an int8_matmul.)
"""

from __future__ import annotations

import copy

from torch import fx

from .base import ModulePass, ModuleResult, PassContext
from .program import Program

__all__ = ["PREFILL_MAIN", "SplitPrefillWeightsPass", "calibration_graph", "quant_config_for"]

PREFILL_MAIN = "main_prefill"


def quant_config_for(quant, graph_name: str):
    """The QuantConfig that graph `graph_name` is quantised with: the prefill copy's own
    (QuantConfig.prefill_config()), every other graph's the config itself."""
    if quant is not None and graph_name == PREFILL_MAIN:
        return quant.prefill_config()
    return quant


def calibration_graph(graph_name: str) -> str:
    """The graph whose calibration inputs `graph_name` runs: the prefill copy runs main's."""
    return "main" if graph_name == PREFILL_MAIN else graph_name


class SplitPrefillWeightsPass(ModulePass):
    name = "split_prefill_weights"
    changes_signature = False

    def run(self, program: Program, ctx: PassContext) -> ModuleResult:
        quant = program.state.quant
        if quant is None or not quant.separate_prefill:
            return ModuleResult(program, modified=False)
        main = program.main
        copied = fx.GraphModule(main, copy.deepcopy(main.graph))   # shares main's weights, not its nodes
        program.set(PREFILL_MAIN, copied, program.signatures["main"], program.make_inputs.get("main"))
        return ModuleResult(program, modified=True, matches=1, notes=[
            f"prefill weights: {quant.prefill_scheme} (graph {PREFILL_MAIN}), decode weights: {quant.scheme} (main)"])
