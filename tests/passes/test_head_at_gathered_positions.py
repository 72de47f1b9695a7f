"""head_at_gathered_positions: a head whose logits are gathered at one position per row projects only
that position (gather moved before linear and rms_norm); the compiled model decodes the same tokens,
and heads read at several positions, or by another node too, stay as they were."""

import pytest
import torch
from torch import nn

import graphopt
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.ops import core as _core  # noqa: F401  registers graphopt::rms_norm
from graphopt.passes.base import PassContext, count_ops
from graphopt.passes.head_at_gathered_positions import HeadAtGatheredPositionsPass

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [3, 1, 4, 1, 5]]


def _head_shapes(gm):
    """Output shapes of the LM heads (the linears over a weight named ...head...)."""
    return [tuple(n.meta["val"].shape) for n in gm.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.linear.default and "head" in n.args[1].name]


@pytest.fixture(scope="module")
def compiled():
    model = random_model(0, vocab_size=64, num_hidden_layers=1)
    return graphopt.compile(model, spec="mtp", block_size=4, progress=False, backend="eager"), model


def test_the_prefill_heads_project_one_position_per_row(compiled):
    moved, _ = compiled
    heads = _head_shapes(moved.graphs["prefill"])
    assert len(heads) == 2 and all(s[1] == 1 for s in heads), heads   # main's head and the MTP draft's head
    assert "2 LM head(s)" in moved.report.notes["prefill/head_at_gathered_positions"]


def test_the_compiled_model_decodes_the_same_tokens_as_greedy_decoding(compiled):
    moved, model = compiled
    assert moved.generate(PROMPTS, 12, ignore_eos=True) == [greedy_generate(model, p, 12) for p in PROMPTS]


class _Head(nn.Module):
    def __init__(self, positions: int = 1, second_reader: bool = False):
        super().__init__()
        self.norm, self.head = nn.Parameter(torch.rand(16) + 0.5), nn.Linear(16, 40, bias=False)
        self.positions, self.second_reader = positions, second_reader

    def forward(self, h, at):
        logits = self.head(torch.ops.graphopt.rms_norm(h, self.norm, 1e-6))
        index = at[:, None, None].expand(-1, self.positions, 1) if self.positions > 1 else at[:, None, None]
        picked = logits.gather(1, index.expand(-1, self.positions, logits.shape[-1]))
        return (picked, logits.sum()) if self.second_reader else (picked,)


def test_a_gathered_head_is_rewritten_and_computes_the_same_values():
    module = _Head()
    h, at = torch.randn(3, 7, 16), torch.tensor([6, 2, 4])
    ep = torch.export.export(module, (h, at))
    want = module(h, at)[0]
    result = HeadAtGatheredPositionsPass().run(ep.graph_module, PassContext())
    assert result.matches == 1
    ops = count_ops(ep.graph_module)
    assert ops["aten.gather.default"] == 1 and _head_shapes(ep.graph_module) == [(3, 1, 40)]
    torch.testing.assert_close(ep.module()(h, at)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [_Head(positions=2), _Head(second_reader=True)], ids=["two_positions", "read_twice"])
def test_heads_read_at_several_positions_or_by_another_node_are_kept(module):
    ep = torch.export.export(module, (torch.randn(3, 7, 16), torch.tensor([6, 2, 4])))
    result = HeadAtGatheredPositionsPass().run(ep.graph_module, PassContext())
    assert result.matches == 0 and not result.modified
    assert _head_shapes(ep.graph_module) == [(3, 7, 40)]
