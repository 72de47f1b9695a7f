"""Captured step graphs shared by the pass tests, and fixtures that run passes in verify mode.

Capturing takes 15-20 s, so each graph is captured once per test session and every test works on a
deep copy. main_fp32 is the random DeepSeek-V3 with 2 layers: a dense first layer and one MoE layer
(grouped noaux_tc routing, a shared expert), q_lora, 4 RMSNorms per layer plus the final norm.
main_bf16 is the same model in bfloat16 (casts appear around norms, router and experts) with only the
MoE layer, which halves its capture time; tests derive expected counts from `captured.config`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from graphopt.capture.step import CapturedGraph, capture_main
from graphopt.models.random import random_model
from graphopt.passes.base import GraphPass, PassContext
from graphopt.passes.manager import PassManager, PassRecord, Phase
from graphopt.passes.program import CompileOptions, CompileState


@dataclass
class Captured:
    model: torch.nn.Module
    step: CapturedGraph
    model_config: object = None

    @property
    def config(self):
        return self.model_config if self.model_config is not None else getattr(self.model, "config", None)

    def fresh(self) -> torch.fx.GraphModule:
        return copy.deepcopy(self.step.graph_module)


@pytest.fixture(scope="session")
def main_fp32() -> Captured:
    model = random_model(num_hidden_layers=2)
    return Captured(model, capture_main(model))


@pytest.fixture(scope="session")
def main_bf16() -> Captured:
    model = random_model(num_hidden_layers=1, first_k_dense_replace=0).to(torch.bfloat16)
    return Captured(model, capture_main(model))


def export_small(module: torch.nn.Module, example_inputs: tuple, config=None) -> Captured:
    """A small module exported like the step graphs: dim 0 of every input is one dynamic size."""
    batch = torch.export.Dim("batch", min=2)
    shapes = tuple({0: batch} for _ in example_inputs)
    with torch.no_grad():
        ep = torch.export.export(module, example_inputs, dynamic_shapes=shapes, strict=False)
        gm = ep.run_decompositions({}).module()

    def make_inputs(seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(t.shape, generator=g).to(t.dtype) for t in example_inputs)

    return Captured(module, CapturedGraph("small", gm, make_inputs), config)


@pytest.fixture(scope="session")
def small():
    """small(module, example_inputs, config=None) -> Captured (see export_small)."""
    return export_small


@dataclass
class Ran:
    graph_module: torch.fx.GraphModule
    records: list[PassRecord]

    def record(self, name: str) -> PassRecord:
        return next(r for r in self.records if r.name == name)


def run_passes(captured: Captured, passes: list[GraphPass], verify: bool = True, with_config: bool = True,
               options: dict | None = None) -> Ran:
    """Run `passes` as one phase over a copy of the captured graph.

    options: CompileOptions fields plus the CompileState fields spec / quant / calibration_inputs.

    verify=True: the manager compares every modified graph with the one before it on fresh random
    inputs (outputs and mutated caches) with each pass's tolerance, and checks the graph invariants.
    """
    options = dict(options or {})
    state = CompileState(**{k: options.pop(k) for k in ("spec", "quant", "calibration_inputs") if k in options})
    ctx = PassContext(model_config=captured.config if with_config else None, options=CompileOptions(**options),
                      make_inputs=captured.step.make_inputs, graph_name=captured.step.name, state=state)
    manager = PassManager([Phase("test", "passes under test", passes)], verify=verify)
    gm = manager.run(captured.fresh(), ctx)
    return Ran(gm, manager.records)


def run_both(before: torch.fx.GraphModule, after: torch.fx.GraphModule, make_inputs, seed: int = 7):
    """Outputs and mutated caches of both graphs on the same fresh inputs, as flat lists."""
    def flat(x):
        if isinstance(x, torch.Tensor):
            return [x]
        return [t for v in x for t in flat(v)] if isinstance(x, (list, tuple)) else []

    with torch.no_grad():
        a, b = make_inputs(seed), make_inputs(seed)
        return flat(before(*a)) + flat(a), flat(after(*b)) + flat(b)


@pytest.fixture(scope="session")
def run():
    """run(captured, passes, verify=True, with_config=True, options=None) -> Ran (see run_passes)."""
    return run_passes


@pytest.fixture(scope="session")
def outputs():
    """outputs(before_gm, after_gm, make_inputs, seed) -> (flat values before, flat values after)."""
    return run_both
