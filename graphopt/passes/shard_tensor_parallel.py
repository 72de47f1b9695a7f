"""Tensor parallelism: split attention heads, dense and shared-expert MLPs and the vocabulary over tp ranks.

A module pass over the Program (main and every MTP graph; before the spec fusion, which then splices the
sharded graphs into the step). Per weight (`docs/distributed.md` has the table):

    column-parallel (rows split; the output is this rank's part, no collective):
        self_attn.q_b_proj / q_proj, self_attn.kv_b_proj     heads [r H/tp, (r+1) H/tp)
        mlp.gate_proj, mlp.up_proj, shared_experts.gate_proj / up_proj     intermediate columns
    row-parallel (columns split; partial sums, then one all_reduce):
        self_attn.o_proj, mlp.down_proj, shared_experts.down_proj
    vocab-parallel: lm_head / mtp.*.shared_head.head     vocab rows split, then one all_gather of the logits
    replicated: q_a_proj, kv_a_proj_with_mqa, every norm, the router, eh_proj, embed_tokens

MLA keeps its latent cache replicated: the cache holds one latent per token shared by every head
(kv_lora_rank + rope dims, like one MQA key), so each rank needs all of it for its heads; splitting
its channels would need a collective inside attention for every score. Each rank computes the latent
itself (kv_a_proj_with_mqa is replicated), so the cache write needs no communication either.

Quantised linears (w8a8: quantize_per_token -> int8_matmul -> dequantize_int32) keep the unsharded
model's numbers exactly: a column-parallel site slices its int8 weight and per-channel scale rows; a
row-parallel site gathers its sharded input, quantises the full row (the per-token scale is the
unsharded one), multiplies this rank's K slice, and all-reduces the int32 accumulator (integer sums
are exact in any order) before dequantising.

Before (float32, the embedded model's layer 0 after the spec phase):
    linear_2: "f32[s5, s18, 384]" = torch.ops.aten.linear.default(rms_norm_default_1, model_model_layers_0_self_attn_q_b_proj_weight)
    view: "f32[s5, s18, 8, 48]" = torch.ops.aten.view.default(linear_2, [sym_size_int_33, sym_size_int_30, 8, 48])
    _unsafe_view: "f32[s5, s18, 256]" = torch.ops.aten._unsafe_view.default(clone, [sym_size_int_33, sym_size_int_30, 256])
    linear_5: "f32[s5, s18, 256]" = torch.ops.aten.linear.default(_unsafe_view, model_model_layers_0_self_attn_o_proj_weight)
After (tp = 2, rank 0):
    linear_2: "f32[s5, s18, 192]" = torch.ops.aten.linear.default(rms_norm_default_1, model_model_layers_0_self_attn_q_b_proj_weight)
    view: "f32[s5, s18, 4, 48]" = torch.ops.aten.view.default(linear_2, [sym_size_int_33, sym_size_int_30, 4, 48])
    _unsafe_view: "f32[s5, s18, 128]" = torch.ops.aten._unsafe_view.default(clone, [sym_size_int_33, sym_size_int_30, 128])
    linear_5: "f32[s5, s18, 256]" = torch.ops.aten.linear.default(_unsafe_view, model_model_layers_0_self_attn_o_proj_weight)
    all_reduce: "f32[s5, s18, 256]" = torch.ops._c10d_functional.all_reduce.default(linear_5, 'sum', '0')
    wait_tensor: "f32[s5, s18, 256]" = torch.ops._c10d_functional.wait_tensor.default(all_reduce)
(the get_attr nodes keep their names and read `_tp_<target>`, the rank's slice). A world of one rank
(the compile option `shard_one_rank`) gets the same nodes: each weight is its own one piece, the
views keep their sizes, and every collective runs over the one-rank group.

Negative cases (left alone): the router gate, kv_a_proj_with_mqa, eh_proj and embeddings (replicated);
routed experts (ShardExpertsPass); the whole program when tp = 1 over more than one rank (ep only).
A row-parallel linear with a bias, or a quantised site whose op sequence is not w8a8's, is a
ShardError naming the site.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..models.shard_plan import shard_role
from ..ops import quant as _quant_ops  # noqa: F401  registers graphopt::quantize_per_token, int8_matmul
from .base import ModulePass, ModuleResult, PassContext
from .program import Program
from .sharding import (ParallelPlan, ShardError, all_gather_last, all_reduce, copy_graph, count_collectives,
                       repropagate, shard_tensor, snapshot, weight_site)

__all__ = ["ShardTensorParallelPass", "site_role"]

aten, OPS = torch.ops.aten, torch.ops.graphopt
_COLUMN_FIELDS = ("weight", "scale", "zero", "bias")   # per output channel: split with the rows


def site_role(site: str) -> str | None:
    """"column" | "row" | "vocab" for a site tensor parallelism splits, None for a replicated one (the
    rule lives in models/shard_plan.py, which the shard-only loader reads too)."""
    role = shard_role(site)
    return role if role in ("column", "row", "vocab") else None


class ShardTensorParallelPass(ModulePass):
    name = "shard_tensor_parallel"
    changes_signature = False

    def __init__(self, plan: ParallelPlan | None = None):
        self.plan = plan

    def run(self, program: Program, ctx: PassContext) -> ModuleResult:
        plan = self.plan
        if plan is None or not plan.splits_heads:
            return ModuleResult(program, modified=False)
        if program.has_step_graphs:
            raise ShardError("shard_tensor_parallel must run before fuse_spec_step (it shards main and the MTP graphs)")
        cache, notes, matches = {}, [], 0
        for name in [n for n in program.names if n == "main" or n.startswith("mtp")]:
            gm = copy_graph(program[name])
            n = _shard_graph(gm, plan, cache)
            program.set(name, gm)
            matches += n
            counts = count_collectives(gm)
            notes.append(f"{name}: {n} tensors split over tp={plan.tp} (rank {plan.rank}); "
                         f"{counts['all_reduce']} all_reduce, {counts['all_gather']} all_gather per call")
        return ModuleResult(program, modified=matches > 0, matches=matches, notes=notes)


def _shard_graph(gm: fx.GraphModule, plan: ParallelPlan, cache: dict) -> int:
    old = snapshot(gm)
    split = 0
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.users]:
        where = weight_site(node.target)
        role = site_role(where[0]) if where else None
        if role is None:
            continue
        site, field = where
        if role in ("column", "vocab") and field in _COLUMN_FIELDS:
            if role == "vocab":
                _gather_outputs(gm, node, site, plan)
            shard_tensor(gm, node, 0, plan.tp, plan.rank, "tp", cache, plan.preloaded)
            split += 1
        elif role == "row" and field == "weight":
            k = old[node].shape[1]
            _reduce_outputs(gm, node, site, k, plan)
            shard_tensor(gm, node, 1, plan.tp, plan.rank, "tp", cache, plan.preloaded)
            split += 1
        elif role == "row" and field == "bias":
            raise ShardError(f"{site}: a row-parallel linear with a bias is not supported (the bias would be added "
                             f"on every rank)")
    repropagate(gm, old)
    return split


def _gather_outputs(gm: fx.GraphModule, weight: fx.Node, site: str, plan: ParallelPlan) -> None:
    for linear in _users(weight, aten.linear.default, site):
        _after(gm, linear, lambda: all_gather_last(gm.graph, linear, plan))


def _reduce_outputs(gm: fx.GraphModule, weight: fx.Node, site: str, k: int, plan: ParallelPlan) -> None:
    for user in list(weight.users):
        if user.target is aten.linear.default and user.args[1] is weight:
            if len(user.args) > 2 and user.args[2] is not None:
                raise ShardError(f"{site}: a row-parallel linear with a bias is not supported")
            _after(gm, user, lambda: all_reduce(gm.graph, user, plan))
        elif user.target is OPS.int8_matmul.default and user.args[1] is weight:
            _exact_int8_row(gm, user, site, k, plan)
        else:
            raise ShardError(f"{site}: row-parallel weight read by {user.format_node()}; supported: aten.linear "
                             f"and the w8a8 sequence (graphopt.int8_matmul)")


def _exact_int8_row(gm: fx.GraphModule, mm: fx.Node, site: str, k: int, plan: ParallelPlan) -> None:
    """quantize_per_token(x_shard) -> int8_matmul -> dequantize_int32 becomes quantize_per_token(gather(x))
    -> this rank's K slice -> int8_matmul -> all_reduce(int32) -> dequantize_int32 (the same scales)."""
    x_q = mm.args[0]
    quant = x_q.args[0] if x_q.target is operator.getitem else None
    if quant is None or quant.target is not OPS.quantize_per_token.default:
        raise ShardError(f"{site}: expected int8_matmul(quantize_per_token(x)[0], W), got {mm.format_node()}")
    scale_old = next((u for u in quant.users if u.target is operator.getitem and u.args[1] == 1), None)
    if scale_old is None:
        raise ShardError(f"{site}: quantize_per_token {quant.name} has no scale output in use")
    step = k // plan.tp
    g = gm.graph
    with g.inserting_before(mm):
        full = all_gather_last(g, quant.args[0], plan)
        quant_full = g.call_function(OPS.quantize_per_token.default, (full, *quant.args[1:]))
        q = g.call_function(operator.getitem, (quant_full, 0))
        scale = g.call_function(operator.getitem, (quant_full, 1))
        mine = g.call_function(aten.slice.Tensor, (q, -1, plan.rank * step, (plan.rank + 1) * step))
        partial = g.call_function(OPS.int8_matmul.default, (mine, mm.args[1]))
        acc = all_reduce(g, partial, plan)
    for user in list(mm.users):
        user.replace_input_with(mm, acc)
        user.replace_input_with(scale_old, scale)
    for dead in (mm, x_q):
        if not dead.users:
            g.erase_node(dead)
    if not scale_old.users:
        g.erase_node(scale_old)
    if not quant.users:
        g.erase_node(quant)


def _users(weight: fx.Node, target, site: str) -> list[fx.Node]:
    users = [u for u in weight.users if u.target is target and u.args[1] is weight]
    if len(users) != len(weight.users):
        other = next(u for u in weight.users if u not in users)
        raise ShardError(f"{site}: weight read by {other.format_node()}; expected only {target}")
    return users


def _after(gm: fx.GraphModule, node: fx.Node, build) -> None:
    """Insert build()'s nodes right after `node` and make node's old users read the result."""
    users = list(node.users)
    with gm.graph.inserting_before(node.next):
        out = build()
    for user in users:
        user.replace_input_with(node, out)

