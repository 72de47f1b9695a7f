"""Prune routed experts at decode time: every `graphopt.moe_route` of a decode step graph gets the
`moe_prune_threshold` compile option as its prune_threshold argument.

Why: at batch 1 a decode step is bound by the bytes it reads, and the routed experts are most of
them. A token whose router gives one of its top-k experts a small share of the routing weight gets
little from that expert; dropping it (weight 0, the others rescaled to the same total:
`ops.core.prune_routing`) means `moe_experts` never reads that expert's weights.

Cases: the graphs `step` and `step_greedy` (the decode steps the fusion built; the main model's and
the MTP draft's MoE layers in them alike); `prefill` and the captured graphs are left as they are
(prefill is compute-bound and writes the cache every later token reads, so it routes in full, and
`compiled(input_ids)` still runs the unpruned main graph). Not matched: a router that is not a
`graphopt.moe_route` (fuse_moe_routing switched off: graphopt.compile refuses the option then), and a
graph without routed experts (nothing to do).

Before (`step`, k = 0, from `graphopt.compile(random_model())`, layer 1's router):
    moe_route_default = torch.ops.graphopt.moe_route.default(view_15, main_fn_graph_module_model_model_layers_1_mlp_gate_weight, main_fn_graph_module_model_model_layers_1_mlp_gate_e_score_correction_bias, 2, 4, 2, 'noaux_tc', 'sigmoid', True, 2.5)
After (moe_prune_threshold=0.2):
    moe_route_default = torch.ops.graphopt.moe_route.default(view_15, main_fn_graph_module_model_model_layers_1_mlp_gate_weight, main_fn_graph_module_model_model_layers_1_mlp_gate_e_score_correction_bias, 2, 4, 2, 'noaux_tc', 'sigmoid', True, 2.5, 0.2)
"""

from __future__ import annotations

import torch

from ..ops import core  # noqa: F401  registers torch.ops.graphopt.moe_route
from .base import GraphPass, PassContext, PassResult

__all__ = ["DECODE_GRAPHS", "PruneRoutedExpertsPass"]

DECODE_GRAPHS = ("step", "step_greedy")   # the graphs a decode step runs (fuse_spec_step builds them)
_ROUTE = torch.ops.graphopt.moe_route.default
_N_ARGS = 10                              # moe_route's arguments before prune_threshold


class PruneRoutedExpertsPass(GraphPass):
    name = "prune_routed_experts"
    # the pass drops experts on purpose: verify mode checks what stays (verify.CHECKS["pruned"]);
    # the numerics are tested against the eager pruned model (tests/passes/test_prune_routed_experts.py)
    numerics = "pruned"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        threshold = ctx.options.moe_prune_threshold
        if threshold <= 0 or ctx.graph_name not in DECODE_GRAPHS:
            return PassResult(gm, modified=False)
        routes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _ROUTE]
        if not routes:
            if getattr(ctx.model_config, "n_routed_experts", None):
                raise ValueError(f"graph {ctx.graph_name!r} has routed experts but no graphopt.moe_route node to "
                                 "prune (was fuse_moe_routing switched off?)")
            return PassResult(gm, modified=False, notes=["the model has no routed experts"])
        for node in routes:
            node.args = tuple(node.args[:_N_ARGS]) + (float(threshold),)
        return PassResult(gm, modified=True, matches=len(routes),
                          notes=[f"{len(routes)} router(s) drop experts below {threshold:g} of the routing weight"])
