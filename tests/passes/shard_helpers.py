"""Shared by the sharding pass tests: one captured random model whose sizes tp = ep = 2 divide (captured
once per process), the normalise and spec phases run over it, and a plan for a rank without a process
group (the passes only rewrite graphs; nothing here runs a collective)."""

from __future__ import annotations

import functools

from graphopt.capture.step import capture_main
from graphopt.models.random import random_model
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import normalise_phase, spec_phase
from graphopt.passes.program import CompileOptions, CompileState, GraphSignature, Program
from graphopt.passes.sharding import ParallelPlan, copy_graph
from graphopt.step.paged import CacheLayout

BS = 4


def plan(rank: int = 0, tp: int = 2, ep: int = 2) -> ParallelPlan:
    return ParallelPlan(tp=tp, ep=ep, rank=rank, world_size=max(tp, ep), group_name="0")


@functools.cache
def _captured():
    model = random_model(0, vocab_size=96, num_hidden_layers=2)      # a dense layer and a MoE layer
    return model, capture_main(model, BS)                             # MTP graphs: the multi-process tests


@functools.cache
def _normalised(disabled: frozenset = frozenset()):
    model, captured = _captured()
    layout = CacheLayout.for_config(model.config, BS)
    program = Program(model.config, layout, CompileState())
    program.set("main", copy_graph(captured.graph_module), GraphSignature(tuple(captured.input_names),
                tuple(captured.output_names)), captured.make_inputs)
    manager = PassManager([normalise_phase(), spec_phase()], set(disabled))
    program = manager.run_program(program, PassContext(model.config, CompileOptions(), state=program.state))
    return model, program


def normalised_program(disabled: frozenset = frozenset()):
    """(model, a fresh copy of the Program after normalise + spec); the graphs still read the model's tensors."""
    model, program = _normalised(disabled)
    fresh = Program(program.model_config, program.cache, CompileState())
    for name, gm in program.graphs.items():
        fresh.set(name, copy_graph(gm), program.signatures[name], program.make_inputs[name])
    return model, fresh


def ctx(model) -> PassContext:
    return PassContext(model.config, CompileOptions(), state=CompileState())
