"""Compute the LM head only at the positions a step keeps: gather the hidden state, then project.

Why. A prefill chunk of T tokens needs the logits of one position per row (its last real token: the
first sampled token, and the MTP draft's logits there), but the captured main model and MTP module
project every position: [B, T, V] logits, then `gather` picks [B, 1, V]. At T = 8192 on DeepSeek's
vocabulary (129280) that is a 2 GB bf16 tensor and 2 * T * V * hidden flops, of which 1 / T is kept.
Row-wise work commutes with a gather over positions, so the gather moves before the head:

    gather(linear(x, W), 1, expand(i, [-1, 1, V]))  ->  linear(gather(x, 1, expand(i, [-1, 1, D])), W)

and on through a graphopt.rms_norm whose only reader is that head (the final norm, MTP's
shared_head.norm). Matched only when the index is one position per row (`expand` of a [B, 1, 1]
index, so it is constant along the last dim) and each moved node has no other reader; the decode
steps, which verify every position, keep their heads as they are. The same dot products, one row
of the GEMM instead of T: equal in exact arithmetic; a GEMM of another shape may round its last bit
differently, so verify mode allows 1e-5.

Before (the prefill graph of the random test model):
    rms_norm_default_12 = torch.ops.graphopt.rms_norm.default(add_553, model_norm_weight, 1e-06)
    linear = torch.ops.aten.linear.default(rms_norm_default_12, shared_head_head_weight)
    expand = torch.ops.aten.expand.default(unsqueeze_4, [-1, 1, 64])
    gather_1 = torch.ops.aten.gather.default(linear, 1, expand)
After:
    expand_default = torch.ops.aten.expand.default(unsqueeze_4, [-1, 1, 32])
    gather_default = torch.ops.aten.gather.default(add_553, 1, expand_default)
    rms_norm_default = torch.ops.graphopt.rms_norm.default(gather_default, model_norm_weight, 1e-06)
    linear_default = torch.ops.aten.linear.default(rms_norm_default, shared_head_head_weight)
"""

from __future__ import annotations

import torch
from torch import fx

from .base import GraphPass, PassContext, PassResult
from .patterns import call_op, fake_mode_of, val

aten, OPS = torch.ops.aten, torch.ops.graphopt

__all__ = ["HeadAtGatheredPositionsPass"]

# row-wise ops that the gather can move before: (target, index of the per-position tensor argument)
_ROW_WISE = {aten.linear.default: 0, OPS.rms_norm.default: 0}


def _rank(node) -> int | None:
    """The number of dims of `node`'s value (None: not a tensor node)."""
    shape = getattr(val(node), "shape", None) if isinstance(node, fx.Node) else None
    return None if shape is None else len(shape)


def _one_position_index(index: fx.Node) -> fx.Node | None:
    """The [B, 1, 1] tensor `index` expands along its last dim, if that is what it is."""
    if index.op != "call_function" or index.target != aten.expand.default:
        return None
    src = index.args[0]
    shape = getattr(val(src), "shape", None)
    if shape is None or len(shape) != 3 or shape[1] != 1 or shape[2] != 1:
        return None
    return src


class HeadAtGatheredPositionsPass(GraphPass):
    name = "head_at_gathered_positions"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph, fake = gm.graph, fake_mode_of(gm)
        moved = 0
        for gather in [n for n in graph.nodes if n.op == "call_function" and n.target == aten.gather.default]:
            source, dim, index = gather.args[:3]
            if dim != 1 or gather.kwargs or not isinstance(source, fx.Node):
                continue
            position = _one_position_index(index)
            if position is None:
                continue
            chain = []                                   # row-wise nodes from the gathered value down to x
            node = source
            while (node.op == "call_function" and node.target in _ROW_WISE and len(node.users) == 1
                   and _rank(node) == 3):
                chain.append(node)
                node = node.args[_ROW_WISE[node.target]]
            if not chain or _rank(node) != 3:
                continue
            with graph.inserting_before(gather):
                width = val(node).shape[-1]
                picked = call_op(graph, fake, aten.gather.default,
                                 (node, 1, call_op(graph, fake, aten.expand.default, (position, [-1, 1, width]))))
                for op in reversed(chain):               # x's reader first, the head last
                    arg = _ROW_WISE[op.target]
                    args = (*op.args[:arg], picked, *op.args[arg + 1:])
                    picked = call_op(graph, fake, op.target, args, op.kwargs)
            gather.replace_all_uses_with(picked)
            graph.erase_node(gather)
            for op in chain:                             # head first: each had the next as its only reader
                graph.erase_node(op)
            moved += 1
        if moved:
            graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, modified=moved > 0, matches=moved,
                          notes=[f"{moved} LM head(s) computed at the one gathered position per row"] if moved else [])
