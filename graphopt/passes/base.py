"""The contract every graph pass follows.

A pass is a small object with one entry point, `run(gm, ctx) -> PassResult`. It says whether it
changed the graph and how many places it rewrote; the manager (`manager.py`) times it, dumps the
graph before and after, checks invariants and numerics in verify mode, and names it when it fails.

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


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    matches: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may read besides the graph: the model config, the options, the step's inputs."""

    model_config: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    make_inputs: Callable[[int], tuple] | None = None   # seed -> fresh valid inputs for this graph
    graph_name: str = "main"
    state: dict[str, Any] = field(default_factory=dict)  # shared between passes (calibration stats, ...)


class GraphPass:
    """Base class: subclasses set `name` and implement `run`.

    `rtol`/`atol` are the verify-mode tolerances for this pass: 0 for exact rewrites; fusions that
    reorder floating-point work get a small tolerance; quantisation passes declare their own.
    """

    name: str = ""
    rtol: float = 1e-5
    atol: float = 1e-5

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
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
