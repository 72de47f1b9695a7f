"""Export a template module over stand-ins for captured graphs, then splice the graphs in.

The speculative step (`step/spec_step.py`) is a small template (slot mapping, acceptance, the token
shift, the draft chain) around calls of captured step graphs of ~1000 nodes each. torch.export of
the template with the graphs inside traces every captured node again with symbolic shapes, once per
call site and once per template (step, prefill): that was 7-10 s of a 30 s compile. Here each call
is one `graphopt::_step_graph` node while the template is exported (its fake implementation gives
the outputs' shapes from the captured graph's own meta), and `splice` then copies the captured
nodes in place of that node. The copied nodes' `meta["val"]` are rebuilt in the template's fake
mode by substituting the capture's shape symbols (batch, tokens, blocks, cache blocks) with the
call's argument sizes, so the fused graph has one consistent ShapeEnv without a second trace; a
value the substitution cannot express (a data-dependent size) is recomputed by running that node's
op on fake inputs.

    step = GraphCall(gm, 7)               # gm: a flat graph (fx.graph.CodeGen): flat args -> flat tuple
    template.main_fn = step               # forward(*tensors) -> list of tensors, like gm; the template
    gm_t = torch.export.export(template, ...).module()   # must not hold gm (export would lift its weights)
    splice(gm_t, {7: ("main_fn.graph_module", gm)})   # gm's nodes replace the call; weights registered
    step.release()                                     # under the prefix, shared ones once

Rebuilt values keep sizes, strides and dtype; storage offsets of views are not kept (no pass reads them).
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch import fx

from .workers import ShapeOnly, SymValue

__all__ = ["GraphCall", "splice"]

# key -> the graph a stand-in stands for, and its output shapes (`out_shapes`), while it is in use
_GRAPHS: dict[int, fx.GraphModule] = {}
_SHAPES: dict[int, list] = {}


def _expr(s):
    """A size of a captured value as a sympy expression; None for a plain int. Values are fake
    tensors (SymInt sizes) or, from a capture worker, `ShapeOnly` (sympy sizes)."""
    if isinstance(s, torch.SymInt):
        return s.node.expr
    return s if isinstance(s, sympy.Expr) else None


def out_shapes(gm: fx.GraphModule) -> list[tuple[list, torch.dtype, torch.device]]:
    """Per output: (dims, dtype, device), each dim an int or (argument index, dim) of an input with
    the same symbol: what the fake implementation needs to build the outputs from its arguments."""
    where = {}
    for i, ph in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        for d, s in enumerate(ph.meta["val"].shape):
            if isinstance(_expr(s), sympy.Symbol):
                where.setdefault(_expr(s), (i, d))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    shapes = []
    for v in (a.meta["val"] for a in out.args[0]):
        dims = []
        for s in v.shape:
            if _expr(s) is not None:
                if _expr(s) not in where:
                    raise ValueError(f"output size {s} of the captured graph is not an input size; cannot splice it")
                s = where[_expr(s)]
            dims.append(s)
        shapes.append((dims, v.dtype, v.device))
    return shapes


@torch.library.custom_op("graphopt::_step_graph", mutates_args=())
def _step_graph(args: list[torch.Tensor], graph: int) -> list[torch.Tensor]:
    """Runs the captured graph `graph` (clones: a custom op's outputs may not alias its inputs).
    Only exported templates hold it, never a graph `splice` has finished."""
    return [t.clone() for t in _GRAPHS[graph](*args)]


@_step_graph.register_fake
def _(args, graph):
    shapes = _SHAPES[graph]
    return [args[0].new_empty([d if isinstance(d, int) else args[d[0]].shape[d[1]] for d in dims],
                              dtype=dtype, device=device) for dims, dtype, device in shapes]


class GraphCall(torch.nn.Module):
    """Stands for a flat graph module while a template is exported: one `graphopt::_step_graph` node.
    shapes: the graph's `out_shapes` when the graph itself is not there yet (a layer still being
    traced by a capture worker); such a call can be exported, not run."""

    def __init__(self, gm: fx.GraphModule | None, key: int, shapes: list | None = None):
        super().__init__()
        self.key = key
        if gm is not None:
            _GRAPHS[key] = gm
        _SHAPES[key] = out_shapes(gm) if shapes is None else shapes

    def forward(self, *args):
        return torch.ops.graphopt._step_graph(list(args), self.key)

    def release(self) -> None:
        _GRAPHS.pop(self.key, None)
        _SHAPES.pop(self.key, None)


def splice(gm: fx.GraphModule, graphs: dict[int, tuple]) -> None:
    """Replace every `graphopt::_step_graph(args, key)` node of gm by the nodes of graphs[key], in place.

    graphs[key] is (prefix, flat graph module) or (prefix, flat graph module, root): the graph's
    get_attr targets are read from root (default: the graph module itself), so one captured graph
    can be spliced at several call sites, each over its own weights (the repeated decoder layers of
    `capture.step`). Weights become get_attr targets `prefix.<target>`."""
    fake_mode = next(n.meta["val"].fake_mode for n in gm.graph.nodes
                     if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor))
    weights: dict[int, str] = {}
    built: dict[tuple, torch.Tensor] = {}
    for call in [n for n in gm.graph.nodes if n.target is torch.ops.graphopt._step_graph.default]:
        prefix, sub, *root = graphs[call.args[1]]
        _splice_one(gm, call, prefix, sub, root[0] if root else sub, weights, _Target(fake_mode, built))
    gm.graph.lint()
    gm.recompile()


class _Target:
    """Where one call's values are rebuilt: gm's fake mode and the call's sizes for the capture's
    symbols. A tensor value of given (sizes, strides, dtype, device) is built once per `splice` and
    shared by every node that has it (the repeated layers): building one costs ~1 ms of symbolic
    arithmetic, and nothing downstream mutates a meta value or reads its storage."""

    def __init__(self, fake_mode, built: dict):
        self.fake_mode, self.built = fake_mode, built
        self.symbols: dict = {}   # capture's shape symbol -> this call's size (a SymInt of gm's ShapeEnv or an int)

    def bind(self, placeholders, args) -> None:
        for ph, arg in zip(placeholders, args):
            for s, t in zip(ph.meta["val"].shape, arg.meta["val"].shape):
                if isinstance(_expr(s), sympy.Symbol):
                    self.symbols.setdefault(_expr(s), t)
        self.key = tuple(sorted((str(k), _key(v)) for k, v in self.symbols.items()))


def _key(s):
    e = _expr(s)
    return int(s) if e is None else e


def _splice_one(gm, call: fx.Node, prefix: str, sub: fx.GraphModule, root: torch.nn.Module, weights: dict,
                target: _Target) -> None:
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, call.args[0]))
    target.bind(placeholders, call.args[0])
    outputs = None
    with gm.graph.inserting_before(call):
        for node in sub.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = [env[a] for a in node.args[0]]
            elif node.op == "call_module":   # the capture's input guards: gm checks its own inputs
                assert not node.users, f"captured graph's {node.target} has users"
            elif node.op == "get_attr":
                if not node.users:   # the unlifted capture reads every weight of the model it ran
                    continue
                env[node] = gm.graph.get_attr(_register(gm, prefix, node.target, root, weights))
                env[node].meta = dict(node.meta)
                if "val" in node.meta:   # a weight: static sizes, only the fake mode changes
                    env[node].meta["val"] = _substitute(node.meta["val"], target)
            else:
                new = gm.graph.node_copy(node, lambda n: env[n])
                if "val" in node.meta:
                    new.meta["val"] = _rebuild(node.meta["val"], target, new)
                env[node] = new
    for user in list(call.users):
        assert user.target is operator.getitem, f"{call.name} used by {user.format_node()}"
        user.replace_all_uses_with(outputs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(call)


def _register(gm: fx.GraphModule, prefix: str, target: str, root: torch.nn.Module, weights: dict) -> str:
    """gm's attribute path for root's attribute `target`; one path per tensor however many graphs hold it."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.Tensor) and id(obj) in weights:
        return weights[id(obj)]
    path = f"{prefix}.{target}"
    *parents, leaf = path.split(".")
    mod = gm
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(obj, torch.nn.Parameter) or not isinstance(obj, torch.Tensor):
        setattr(mod, leaf, obj)
    else:
        mod.register_buffer(leaf, obj)
    if isinstance(obj, torch.Tensor):
        weights[id(obj)] = path
    return path


