"""Fold subgraphs that depend only on weights into constants computed once, at compile time.

Handles any pure ATen subgraph whose inputs are all get_attr tensors (weights and buffers): casts of
weights (`gate.weight.float()` in a bf16 model, the rotary `inv_freq.float()`), arithmetic on
weights and buffers (`w.t() * 2`, `w.sum(0)`), and view chains that end in such an op. Each folded
subgraph becomes a new get_attr buffer (`<weight>_folded`, or `folded_<node>` when several weights
feed it) holding the value with the strides the graph computed, so its readers run bit for bit as
before; the folded nodes are erased and `matches` counts them.
Never folded: anything depending on a placeholder or a size, random ops, in-place / impure ops.

Memory: a folded constant is new memory; the weights it was computed from stay alive (the user's
model owns them). Folding trades that memory for per-step work, so:
  * a pure view of a weight (`transpose`, `t`, `permute`, `view` ...) is left alone: it costs no
    per-step work, and folding it would store a second copy of the whole weight (a permute folded
    with an op after it does become a materialised copy: that is the trade, and why the cap exists);
  * a result equal to one of its source weights (same dtype, shape, strides and values) reuses that
    weight instead of a copy;
  * a constant larger than `ctx.options["fold_max_bytes"]` (default 64 MiB) is skipped and named in
    the notes; PassResult.notes also give the number and bytes of the new constants.

Before (bf16, from `capture_main(random_model().to(torch.bfloat16))`, the router of layer 1):
    _to_copy_25: "f32[8, 64]" = torch.ops.aten._to_copy.default(model_model_layers_1_mlp_gate_weight, dtype = torch.float32);  model_model_layers_1_mlp_gate_weight = None
    linear_13: "f32[s18*s5, 8]" = torch.ops.aten.linear.default(_to_copy_24, _to_copy_25);  _to_copy_24 = _to_copy_25 = None
After:
    model_model_layers_1_mlp_gate_weight_folded: "f32[8, 64]" = self.model_model_layers_1_mlp_gate_weight_folded
    linear_13: "f32[s18*s5, 8]" = torch.ops.aten.linear.default(_to_copy_24, model_model_layers_1_mlp_gate_weight_folded);  _to_copy_24 = model_model_layers_1_mlp_gate_weight_folded = None
"""

from __future__ import annotations

import torch
from torch import fx

from .base import GraphPass, PassContext, PassResult
from .patterns import fake_mode_of, is_assert

DEFAULT_FOLD_MAX_BYTES = 64 << 20


def _get_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_foldable_op(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or node.is_impure():
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    schema = target._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    return isinstance(node.meta.get("val"), torch.Tensor)


def _is_view(node: fx.Node) -> bool:
    returns = node.target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is not None


def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """get_attr tensors and the pure ops computed only from them."""
    const = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and \
                    not isinstance(value, torch._subclasses.FakeTensor):
                const.add(node)
        elif _is_foldable_op(node) and node.all_input_nodes and all(i in const for i in node.all_input_nodes):
            const.add(node)
    return const


def _only_views(node: fx.Node) -> bool:
    """The node is a view chain over a weight: no op in its constant subgraph computes anything."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or n.op == "get_attr":
            continue
        seen.add(n)
        if not _is_view(n):
            return False
        stack.extend(n.all_input_nodes)
    return True


def _buffer_name(gm: torch.nn.Module, node: fx.Node) -> str:
    """`<weight>_folded` when one weight feeds the subgraph (readable dumps), else `folded_<node>`."""
    sources, stack, seen = set(), [node], set()
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            if n.op == "get_attr":
                sources.add(n.target.replace(".", "_"))
            stack.extend(n.all_input_nodes)
    base = f"{sources.pop()}_folded" if len(sources) == 1 else f"folded_{node.name}"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _same_as(value: torch.Tensor, source: torch.Tensor) -> bool:
    return (value.dtype == source.dtype and value.shape == source.shape and value.stride() == source.stride()
            and torch.equal(value, source))


class FoldConstantsPass(GraphPass):
    name = "fold_constants"
    rtol = atol = 0.0   # the same ops, run once ahead of time

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        max_bytes = int(ctx.options.fold_max_bytes)
        graph, fake = gm.graph, fake_mode_of(gm)
        const = _constant_nodes(gm)
        frontier = [n for n in graph.nodes if n in const and n.op == "call_function"
                    and any(u not in const and not is_assert(u) for u in n.users)]
        values: dict[fx.Node, torch.Tensor] = {}
        new_bytes, new_constants, skipped, folded_roots = 0, 0, [], []
        for node in frontier:
            if _only_views(node):
                continue
            value = self._evaluate(gm, node, values)
            values.pop(node)   # only shared intermediates stay memoised
            reuse = next((n for n in node.all_input_nodes
                          if n.op == "get_attr" and _same_as(value, _get_attr(gm, n.target))), None)
            if reuse is None and value.nbytes > max_bytes:
                skipped.append(f"{node.name} ({value.nbytes} bytes > fold_max_bytes {max_bytes})")
                continue
            if reuse is None:
                name = _buffer_name(gm, node)
                # keep the computed strides: the readers then run exactly as before (a transposed
                # constant stays transposed; a contiguous copy can change matmul rounding)
                gm.register_buffer(name, value.detach().clone(memory_format=torch.preserve_format),
                                   persistent=False)
                with graph.inserting_before(node):
                    reuse = graph.get_attr(name)
                if fake is not None:
                    reuse.meta["val"] = fake.from_tensor(_get_attr(gm, name), static_shapes=True)
                new_bytes += value.nbytes
                new_constants += 1
            node.replace_all_uses_with(reuse)
            folded_roots.append(node)
        folded = self._erase_dead(graph, folded_roots)
        notes = [f"folded {folded} node(s) into {new_constants} new constant(s), {new_bytes} bytes"]
        notes += [f"skipped {s}" for s in skipped]
        if folded:
            graph.lint()
        return PassResult(gm, modified=folded > 0, matches=folded, notes=notes)

    @staticmethod
    def _evaluate(gm, node: fx.Node, values: dict) -> torch.Tensor:
        """Run the node's constant subgraph with the real weights (memoised across frontier nodes)."""
        if node in values:
            return values[node]
        if node.op == "get_attr":
            return _get_attr(gm, node.target)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                       lambda n: FoldConstantsPass._evaluate(gm, n, values))
        with torch.no_grad():
            values[node] = node.target(*args, **kwargs)
        return values[node]

    @staticmethod
    def _erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> int:
        """Erase the folded ops, then the constant ops and weight reads only they used; returns ops erased."""
        erased, gone, stack = 0, set(), list(roots)
        while stack:
            node = stack.pop()
            if node in gone or node.op not in ("call_function", "get_attr") or \
                    not all(is_assert(u) for u in node.users):
                continue
            inputs = node.all_input_nodes
            for user in list(node.users):
                graph.erase_node(user)
            graph.erase_node(node)
            gone.add(node)
            erased += node.op == "call_function"
            stack.extend(inputs)
        return erased
