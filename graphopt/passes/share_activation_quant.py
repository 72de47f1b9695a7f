"""One activation quantiser per input: linears that read one tensor quantise it once.

quant_insert writes each quantised linear's own op sequence, so the linears of one input (q_a_proj and
kv_a_proj_with_mqa after the attention norm, gate_proj and up_proj after the MLP norm, the shared
experts' pair) each quantise that input again: two identical per-token abs-max reductions, roundings and
int8 copies. Two quantiser calls compute the same values when they have the same op, read the same
input node and take equal parameters (a smoothing vector, a static scale: the same tensor, or stored
tensors of equal dtype, shape and values, as SmoothQuant scope="input" gives each reader of one input);
the later call is replaced by the earlier one. The ops are pure and deterministic, so the graph
computes bit for bit what it computed before; the integer matmuls then share one quantised input, which
the Inductor backend fuses into one GEMM (`backends.inductor.backend.fuse_projections`).

Handles: quantize_per_token, quantize_per_tensor, quantize_fp8, hadamard_transform (the rotation
before a rotated scheme's quantiser). Not merged (negative cases): quantisers of different inputs, or
with different smoothing vectors (SmoothQuant's default scope="linear" gives each linear its own), or
different block sizes / integer ranges.

Before (w8a8, the attention norm of layer 0):
    quantize_per_token_default = graphopt.quantize_per_token.default(rms_norm_default, None, 127)
    quantize_per_token_default_1 = graphopt.quantize_per_token.default(rms_norm_default, None, 127)
    int8_matmul_default = graphopt.int8_matmul.default(getitem_40, q_a_weight)        # getitem of _default
    int8_matmul_default_1 = graphopt.int8_matmul.default(getitem_42, kv_a_weight)     # getitem of _default_1
After:
    quantize_per_token_default = graphopt.quantize_per_token.default(rms_norm_default, None, 127)
    int8_matmul_default = graphopt.int8_matmul.default(getitem_40, q_a_weight)
    int8_matmul_default_1 = graphopt.int8_matmul.default(getitem_40, kv_a_weight)
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..ops import quant as _quant_ops  # noqa: F401  registers torch.ops.graphopt.* quant ops
from ..quant.graph_sites import attr_tensor
from .base import GraphPass, PassContext, PassResult

__all__ = ["QUANTISERS", "ShareActivationQuantPass"]

OPS = torch.ops.graphopt
QUANTISERS = frozenset({OPS.quantize_per_token.default, OPS.quantize_per_tensor.default,
                        OPS.quantize_fp8.default, OPS.hadamard_transform.default})


class ShareActivationQuantPass(GraphPass):
    name = "share_activation_quant"
    rtol = atol = 0.0        # the same ops on the same values: bit-identical

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        first: dict[tuple, list[fx.Node]] = {}     # (op, input node) -> quantisers kept, in graph order
        merged = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in QUANTISERS or node.kwargs:
                continue
            key = (node.target, node.args[0])
            same = next((kept for kept in first.get(key, []) if _same_args(gm, kept, node)), None)
            if same is None:
                first.setdefault(key, []).append(node)
                continue
            _replace(node, same)
            gm.graph.erase_node(node)
            merged += 1
        if merged:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, modified=merged > 0, matches=merged)


def _replace(node: fx.Node, by: fx.Node) -> None:
    """Every use of `node` reads `by` instead, and `by` keeps one getitem per index (its first in graph
    order, which precedes every user of a later one), so each value has one node, as the dumps read and
    as `fuse_projections` groups the matmuls of one quantised input."""
    node.replace_all_uses_with(by)
    kept: dict = {}
    for user in list(by.users):                      # users in insertion order, not graph order
        if user.op == "call_function" and user.target is operator.getitem:
            kept.setdefault(user.args[1], []).append(user)
    order = {n: i for i, n in enumerate(by.graph.nodes)}
    for getters in kept.values():
        getters.sort(key=order.__getitem__)
        for later in getters[1:]:
            later.replace_all_uses_with(getters[0])


def _same_args(gm: fx.GraphModule, a: fx.Node, b: fx.Node) -> bool:
    return len(a.args) == len(b.args) and all(_same(gm, x, y) for x, y in zip(a.args[1:], b.args[1:]))


def _same(gm: fx.GraphModule, x, y) -> bool:
    if x is y:
        return True
    if isinstance(x, fx.Node) and isinstance(y, fx.Node):
        if x.op != "get_attr" or y.op != "get_attr":
            return False                             # two computed values: equal only if one node
        tx, ty = attr_tensor(gm, x.target), attr_tensor(gm, y.target)
        return (isinstance(tx, torch.Tensor) and isinstance(ty, torch.Tensor) and tx.dtype == ty.dtype
                and tx.shape == ty.shape and tx.device == ty.device and torch.equal(tx, ty))
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return False
    return type(x) is type(y) and x == y
