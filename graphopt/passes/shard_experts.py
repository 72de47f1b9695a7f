"""Expert parallelism: each of ep ranks holds n_routed_experts / ep routed experts and runs them on the
tokens routed to them; one all_reduce combines the ranks' partial outputs.

A module pass over the Program (main and the MTP graphs, before the spec fusion), after
ShardTensorParallelPass. Handles `graphopt.moe_experts` (fused by fuse_moe_experts) and
`graphopt.quantized_moe_experts` (quant_insert): every stacked expert tensor [E, ...] is sliced to
this rank's experts [r E/ep, (r+1) E/ep).

Dispatch and combine. The hidden states entering a MoE layer are the same on every rank (attention
ends in an all_reduce under tp, or is replicated), and so is the router's choice: dispatch is
therefore local, a rank keeps the (token, expert) pairs whose expert it holds (ids shifted to its
local numbering, the others' weights zeroed and pointed at local expert 0), and the combine is one
all_reduce of the [N, hidden] partial sums. With top-k = 2 this is exact: a token's sum is
w_a h_a + w_b h_b on one rank or the sum of the two one-term partials (plus exact zeros) across two,
the same float either way. An all-to-all dispatch (tokens sent only to the ranks holding their
experts) pays when attention is data-parallel and each rank holds other tokens; here it would move
more bytes than the combine, so it is not used (docs/distributed.md has the byte counts).

Before (the embedded model's layer 1, after fuse_moe_experts):
    moe_experts_default: "f32[s18*s5, 256]" = torch.ops.graphopt.moe_experts.default(view_15, getitem_79, getitem_80, model_model_layers_1_mlp_experts_gate_up_proj, model_model_layers_1_mlp_experts_down_proj)
After (ep = 2, rank 1: experts 8..15):
    sub: "i64[s18*s5, 2]" = torch.ops.aten.sub.Tensor(getitem_80, 8)
    ge: "b8[s18*s5, 2]" = torch.ops.aten.ge.Scalar(sub, 0)
    lt: "b8[s18*s5, 2]" = torch.ops.aten.lt.Scalar(sub, 8)
    bitwise_and: "b8[s18*s5, 2]" = torch.ops.aten.bitwise_and.Tensor(ge, lt)
    where: "i64[s18*s5, 2]" = torch.ops.aten.where.ScalarOther(bitwise_and, sub, 0)
    where_1: "f32[s18*s5, 2]" = torch.ops.aten.where.ScalarOther(bitwise_and, getitem_79, 0.0)
    moe_experts_default: "f32[s18*s5, 256]" = torch.ops.graphopt.moe_experts.default(view_15, where_1, where, model_model_layers_1_mlp_experts_gate_up_proj, model_model_layers_1_mlp_experts_down_proj)
    all_reduce: "f32[s18*s5, 256]" = torch.ops._c10d_functional.all_reduce.default(moe_experts_default, 'sum', '0')
    wait_tensor: "f32[s18*s5, 256]" = torch.ops._c10d_functional.wait_tensor.default(all_reduce)

At world size 1 (the compile option `shard_one_rank`) rank 0 holds every expert: every pair is its
own, so the dispatch masks above would be the identity and are not inserted (they cost one fused
kernel per MoE layer on the H100, ~7 us a step on the embedded model); the combine is an all_reduce
over one rank, which the Inductor backend drops when lowering.

Negative cases: ep = 1 over more than one rank (tp only) leaves the program alone; a dense expert
dispatch (fuse_moe_experts switched off) is a ShardError: it has no expert ids to dispatch on.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import core as _core_ops  # noqa: F401  registers graphopt::moe_experts
from ..ops import quant as _quant_ops  # noqa: F401  registers graphopt::quantized_moe_experts
from .base import ModulePass, ModuleResult, PassContext
from .program import Program
from .sharding import (ParallelPlan, ShardError, all_reduce, check_loaded, copy_graph, repropagate, shard_tensor,
                       snapshot)

__all__ = ["ShardExpertsPass"]

aten, OPS = torch.ops.aten, torch.ops.graphopt
_MOE = (OPS.moe_experts.default, OPS.quantized_moe_experts.default)


class ShardExpertsPass(ModulePass):
    name = "shard_experts"
    changes_signature = False

    def __init__(self, plan: ParallelPlan | None = None):
        self.plan = plan

    def run(self, program: Program, ctx: PassContext) -> ModuleResult:
        plan = self.plan
        if plan is None or not plan.splits_experts:
            if plan is not None:
                check_loaded(program, plan)     # always last in the shard phase
            return ModuleResult(program, modified=False)
        if program.has_step_graphs:
            raise ShardError("shard_experts must run before fuse_spec_step (it shards main and the MTP graphs)")
        experts = ctx.model_config.n_routed_experts
        cache, notes, matches = {}, [], 0
        for name in [n for n in program.names if n == "main" or n.startswith("mtp")]:
            gm = copy_graph(program[name])
            _no_dense_dispatch(gm, name)
            n = _shard_graph(gm, plan, experts, cache)
            program.set(name, gm)
            matches += n
            notes.append(f"{name}: {n} MoE layers over ep={plan.ep} (rank {plan.rank} holds experts "
                         f"{plan.rank * experts // plan.ep}..{(plan.rank + 1) * experts // plan.ep - 1}), "
                         f"one all_reduce each")
        check_loaded(program, plan)
        return ModuleResult(program, modified=matches > 0, matches=matches, notes=notes)


def _shard_graph(gm: fx.GraphModule, plan: ParallelPlan, experts: int, cache: dict) -> int:
    old = snapshot(gm)
    local = experts // plan.ep
    first = plan.rank * local
    moes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _MOE]
    g = gm.graph
    for moe in moes:
        for weight in _stacked(moe):
            if old[weight].shape[0] != experts:
                raise ShardError(f"{moe.name}: stacked expert tensor {weight.target} has shape "
                                 f"{tuple(old[weight].shape)}; expected [{experts}, ...]")
            shard_tensor(gm, weight, 0, plan.ep, plan.rank, "ep", cache, plan.preloaded)
        if local < experts:          # one rank holding every expert (world of one) keeps every pair as it is
            weights, ids = moe.args[1], moe.args[2]
            with g.inserting_before(moe):
                shifted = g.call_function(aten.sub.Tensor, (ids, first))                    # [N, k] local ids
                mine = g.call_function(aten.bitwise_and.Tensor, (g.call_function(aten.ge.Scalar, (shifted, 0)),
                                                                  g.call_function(aten.lt.Scalar, (shifted, local))))
                local_ids = g.call_function(aten.where.ScalarOther, (mine, shifted, 0))
                local_weights = g.call_function(aten.where.ScalarOther, (mine, weights, 0.0))
            moe.args = (moe.args[0], local_weights, local_ids, *moe.args[3:])
        users = list(moe.users)
        with g.inserting_before(moe.next):
            combined = all_reduce(g, moe, plan)
        for user in users:
            user.replace_input_with(moe, combined)
    repropagate(gm, old)
    return len(moes)


def _stacked(moe: fx.Node) -> list[fx.Node]:
    """The get_attr nodes of a MoE op's stacked expert tensors (quantised: every tensor of its lists)."""
    if moe.target is OPS.moe_experts.default:
        tensors = moe.args[3:5]
    else:
        tensors = [t for lst in moe.args[3:5] for t in lst if t is not None]
    for t in tensors:
        if not isinstance(t, fx.Node) or t.op != "get_attr":
            raise ShardError(f"{moe.name}: expert tensor {t} is computed, not a weight; cannot slice it")
    return list(dict.fromkeys(tensors))


def _no_dense_dispatch(gm: fx.GraphModule, name: str) -> None:
    dense = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("experts.gate_up_proj")
             and not any(u.target in _MOE for u in n.users)]
    if dense:
        raise ShardError(f"{name}: routed experts {dense[0].target} are a dense dispatch (fuse_moe_experts switched "
                         f"off?); expert parallelism needs graphopt.moe_experts")
