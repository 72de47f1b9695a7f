"""The contract every graph pass follows.

A graph pass is a small object with one entry point, `run(gm, ctx) -> PassResult`. It says whether
it changed the graph and how many places it rewrote; the manager (`manager.py`) runs it over each
graph of the Program, times it, dumps the graph before and after, checks invariants and numerics in
verify mode, and names it when it fails. A module pass (`ModulePass`: the spec fusion, later
sharding) sees the whole Program instead: `run(program, ctx) -> ModuleResult`.

    class FuseThingPass(GraphPass):
        name = "fuse_thing"
        def run(self, gm, ctx):
            n = rewrite(gm)            # mutate gm.graph in place
            return PassResult(gm, modified=n > 0, matches=n)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .program import CompileOptions, CompileState, Program


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    matches: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class ModuleResult:
    program: Program
    modified: bool
    matches: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may read besides the graph: the model config, the options, the graph's inputs,
    and the Program's compile state (shared by every graph of one compile)."""

    model_config: Any = None
    options: CompileOptions = field(default_factory=CompileOptions)
    make_inputs: Callable[[int], tuple] | None = None   # seed -> fresh valid inputs for this graph
    graph_name: str = "main"
    state: CompileState = field(default_factory=CompileState)
    output_names: tuple[str, ...] = ()                   # the graph's outputs ("logits", "hidden"); () unknown

    def __post_init__(self):
        if not isinstance(self.options, CompileOptions) or not isinstance(self.state, CompileState):
            raise TypeError(f"PassContext takes a CompileOptions and a CompileState (graphopt.passes.program), "
                            f"got {type(self.options).__name__} and {type(self.state).__name__}")


class GraphPass:
    """Base class: subclasses set `name` and implement `run`.

    `numerics` says what the pass may change, i.e. how verify mode judges it (verify.CHECKS):
      "close"      every output and mutated cache within `rtol`/`atol` of the graph before the pass,
                   integers equal: 0 for exact rewrites, small for fusions that reorder float work;
      "quantised"  the next-token distributions (softmax of the logits) within the KL divergence and
                   top-1 agreement its quantisation scheme is allowed (verify.QUANT_BUDGETS).
    """

    name: str = ""
    numerics: str = "close"
    rtol: float = 1e-5
    atol: float = 1e-5

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class ModulePass:
    """Base class of passes over the whole Program (they may add, replace or drop graphs).

    `changes_signature`: the graphs it makes have other signatures than the ones it read, so verify
    mode checks their invariants but cannot compare their numerics with a graph before them."""

    name: str = ""
    changes_signature: bool = True

    def run(self, program: Program, ctx: PassContext) -> ModuleResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def count_ops(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Op histogram: call_function targets by name (aten.mm.default, graphopt.rms_norm.default, ...)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = op_name(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))
