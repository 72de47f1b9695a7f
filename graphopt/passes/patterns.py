"""Pattern tracing and matching shared by the fusion passes.

A pattern is a plain Python function, traced exactly the way the step graphs are captured
(`torch.export` + `run_decompositions({})`), so it sits at the same ATen level as the graph it is
matched against, whatever torch version runs. `find_matches` then looks for it in a graph:

  * matching goes backwards from the pattern's first output: op targets must be equal, arguments are
    matched position by position, pattern inputs (placeholders) bind to any node, consistently;
  * literals must be equal (same type and value), except
      - wildcards: a literal the pattern was traced with on purpose (a "sentinel", e.g. eps=1.2345e-3)
        matches any literal of the same type and is returned by name (match.literals["eps"]), so one
        trace serves every epsilon, top-k or expert count;
      - devices: a pattern traced on the CPU matches a graph captured on CUDA;
      - symbolic sizes: a pattern node that computes a SymInt (sym_size, B*T) matches any size
        argument; the op being matched checks sizes itself and the passes add explicit shape checks;
  * every node of a match except its outputs must be used only inside the match, so replacing it
    cannot change any other value. `_assert_tensor_metadata` checks that capture attaches to
    intermediate values do not count as uses; they are removed with the node they check.

`rewrite` inserts the new node(s) before the match's first output, gives them `meta["val"]`
by running the op's fake implementation under the graph's own FakeTensorMode (dynamic sizes stay
symbolic) and erases the matched nodes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._dispatch.python import enable_python_dispatcher

aten = torch.ops.aten

# Nodes capture adds to check a value's metadata at run time. They never feed a computation.
_ASSERT_OPS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default)


@dataclass
class Pattern:
    name: str
    graph: fx.Graph
    inputs: dict[fx.Node, str]         # placeholder -> input name
    outputs: list[fx.Node]             # pattern nodes whose values the replacement must provide
    wildcards: dict[tuple, str]        # (type, sentinel value) -> name

    def __str__(self) -> str:
        return f"pattern {self.name}:\n{self.graph}"


@dataclass
class Match:
    pattern: Pattern
    nodes: dict[fx.Node, fx.Node] = field(default_factory=dict)   # pattern op node -> graph node
    inputs: dict[str, fx.Node] = field(default_factory=dict)      # pattern input name -> graph node
    literals: dict[str, Any] = field(default_factory=dict)        # wildcard name -> graph literal

    @property
    def outputs(self) -> list[fx.Node]:
        return [self.nodes[p] for p in self.pattern.outputs]


# -- tracing ----------------------------------------------------------------------------------------

class _AsModule(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def trace_pattern(name: str, fn: Callable, example_inputs: dict[str, Any], wildcards: dict[str, Any] | None = None,
                  dynamic: Sequence[bool] | None = None) -> Pattern:
    """Trace `fn(*example_inputs.values())` to the captured graphs' ATen level.

    example_inputs: name -> example, in fn's argument order; matches bind graph nodes to these names
      (match.inputs["x"]).
    wildcards: name -> the sentinel value `fn` was given for it (baked in with functools.partial);
      each sentinel must be unique and appear in the trace, else the pattern would silently not work.
    dynamic: per input, whether its dim 0 (tokens) is dynamic (default: the first input's only), so
      size arguments derived from it are traced as SymInt nodes, as in the captured graphs.
    """
    wildcards = dict(wildcards or {})
    keys = [(type(v), v) for v in wildcards.values()]
    if len(set(keys)) != len(keys):
        raise ValueError(f"pattern {name}: wildcard sentinels must be distinct, got {wildcards}")
    names, examples = list(example_inputs), tuple(example_inputs.values())
    if dynamic is None:
        dynamic = [i == 0 for i in range(len(examples))]
    tokens = torch.export.Dim("tokens", min=2)
    shapes = tuple({0: tokens} if d else None for d in dynamic)
    with torch.no_grad():
        ep = torch.export.export(_AsModule(fn), examples, dynamic_shapes=(shapes,), strict=False)
        gm = ep.run_decompositions({}).module()
    graph = gm.graph
    # keep only the computation: no pytree plumbing, guard calls or metadata asserts
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERT_OPS:
            graph.erase_node(node)
        elif node.op == "call_module":
            graph.erase_node(node)
    graph.eliminate_dead_code()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output")
    outputs = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    unused = [n for p, n in zip(placeholders, names) if not p.users]
    if len(placeholders) != len(names) or unused:
        raise ValueError(f"pattern {name}: every input must be used by the pattern; unused: {unused}")
    pattern = Pattern(name, graph, {p: n for p, n in zip(placeholders, names)}, outputs,
                      {(type(v), v): k for k, v in wildcards.items()})
    seen = {lit for n in graph.nodes if n.op == "call_function" for lit in _literals((n.args, n.kwargs))}
    missing = [k for k, v in wildcards.items() if (type(v), v) not in seen]
    if missing:
        raise ValueError(f"pattern {name}: wildcard(s) {missing} do not appear in the trace:\n{graph}")
    return pattern


def _literals(args) -> list[tuple]:
    if isinstance(args, (list, tuple)):
        return [lit for a in args for lit in _literals(a)]
    if isinstance(args, dict):
        return [lit for a in args.values() for lit in _literals(a)]
    if isinstance(args, fx.Node):
        return []
    try:
        hash(args)
    except TypeError:
        return []
    return [(type(args), args)]


# -- matching ---------------------------------------------------------------------------------------

def find_matches(graph: fx.Graph, pattern: Pattern, accept: Callable[[Match], bool] = lambda m: True) -> list[Match]:
    """Non-overlapping matches of `pattern` in `graph`, in graph order.

    accept: the pass's extra checks (shapes, dtypes, literal values) that the structure cannot tell.
    """
    anchor = pattern.outputs[0]
    matches, claimed = [], set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target != anchor.target or node in claimed:
            continue
        m = Match(pattern)
        if not _match_node(anchor, node, m):
            continue
        if not all(p in m.nodes for p in pattern.outputs[1:]) or not _self_contained(m) or not accept(m):
            continue
        if claimed & set(m.nodes.values()):
            continue
        claimed |= set(m.nodes.values())
        matches.append(m)
    return matches


def _is_size_node(pn: fx.Node) -> bool:
    return pn.op == "call_function" and isinstance(pn.meta.get("val"), (torch.SymInt, int))


def _match_node(pn: fx.Node, gn, m: Match) -> bool:
    if pn.op == "placeholder":
        if not isinstance(gn, fx.Node):
            return False
        bound = m.inputs.setdefault(m.pattern.inputs[pn], gn)
        return bound is gn
    if _is_size_node(pn):
        return True   # a size expression: checked by the op and the pass, not by structure
    if pn in m.nodes:
        return m.nodes[pn] is gn
    if not isinstance(gn, fx.Node) or gn.op != "call_function" or gn.target != pn.target:
        return False
    if gn in m.nodes.values():
        return False   # two pattern nodes cannot share one graph node
    m.nodes[pn] = gn
    return _match_arg(pn.args, gn.args, m) and _match_arg(pn.kwargs, gn.kwargs, m)


def _match_arg(pa, ga, m: Match) -> bool:
    if isinstance(pa, fx.Node):
        return _match_node(pa, ga, m)
    if isinstance(pa, (list, tuple)):
        return (isinstance(ga, (list, tuple)) and len(pa) == len(ga)
                and all(_match_arg(p, g, m) for p, g in zip(pa, ga)))
    if isinstance(pa, dict):
        return (isinstance(ga, dict) and pa.keys() == ga.keys()
                and all(_match_arg(pa[k], ga[k], m) for k in pa))
    if isinstance(pa, torch.device):
        return isinstance(ga, torch.device)
    if isinstance(ga, fx.Node):
        return False
    name = m.pattern.wildcards.get((type(pa), pa)) if _hashable(pa) else None
    if name is not None and type(pa) is float and type(ga) is int:
        ga = float(ga)   # a float constant written as an int in a config (routed_scaling_factor: 1)
    if type(pa) is not type(ga):
        return False
    if name is not None:
        return m.literals.setdefault(name, ga) == ga
    return pa == ga


def _hashable(v) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def _self_contained(m: Match) -> bool:
    inside = set(m.nodes.values())
    outputs = set(m.outputs)
    if inside & set(m.inputs.values()):
        return False
    for gn in inside - outputs:
        if any(u not in inside and not is_assert(u) for u in gn.users):
            return False
    return True


def is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ASSERT_OPS


# -- rewriting --------------------------------------------------------------------------------------

def fake_mode_of(gm: fx.GraphModule):
    """The FakeTensorMode (with its ShapeEnv) the graph's meta["val"] tensors were made in, or None."""
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return torch._guards.detect_fake_mode(vals)


def call_op(graph: fx.Graph, fake_mode, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """graph.call_function plus meta["val"] from the op's fake implementation."""
    node = graph.call_function(target, tuple(args), dict(kwargs or {}))
    if fake_mode is not None:
        fargs, fkwargs = fx.node.map_arg((tuple(args), dict(kwargs or {})), lambda n: n.meta["val"])
        # the Python dispatcher runs composite ops (aten.linear) through their SymInt-aware
        # decompositions, as torch.export does; without it some device paths call numel() on a
        # symbolic size (seen on CUDA, torch 2.11)
        with fake_mode, enable_python_dispatcher():
            node.meta["val"] = target(*fargs, **fkwargs)
    return node


def getitem(graph: fx.Graph, node: fx.Node, index: int) -> fx.Node:
    item = graph.call_function(operator.getitem, (node, index))
    if "val" in node.meta:
        item.meta["val"] = node.meta["val"][index]
    return item


def rewrite(gm: fx.GraphModule, matches: Sequence[Match],
            build: Callable[[fx.Graph, Match], Sequence[fx.Node]]) -> int:
    """Replace each accepted match's outputs by the nodes `build(graph, match)` creates; returns how many.

    The new nodes go right before the match's first output in graph order (every input must already be
    defined there, else the match is skipped). A match whose input was the output of an earlier match
    reads the earlier replacement.
    """
    graph, done, replaced = gm.graph, 0, {}
    for m in matches:
        m.inputs = {k: replaced.get(v, v) for k, v in m.inputs.items()}
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(m.outputs, key=order.__getitem__)
        if any(order[i] >= order[first] for i in m.inputs.values()):
            continue
        with graph.inserting_before(first):
            new = list(build(graph, m))
        if len(new) != len(m.outputs):
            raise ValueError(f"{m.pattern.name}: replacement gave {len(new)} values for {len(m.outputs)} outputs")
        for old, repl in zip(m.outputs, new):
            if old.meta.get("stack_trace"):   # dumps show the source line of what was fused
                repl.meta.setdefault("stack_trace", old.meta["stack_trace"])
            old.replace_all_uses_with(repl)
            replaced[old] = repl
        for gn in sorted(m.nodes.values(), key=order.__getitem__, reverse=True):
            for user in list(gn.users):
                if is_assert(user):
                    graph.erase_node(user)
            graph.erase_node(gn)
        for node in set(m.inputs.values()):   # e.g. a cast the new op does itself (strip_float_cast)
            _erase_if_unused(graph, node)
        done += 1
    return done


def _erase_if_unused(graph: fx.Graph, node: fx.Node) -> None:
    if node.op == "call_function" and not node.is_impure() and all(is_assert(u) for u in node.users):
        for user in list(node.users):
            graph.erase_node(user)
        graph.erase_node(node)


def strip_float_cast(node: fx.Node) -> fx.Node:
    """x for `_to_copy(x, dtype=float32)` when the cast has no other use (an op that casts itself)."""
    if (node.op == "call_function" and node.target is aten._to_copy.default and len(node.users) <= 1
            and set(node.kwargs) == {"dtype"} and node.kwargs["dtype"] == torch.float32):
        return node.args[0]
    return node


# -- shape helpers ----------------------------------------------------------------------------------

def same_shape(a, b) -> bool:
    """Statically equal shapes: equal ints or provably equal symbolic sizes; never adds a guard."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def float_dtypes(gm: fx.GraphModule) -> list[torch.dtype]:
    """Floating dtypes of the graph's values, float32 last (patterns with casts are tried first)."""
    found = {v.dtype for n in gm.graph.nodes if isinstance(v := val(n), torch.Tensor) and v.dtype.is_floating_point}
    return sorted(found, key=lambda d: (d == torch.float32, str(d)))