class _Unknown(Exception):
    pass


def _size(s, symbols: dict):
    """A size of the captured graph as a size of gm: its symbols replaced by this call's sizes."""
    e = _expr(s)
    return s if e is None else _eval(e, symbols)


def _eval(e, symbols: dict):
    # sympy expression over capture symbols -> int / SymInt of gm's ShapeEnv (size arithmetic only)
    if isinstance(e, sympy.Integer):
        return int(e)
    if isinstance(e, sympy.Symbol):
        if e not in symbols:
            raise _Unknown(e)
        return symbols[e]
    args = [_eval(a, symbols) for a in e.args]
    if isinstance(e, sympy.Add):
        return sum(args[1:], args[0])
    if isinstance(e, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    name = type(e).__name__
    if name == "FloorDiv":
        return args[0] // args[1]
    if name in ("Mod", "PythonMod"):
        return args[0] % args[1]
    if isinstance(e, sympy.Pow) and isinstance(e.exp, sympy.Integer) and e.exp >= 0:
        return args[0] ** int(e.exp)
    raise _Unknown(e)


def _rebuild(val, target: _Target, node: fx.Node):
    """node's meta["val"] in gm's fake mode; recomputed from its inputs where a size is not
    expressible in this call's sizes (data-dependent sizes, unusual expressions)."""
    try:
        return _substitute(val, target)
    except _Unknown:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        with target.fake_mode:
            return node.target(*args, **kwargs)


def _substitute(val, target: _Target):
    if isinstance(val, SymValue):
        return _eval(val.expr, target.symbols)
    if isinstance(val, (torch.Tensor, ShapeOnly)):
        key = (target.key, tuple(map(_key, val.shape)), tuple(map(_key, val.stride())), val.dtype, val.device)
        if key not in target.built:
            sizes = [_size(s, target.symbols) for s in val.shape]
            strides = [_size(s, target.symbols) for s in val.stride()]
            with target.fake_mode:
                target.built[key] = torch.empty_strided(sizes, strides, dtype=val.dtype, device=val.device)
        return target.built[key]
    if isinstance(val, (tuple, list)):
        return type(val)(_substitute(v, target) for v in val)
    if isinstance(val, (torch.SymInt, int)):
        return _size(val, target.symbols)
    return val
