"""Regional capture (each kind of decoder layer traced once, spliced per layer) against a trace of
the whole model: the same ops, the same weights at the same paths, the same outputs."""

from collections import Counter

import pytest
import torch

from graphopt.capture import step as capture
from graphopt.models.random import random_model
from graphopt.step.model_step import MainStep, MTPStep

_SIZE = {"aten.sym_size.int", "<built-in function mul>", "<built-in function add>"}


def _ops(gm):
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target) not in _SIZE)


def _weights(gm):
    return sorted(n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model()


@pytest.fixture(scope="module")
def main_capture(model):
    """(layer graphs, the regional main capture, the layer kinds right after it): one capture (seconds) for
    the main and the MTP tests."""
    layers = capture.LayerGraphs(model, 4)
    regional = capture.capture_main(model, 4, layers=layers)
    return layers, regional, dict(layers.graphs)


def test_main_equals_a_whole_model_trace(model, main_capture):
    layers, regional, kinds = main_capture
    inputs = regional.make_inputs
    whole = capture._export(MainStep(model), inputs(0), capture._dynamic_shapes(model.config.num_hidden_layers, False),
                            "whole")
    assert _ops(regional.graph_module) == _ops(whole)
    assert _weights(regional.graph_module) == _weights(whole)
    # the random model has dense and MoE layers: one trace per kind, not per layer
    assert len(kinds) == 2 < model.config.num_hidden_layers
    with torch.no_grad():
        for seed in (1, 2):
            a, b = inputs(seed), inputs(seed)
            out_r, out_w = regional.graph_module(*a), whole(*b)
            for x, y in zip(out_r, out_w):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
            for ca, cb in zip(a[-1], b[-1]):           # the caches were written the same way
                torch.testing.assert_close(ca, cb, rtol=0, atol=0)
    # every spliced node carries a value in the graph's own shape environment (the trailing cache
    # copies have none, as in export's own graph)
    missing = {str(n.target) for n in regional.graph_module.graph.nodes if n.op == "call_function" and "val" not in n.meta}
    assert missing == {"aten.copy_.default"}


def test_mtp_reuses_the_main_layers_graph(model, main_capture):
    layers, _, kinds = main_capture
    mtp = capture.capture_mtp(model, 0, 4, layers=layers)
    assert layers.graphs == kinds                       # the MTP block is a MoE layer: no new trace
    whole = capture._export(MTPStep(model, 0), mtp.make_inputs(0), capture._dynamic_shapes(1, True), "whole")
    assert _ops(mtp.graph_module) == _ops(whole)
    assert _weights(mtp.graph_module) == _weights(whole)
    with torch.no_grad():
        for x, y in zip(mtp.graph_module(*mtp.make_inputs(5)), whole(*mtp.make_inputs(5))):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_the_users_model_is_untouched(model):
    before = [id(m) for m in model.modules()]
    capture.capture_main(model, 4)
    capture.capture_mtp(model, 0, 4)
    assert [id(m) for m in model.modules()] == before
    assert all(type(layer).__name__ == "DecoderLayer" for layer in model.model.layers)


def test_layer_graphs_belong_to_one_model_and_block_size(model):
    layers = capture.LayerGraphs(model, 4)
    with pytest.raises(ValueError, match="another model"):
        capture.capture_main(random_model(seed=1), 4, layers=layers)
    with pytest.raises(ValueError, match="block_size 4"):
        capture.capture_main(model, 8, layers=layers)
