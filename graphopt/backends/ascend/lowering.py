"""Rewrite a Program graph for torchair: each graphopt op becomes a torch_npu call or its decomposition.

    for_ascend(gm, npu=True)    the routes of plan.ASCEND_OPS: fused torch_npu kernels where the plan
                                says "torch_npu" (npu_impls.IMPLS, and the FUSED producer/consumer
                                pairs: int8_matmul + dequantize_int32 -> npu_quant_matmul,
                                dequantize_weight + linear -> npu_weight_quant_batchmatmul), the op's
                                plain-torch reference everywhere else
    for_ascend(gm, npu=False)   every graphopt op as its reference: the same graph torchair would
                                lower op by op; runs anywhere, so CI checks the rewrite keeps the
                                numbers (tests/backends/test_ascend.py)

torchair then lowers ATen and torch_npu ops with its own converters (no graphopt op reaches it, so
no GE converter of ours is needed). Weights stay shared with `gm`.
"""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch._library.custom_ops import OPDEFS

from .npu_impls import FUSED, IMPLS
from .plan import ASCEND_OPS, _op_name

__all__ = ["for_ascend"]


def _reference(target):
    """The python reference (the op's definition) of a graphopt custom op."""
    qualname = f"{target.namespace}::{target._schema.name.split('::')[-1]}"
    return OPDEFS[qualname]._init_fn


def _is_graphopt(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and node.target.namespace == "graphopt"


def _fuse(graph: fx.Graph) -> int:
    """Replace each FUSED producer/consumer pair (the producer used once, by the consumer) by one call."""
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "graphopt.dequantize_int32.default":
            acc, x_scale, w_scale, bias, out_dtype = node.args
            if isinstance(acc, fx.Node) and _op_name(acc.target) == "graphopt.int8_matmul.default" and len(acc.users) == 1:
                fn = FUSED[("graphopt.int8_matmul.default", name)]
                with graph.inserting_before(node):
                    new = graph.call_function(fn, (*acc.args, x_scale, w_scale, bias, out_dtype))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                graph.erase_node(acc)
                fused += 1
        elif name == "aten.linear.default" and len(node.args) >= 2:
            w = node.args[1]
            if isinstance(w, fx.Node) and _op_name(w.target) == "graphopt.dequantize_weight.default" and len(w.users) == 1:
                fn = FUSED[("graphopt.dequantize_weight.default", name)]
                bias = node.args[2] if len(node.args) > 2 else None
                with graph.inserting_before(node):
                    new = graph.call_function(fn, (node.args[0], *w.args, bias))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                graph.erase_node(w)
                fused += 1
    return fused


def for_ascend(gm: fx.GraphModule, npu: bool = True) -> fx.GraphModule:
    """A copy of `gm` with no graphopt op left (see the module doc)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    if npu:
        _fuse(graph)
    for node in graph.nodes:
        if not _is_graphopt(node):
            continue
        name = _op_name(node.target)
        route = ASCEND_OPS.get(name)
        if route is None:
            raise ValueError(f"{name} has no Ascend route (graphopt/backends/ascend/plan.py)")
        node.target = IMPLS[name] if npu and route.kind == "torch_npu" and name in IMPLS else _reference(node.target)
    out = fx.GraphModule(gm, graph)
    if hasattr(out, "_guards_fn"):
        delattr(out, "_guards_fn")
    out.recompile()
    return out
