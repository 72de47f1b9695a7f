"""fuse_moe_experts: the dense expert dispatch of every MoE layer becomes the sparse op, before or after
the other fusions; numerics within float summation order; dispatch lookalikes left alone."""

import torch
import torch.nn.functional as F

from graphopt.models.deepseek import Experts
from graphopt.models.random import random_config
from graphopt.passes.base import count_ops
from graphopt.passes.eliminate_dead_code import EliminateDeadCodePass
from graphopt.passes.fold_constants import FoldConstantsPass
from graphopt.passes.fuse_moe_experts import FuseMoeExpertsPass
from graphopt.passes.fuse_moe_routing import FuseMoeRoutingPass
from graphopt.passes.fuse_rms_norm import FuseRmsNormPass
from graphopt.passes.fuse_swiglu import FuseSwigluPass
from graphopt.passes.invariants import check_invariants
from graphopt.passes.remove_noop_views import RemoveNoopViewsPass

EXPERTS = "graphopt.moe_experts.default"
DENSE_OPS = ("aten.zeros.default", "aten.scatter.src", "aten.matmul.default", "aten.split.Tensor",
             "aten.transpose.int")


def expert_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.graphopt.moe_experts.default]


def test_replaces_the_dense_dispatch(main_fp32, run):
    before = count_ops(main_fp32.step.graph_module)
    ran = run(main_fp32, [FuseMoeExpertsPass()])     # verify: within the pass's rtol/atol
    after = count_ops(ran.graph_module)
    assert ran.record("fuse_moe_experts").matches == 1 and after[EXPERTS] == 1
    for op in DENSE_OPS:
        assert before[op] > 0 and after.get(op, 0) == 0, op
    # the routed experts' einsum goes, attention's einsums stay
    assert after["aten.einsum.default"] == before["aten.einsum.default"] - 1
    (node,) = expert_nodes(ran.graph_module)
    gate_up, down = node.args[3], node.args[4]
    assert gate_up.target.endswith("experts.gate_up_proj") and down.target.endswith("experts.down_proj")
    assert ran.record("fuse_moe_experts").max_error < 1e-5


def test_the_whole_normalise_list_in_pipeline_order(main_fp32, run, outputs):
    passes = [RemoveNoopViewsPass(), FoldConstantsPass(), FuseRmsNormPass(), FuseSwigluPass(),
              FuseMoeRoutingPass(), FuseMoeExpertsPass(), EliminateDeadCodePass()]
    ran = run(main_fp32, passes, verify=False)   # each pass is verified in its own tests; here end to end
    before, after_values = outputs(main_fp32.step.graph_module, ran.graph_module, main_fp32.step.make_inputs)
    for a, b in zip(before, after_values):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    after = count_ops(ran.graph_module)
    # the experts pattern matched with graphopt.swiglu inside it (fuse_swiglu ran first)
    assert ran.record("fuse_moe_experts").matches == 1 and after[EXPERTS] == 1
    assert after["graphopt.swiglu.default"] == 2   # dense MLP + shared expert; the routed one was absorbed
    (node,) = expert_nodes(ran.graph_module)
    assert node.args[1].args[0].target is torch.ops.graphopt.moe_route.default   # weights = moe_route[0]
    check_invariants(ran.graph_module, "after the normalise passes")


def test_bf16_step(main_bf16, run, outputs):
    ran = run(main_bf16, [FuseMoeExpertsPass()], verify=False)
    assert count_ops(ran.graph_module)[EXPERTS] == 1
    assert count_ops(ran.graph_module).get("aten.matmul.default", 0) == 0
    before, after = outputs(main_bf16.step.graph_module, ran.graph_module, main_bf16.step.make_inputs)
    for a, b in zip(before, after):   # bf16: at most a rounding step of difference
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


class Dispatch(torch.nn.Module):
    """The model's Experts with a top-3 router stand-in, plus dispatch lookalikes that must stay."""

    def __init__(self):
        super().__init__()
        config = random_config(n_routed_experts=6, num_experts_per_tok=3, n_group=2, topk_group=2,
                               moe_intermediate_size=10, hidden_size=24)
        self.experts = Experts(config)
        self.gate = torch.nn.Parameter(torch.randn(6, 24))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.experts.gate_up_proj.copy_(torch.randn(self.experts.gate_up_proj.shape, generator=g) * .2)
            self.experts.down_proj.copy_(torch.randn(self.experts.down_proj.shape, generator=g) * .2)

    def route(self, x):
        scores = F.linear(x, self.gate).softmax(-1)
        ids = scores.topk(3, dim=-1).indices
        return scores.gather(1, ids), ids

    def forward(self, x):
        return self.experts(x, *self.route(x))


class NotDispatch(Dispatch):
    def forward(self, x):
        weights, ids = self.route(x)
        gu, down = self.experts.gate_up_proj, self.experts.down_proj
        routing = torch.ones(x.shape[0], 6).scatter(1, ids, weights)           # not zeros: every expert counts
        gate, up = torch.matmul(x, gu.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.matmul(F.silu(gate) * up, down.transpose(1, 2))
        swapped = torch.einsum("enh,ne->nh", y.float(), routing)
        gate2, up2 = torch.matmul(x, gu.transpose(1, 2)).chunk(2, dim=-1)
        y2 = torch.matmul(F.silu(up2) * gate2, down.transpose(1, 2))            # gate and up halves swapped
        routing2 = torch.zeros(x.shape[0], 6).scatter(1, ids, weights)
        return swapped + torch.einsum("enh,ne->nh", y2.float(), routing2)


def test_top3_dispatch_in_a_small_graph(small, run):
    ran = run(small(Dispatch(), (torch.randn(7, 24),)), [FuseMoeExpertsPass()])
    assert ran.record("fuse_moe_experts").matches == 1
    assert ran.record("fuse_moe_experts").max_error < 1e-5


def test_does_not_fuse_dispatch_lookalikes(small, run):
    captured = small(NotDispatch(), (torch.randn(7, 24),))
    ran = run(captured, [FuseMoeExpertsPass()])
    assert ran.record("fuse_moe_experts").matches == 0
    assert count_ops(ran.graph_module) == count_ops(captured.step.graph_module)
