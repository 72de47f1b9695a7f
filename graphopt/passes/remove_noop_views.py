"""Remove views, casts and copies that do not change their input.

Handles (each replaced by its input, read from meta["val"]):
  * views / reshapes / expands / squeezes / full slices whose output shape equals the input shape;
  * `alias` (always the same value);
  * `_to_copy` and `to` that keep dtype, device, layout, shape and strides;
  * `clone` whose output has the input's shape and strides, when neither is written later (a clone
    of a tensor that is mutated afterwards, e.g. a view of a KV cache input, is a snapshot and stays).
Copies whose value the graph returns stay: removing them could make an output alias an input or weight.
Sizes are compared statically and conservatively: equal ints, or the same symbolic expression (the
ShapeEnv proves it without adding a guard). `s0` vs `s1` that merely happen to be equal are kept.

Before (exported `torch.ops.aten._to_copy(x.view(b, 3, 8), dtype=torch.float32).clone()` + 1, x: [b, 3, 8]):
    view: "f32[s77, 3, 8]" = torch.ops.aten.view.default(x, [sym_size_int_2, 3, 8]);  x = None
    _to_copy: "f32[s77, 3, 8]" = torch.ops.aten._to_copy.default(view, dtype = torch.float32);  view = None
    clone: "f32[s77, 3, 8]" = torch.ops.aten.clone.default(_to_copy);  _to_copy = None
    add_16: "f32[s77, 3, 8]" = torch.ops.aten.add.Tensor(clone, 1);  clone = None
After:
    add_16: "f32[s77, 3, 8]" = torch.ops.aten.add.Tensor(x, 1);  x = None
"""

from __future__ import annotations

import torch
from torch import fx

from .base import GraphPass, PassContext, PassResult
from .patterns import same_shape, val

aten = torch.ops.aten

# Ops whose output is a view of args[0]; a no-op when the shape does not change.
_VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default,
             aten.flatten.using_ints, aten.view_as.default, aten.reshape_as.default, aten.expand_as.default}
# Ops that copy args[0], maybe converting it; a no-op when nothing about the tensor changes.
_COPY_OPS = {aten._to_copy.default, aten.clone.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
             aten.to.other, aten.contiguous.default}


def _same_tensor_type(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.layout == b.layout
            and same_shape(a.shape, b.shape) and same_shape(a.stride(), b.stride()))


def _is_full_slice(node: fx.Node) -> bool:
    start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    return start in (None, 0) and step == 1


def _is_view(node: fx.Node) -> bool:
    """Any ATen op whose output aliases its first input (view, transpose, slice, ...), from its schema."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def _mutated(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes written in place (the cache write-back copy_, any other in-place op) and their view bases."""
    written = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            for a, v in zip(node.target._schema.arguments, node.args):
                if a.alias_info is not None and a.alias_info.is_write and isinstance(v, fx.Node):
                    written.add(v)
    for node in list(written):   # writing through a view writes its base
        while _is_view(node):
            node = node.args[0]
            written.add(node)
    return written


def _base(node: fx.Node) -> fx.Node:
    while _is_view(node):
        node = node.args[0]
    return node


def _reaches_output(node: fx.Node) -> bool:
    """The node's value (or a view of it) is returned by the graph."""
    return any(u.op == "output" or (_is_view(u) and u.args[0] is node and _reaches_output(u)) for u in node.users)


def _is_noop(node: fx.Node, mutated: set[fx.Node]) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    out, inp = val(node), val(node.args[0])
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    if node.target in _VIEW_OPS or (node.target is aten.slice.Tensor and _is_full_slice(node)):
        return same_shape(out.shape, inp.shape)
    if node.target in _COPY_OPS:
        return (_same_tensor_type(out, inp) and not _reaches_output(node) and node not in mutated
                and _base(node.args[0]) not in mutated)
    return False


class RemoveNoopViewsPass(GraphPass):
    name = "remove_noop_views"
    rtol = atol = 0.0

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        mutated = _mutated(gm)
        removed = 0
        for node in list(gm.graph.nodes):
            if _is_noop(node, mutated):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        if removed:
            gm.graph.lint()
        return PassResult(gm, modified=removed > 0, matches=removed)
