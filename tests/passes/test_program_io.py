"""program_io: a Program to disk and back, on a small hand-built graph that uses every saved value kind."""

import json
import math
import operator

import pytest
import safetensors.torch
import torch
import torch.fx as fx

from graphopt.models.random import random_config
from graphopt.passes.program import GraphSignature, Program
from graphopt.passes.program_io import GRAPHS, WEIGHTS, load_program, read_manifest, save_program
from graphopt.step.paged import CacheLayout

aten = torch.ops.aten
VERSION = "test-1"


def _graph_module() -> fx.GraphModule:
    """x -> to float64 -> clamp(-inf, inf) -> split -> [0] + buffer, * parameter; the parameter
    also under a second name (one stored tensor)."""
    root = torch.nn.Module()
    root.sub = torch.nn.Module()
    root.sub.register_buffer("w", torch.arange(4.0, dtype=torch.float64).view(1, 4))
    root.p = torch.nn.Parameter(torch.full((1, 4), 2.0, dtype=torch.float64), requires_grad=False)
    root.q = root.p
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(aten._to_copy.default, (x,), {"dtype": torch.float64, "device": torch.device("cpu"),
                                                      "memory_format": torch.contiguous_format,
                                                      "layout": torch.strided})
    b = g.call_function(aten.clamp.default, (a, -math.inf, math.inf))
    parts = g.call_function(aten.split_with_sizes.default, (b, [1, 2]))
    first = g.call_function(operator.getitem, (parts, 0))
    rest = g.call_function(operator.getitem, (parts, 1))
    w, p, q = g.get_attr("sub.w"), g.get_attr("p"), g.get_attr("q")
    s = g.call_function(aten.add.Tensor, (first, w), {"alpha": 0.5})
    m = g.call_function(aten.mul.Tensor, (s, p))
    m = g.call_function(aten.mul.Tensor, (m, q))
    g.output((m, [rest, None]))
    return fx.GraphModule(root, g)


def _program(gm) -> Program:
    cfg = random_config()
    program = Program(cfg, CacheLayout.for_config(cfg, 4))
    program.set("main", gm, GraphSignature(("x",), ("y", "rest")))
    return program


def test_round_trip_same_code_and_outputs(tmp_path):
    gm = _graph_module()
    save_program(_program(gm), tmp_path / "a", VERSION, {})
    loaded = load_program(tmp_path / "a", read_manifest(tmp_path / "a", VERSION))["main"]
    assert loaded.code == gm.code                       # same nodes, names, targets and arguments
    x = torch.randn(3, 4)
    (y0, r0), (y1, r1) = gm(x), loaded(x)
    assert torch.equal(y0, y1) and torch.equal(r0[0], r1[0]) and r1[1] is None
    assert isinstance(loaded.p, torch.nn.Parameter) and "sub.w" in dict(loaded.named_buffers())
    assert loaded.p is loaded.q                         # one tensor under two names stays one
    assert len(safetensors.torch.load_file(str(tmp_path / "a" / WEIGHTS))) == 2


def test_unknown_argument_type_is_an_error_at_save(tmp_path):
    gm = _graph_module()
    node = next(n for n in gm.graph.nodes if n.target is aten.clamp.default)
    node.args = (node.args[0], object(), 1.0)
    with pytest.raises(TypeError, match=r"graph 'main' node 'clamp_default'.*object"):
        save_program(_program(gm), tmp_path / "a", VERSION, {})
    assert not (tmp_path / "a").exists()


def test_unknown_op_at_load_names_graph_and_node(tmp_path):
    save_program(_program(_graph_module()), tmp_path / "a", VERSION, {})
    path = tmp_path / "a" / GRAPHS
    text = path.read_text().replace("op:aten::mul.Tensor", "op:nosuch::mul.Tensor")
    path.write_text(text)
    manifest = read_manifest(tmp_path / "a", VERSION)
    manifest["files"].pop(GRAPHS)                       # skip the checksum: reach the decoder
    with pytest.raises(ValueError, match=r"graph 'main' node 'mul_tensor'.*nosuch::mul"):
        load_program(tmp_path / "a", manifest)


def test_manifest_is_json_with_versions(tmp_path):
    save_program(_program(_graph_module()), tmp_path / "a", VERSION, {"backend": "eager"})
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["graphopt_version"] == VERSION and manifest["torch_version"] == torch.__version__
    assert manifest["backend"] == "eager" and set(manifest["files"]) == {GRAPHS, WEIGHTS}
