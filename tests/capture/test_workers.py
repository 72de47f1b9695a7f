"""Capture workers: layer kinds traced in forked processes give the graph traced in this process;
a worker's failure is raised here, named; the transport keeps every node and value shape."""

import os

import pytest
import torch

from graphopt.capture import step as capture
from graphopt.capture.workers import ShapeOnly, Worker, fork_available, pack_graph, unpack_graph
from graphopt.models.random import random_model
from graphopt.passes.program import CompileOptions

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs the fork start method and no CUDA context")


def _describe(gm):
    rows = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        shape = (tuple(v.shape), tuple(v.stride()), v.dtype) if isinstance(v, torch.Tensor) else str(v)
        rows.append((n.op, str(n.target), n.name, str(n.args), str(n.kwargs), str(shape), n.meta.get("stack_trace")))
    return rows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model()


@pytest.fixture(scope="module")
def local(model):
    return capture.LayerGraphs(model, 4, workers=0)


def test_workers_give_the_graph_of_an_in_process_trace(model, local):
    # (the MTP block reuses the MoE layer's graph from the same LayerGraphs: no worker of its own)
    forked = capture.LayerGraphs(model, 4)
    a, b = capture.capture_main(model, 4, layers=local), capture.capture_main(model, 4, layers=forked)
    assert _describe(a.graph_module) == _describe(b.graph_module)
    with torch.no_grad():
        for x, y in zip(a.graph_module(*a.make_inputs(3)), b.graph_module(*b.make_inputs(3))):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_pack_keeps_nodes_targets_and_symbolic_shapes(model, local):
    gm = local.graph(model.model.layers[1], "layer 1")      # traced once per process: shared with the test above
    graph = unpack_graph(pack_graph(gm.graph))
    before, after = list(gm.graph.nodes), list(graph.nodes)
    assert [(n.name, n.op, n.target) for n in before] == [(n.name, n.op, n.target) for n in after]
    ph = next(n for n in after if n.op == "placeholder")
    assert isinstance(ph.meta["val"], ShapeOnly)
    original = next(n for n in before if n.name == ph.name)
    assert [str(s) for s in ph.meta["val"].shape] == [str(s) for s in original.meta["val"].shape]
    assert any(not isinstance(s, int) for s in ph.meta["val"].shape)      # B and T stay symbols


class _Boom(RuntimeError):
    pass


def _fail():
    raise ValueError("layer trace went wrong")


def test_a_failing_worker_is_raised_here_naming_the_error():
    with pytest.raises(_Boom, match="ValueError: layer trace went wrong"):
        Worker(_fail, _Boom).result()


def test_a_dead_worker_is_an_error_naming_its_exit_code():
    with pytest.raises(_Boom, match="exit code 3.*capture_workers=0"):
        Worker(lambda: os._exit(3), _Boom).result()


def test_capture_workers_option_is_checked():
    assert CompileOptions.from_kwargs({"capture_workers": 0}).capture_workers == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="capture_workers must be None or an int >= 0"):
            CompileOptions.from_kwargs({"capture_workers": bad})
    with pytest.raises(ValueError, match="capture_workers"):
        capture.LayerGraphs(random_model(), 4, workers=-2)
