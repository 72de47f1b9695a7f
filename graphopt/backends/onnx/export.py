"""One Program graph -> one checked ONNX model; `export_program(program, directory)` writes them all.

    functional_graph(gm)                   caches in and out, graphopt ops as ONNX-friendly torch
    torch.onnx.export(dynamo=True)         torch.export of that graph (dynamic batch, tokens, table
                                           width, cache blocks) and torchlib's ATen -> ONNX translation
    onnx.checker.check_model(full_check)   shape inference and the checker over the whole model

Why re-export with torch.onnx instead of writing an FX -> ONNX converter: the graphs already are ATen
after the passes, and torchlib translates ATen (type promotion, symbolic shapes, index ops) with
the semantics the exporter is tested against; a converter of our own would re-implement that for
about seventy ops. The price is one more trace per graph (a few seconds each, see docs/onnx.md).

ONNX input names are the graph's placeholder names (`tokens`, ..., `kv_caches_0`, ..); outputs are
the signature's output names (`<name>_out` where an input has that name), then `new_<cache input>`.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from ...models.fileio import write_file_atomically
from ...passes.program import Program
from .functional import cache_inputs, functional_graph

__all__ = ["OnnxGraph", "export_graph", "export_program"]

# example sizes of the dynamic dimensions: distinct, and none 0 or 1 (which export would specialise)
_B, _T, _M, _N = 3, 5, 4, 9


class OnnxGraph:
    """One exported graph: the ModelProto and its input / output / cache names."""

    def __init__(self, name: str, model: onnx.ModelProto, inputs: list[str], outputs: list[str], caches: list[str]):
        self.name, self.model = name, model
        self.inputs, self.outputs, self.caches = inputs, outputs, caches
        self.writes_in_place = {c for c in caches if _only_scattered(model.graph, c)}

    def serialize(self) -> bytes:
        return self.model.SerializeToString()


def _only_scattered(graph: onnx.GraphProto, name: str) -> bool:
    """True when input `name` is read only as the data of ScatterND (through Reshape / Identity /
    Shape): then its buffer may also be that cache's output, whatever order onnxruntime runs nodes in,
    because every later read depends on the scatter's result."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i, value in enumerate(node.input):
            readers.setdefault(value, []).append((node, i))
    todo, seen = [name], set()
    while todo:
        value = todo.pop()
        for node, i in readers.get(value, []):
            if node.op_type == "Shape":
                continue
            if node.op_type in ("Reshape", "Identity") and i == 0:
                todo.extend(o for o in node.output if o not in seen)
                seen.update(node.output)
            elif not (node.op_type == "ScatterND" and i == 0):
                return False
    return True


def _example(name: str, program: Program, k1: int) -> tuple[torch.Tensor, dict]:
    """An example value for placeholder `name` and its dynamic dimensions."""
    layout, cfg = program.cache, program.model_config
    i64 = lambda *s: torch.zeros(*s, dtype=torch.int64)                       # noqa: E731
    B, T, M, N = Dim.AUTO, Dim.AUTO, Dim.AUTO, Dim.AUTO
    if name.startswith(("kv_cache", "mtp_cache")):
        return torch.zeros(_N, layout.block_size, layout.kv_cache_dim, dtype=layout.dtype), {0: N}
    if name in ("tokens",):
        return i64(_B, k1), {0: B}
    if name in ("ids", "input_ids", "next_ids", "positions", "slot_mapping"):
        return i64(_B, _T), {0: B, 1: T}
    if name == "hidden":
        return torch.zeros(_B, _T, cfg.hidden_size, dtype=layout.dtype), {0: B, 1: T}
    if name == "block_tables":
        return i64(_B, _M), {0: B, 1: M}
    if name == "lengths":
        return torch.full((_B,), _T, dtype=torch.int64), {0: B}
    if name == "is_last_chunk":
        return torch.tensor(True), {}
    if name == "active":
        return torch.ones(_B, dtype=torch.bool), {0: B}
    if name in ("temperature", "top_p", "min_p"):
        return torch.ones(_B, dtype=torch.float32), {0: B}
    if name == "eos_token_id":
        return torch.full((_B,), -1, dtype=torch.int64), {0: B}
    return i64(_B), {0: B}                                                    # start_pos, top_k, seed, max_pos


@contextlib.contextmanager
def _no_new_stack_traces():
    """torch.onnx re-traces a graph whose nodes already carry their source lines (the captured nodes'
    stack_trace meta); recording a stack for every node it makes again (`torch.fx.config.
    do_not_emit_stack_traces`, where this torch has it) adds nothing to the ONNX model. What it saves
    is not measured beyond a few noisy single runs on the CPU (docs/onnx.md)."""
    try:
        config = importlib.import_module("torch.fx.config")
    except ImportError:
        config = None
    if config is None or not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before, config.do_not_emit_stack_traces = config.do_not_emit_stack_traces, True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def export_graph(program: Program, name: str) -> OnnxGraph:
    """Program graph `name` as a checked ONNX model (see the module doc)."""
    gm = functional_graph(program[name])
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    caches = cache_inputs(program[name])
    k1 = 1 + program.state.num_speculative_tokens
    examples = [_example(n, program, k1) for n in inputs]
    args = tuple(e[0] for e in examples)
    dynamic = {n: e[1] for n, e in zip(inputs, examples)}
    # an output named like an input (mtp graphs: hidden in, hidden out) is renamed: ONNX names are SSA
    plain = [f"{o}_out" if o in inputs else o for o in program.signatures[name].outputs]
    outputs = [*plain, *(f"new_{c}" for c in caches)]
    with warnings.catch_warnings(), _no_new_stack_traces():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(gm, args, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
                                         output_names=outputs, optimize=True, verbose=False)
    model = onnx_program.model_proto
    onnx.checker.check_model(model, full_check=True)
    return OnnxGraph(name, model, inputs, outputs, caches)


def export_program(program: Program, directory, layout: str = "{name}.onnx", names=None,
                   exported: dict[str, OnnxGraph] | None = None) -> list[Path]:
    """Write each Program graph as a checked ONNX model at `directory / layout.format(name=graph)`
    (atomically, folders created); returns the paths in pipeline order.

    names: which graphs (default: all, pipeline order). exported: graphs exported already, by name
    (`OnnxExecutable.graphs`): reused, and what is exported here is added to it. `graphopt dump
    --format onnx` calls this with the dump's layout (`passes.dump.ONNX_LAYOUT`: <graph>/final.onnx)."""
    exported = {} if exported is None else exported
    paths = []
    for name in program.names if names is None else names:
        if name not in exported:
            exported[name] = export_graph(program, name)
        path = Path(directory) / layout.format(name=name)
        write_file_atomically(path, exported[name].serialize())
        paths.append(path)
    return paths
