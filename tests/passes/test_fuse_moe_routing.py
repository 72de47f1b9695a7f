"""fuse_moe_routing: the router of every MoE layer fused exactly, in each routing configuration, with
sizes and constants read from the graph; linear + softmax + top-k that is not a router left alone."""

import pytest
import torch
import torch.nn.functional as F

from graphopt.models.deepseek import TopkRouter
from graphopt.models.random import random_config
from graphopt.passes.base import count_ops
from graphopt.passes.fuse_moe_routing import ALL_VARIANTS, FuseMoeRoutingPass, RouterVariant

ROUTE = "graphopt.moe_route.default"


def n_moe_layers(config) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def route_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.graphopt.moe_route.default]


def test_fuses_the_router_of_every_moe_layer(main_fp32, run):
    before = count_ops(main_fp32.step.graph_module)
    ran = run(main_fp32, [FuseMoeRoutingPass()])
    after = count_ops(ran.graph_module)
    c = main_fp32.config
    assert ran.record("fuse_moe_routing").matches == n_moe_layers(c) == 1 and after[ROUTE] == 1
    # the router's 3 top-k (experts per group, best groups, experts) and its mask/gather ops are gone
    for op in ("aten.topk.default", "aten.sigmoid.default", "aten.gather.default", "aten.scatter.value",
               "aten.zeros_like.default"):
        assert before[op] > 0 and after.get(op, 0) == 0, op
    assert after["aten.linear.default"] == before["aten.linear.default"] - 1
    assert ran.record("fuse_moe_routing").max_error == 0.0
    (node,) = route_nodes(ran.graph_module)
    assert node.args[3:] == (c.num_experts_per_tok, c.n_group, c.topk_group, "noaux_tc", "sigmoid",
                             c.norm_topk_prob, c.routed_scaling_factor)
    assert node.args[2].op == "get_attr" and node.args[2].target.endswith("e_score_correction_bias")


def test_bf16_step_takes_the_casts_into_the_op(main_bf16, run):
    before = count_ops(main_bf16.step.graph_module)
    ran = run(main_bf16, [FuseMoeRoutingPass()])
    (node,) = route_nodes(ran.graph_module)
    # x, gate weight and bias are read in bf16; the op casts them to float32 as the router did
    assert [a.meta["val"].dtype for a in node.args[:3]] == [torch.bfloat16] * 3
    assert count_ops(ran.graph_module)["aten._to_copy.default"] == before["aten._to_copy.default"] - 3
    assert ran.record("fuse_moe_routing").max_error == 0.0


class Router(torch.nn.Module):
    def __init__(self, **overrides):
        super().__init__()
        self.config = random_config(**overrides)
        self.router = TopkRouter(self.config)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=g))
            if self.router.e_score_correction_bias is not None:
                self.router.e_score_correction_bias.copy_(torch.randn(self.config.n_routed_experts, generator=g) * .1)

    def forward(self, x):
        weights, ids = self.router(x)
        return weights * 2, ids + 1


CONFIGS = {
    "v2_group_limited_softmax": dict(topk_method="group_limited_greedy", scoring_func="softmax", n_group=2,
                                     topk_group=1, num_experts_per_tok=3, norm_topk_prob=False,
                                     routed_scaling_factor=1.0, n_routed_experts=12),
    "greedy_softmax": dict(topk_method="greedy", scoring_func="softmax", num_experts_per_tok=3),
    "noaux_one_group": dict(n_group=1, topk_group=1, routed_scaling_factor=1.5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_routing_configuration(name, small, run):
    module = Router(**CONFIGS[name])
    ran = run(small(module, (torch.randn(6, 64),), config=module.config), [FuseMoeRoutingPass()])
    (node,) = route_nodes(ran.graph_module)
    c = module.config
    assert node.args[3] == c.num_experts_per_tok and node.args[9] == c.routed_scaling_factor
    assert node.args[7] == c.scoring_func and node.args[8] == c.norm_topk_prob
    assert node.args[6] == RouterVariant.of_config(c).topk_method
    assert "aten.topk.default" not in count_ops(ran.graph_module)
    assert ran.record("fuse_moe_routing").max_error == 0.0


def test_without_a_config_every_variant_is_tried(small, run):
    module = Router(**CONFIGS["v2_group_limited_softmax"])
    ran = run(small(module, (torch.randn(6, 64),)), [FuseMoeRoutingPass()], with_config=False)
    (node,) = route_nodes(ran.graph_module)
    assert node.args[4:7] == (2, 1, "group_limited_greedy")   # n_group, topk_group read from the graph
    assert len(ALL_VARIANTS) == 12


class NotRouters(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 64))

    def forward(self, x):
        probs = F.linear(x, self.w).softmax(dim=-1)
        top_values = probs.topk(2, dim=-1).values                    # no gather of the chosen scores
        ids = probs.topk(2, dim=-1).indices
        other_scores = probs.flip(-1).gather(1, ids)                 # gathers from a different tensor
        return top_values, other_scores


def test_does_not_fuse_linear_softmax_topk_that_is_not_a_router(small, run):
    captured = small(NotRouters(), (torch.randn(6, 64),))
    ran = run(captured, [FuseMoeRoutingPass()], with_config=False)
    assert ran.record("fuse_moe_routing").matches == 0
    assert count_ops(ran.graph_module) == count_ops(captured.step.graph_module)


def test_a_model_without_routed_experts_is_left_alone(main_fp32, run):
    class Dense:
        n_routed_experts = None
    captured = type(main_fp32)(main_fp32.model, main_fp32.step, model_config=Dense())
    ran = run(captured, [FuseMoeRoutingPass()])
    assert not ran.record("fuse_moe_routing").modified and ran.record("fuse_moe_routing").notes
