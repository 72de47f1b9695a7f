"""fuse_swiglu: the gated activations of the captured step (dense MLP, shared expert, stacked routed
experts) fused exactly; silu products that are not a SwiGLU left alone."""

import torch
import torch.nn.functional as F

from graphopt.passes.base import count_ops
from graphopt.passes.fuse_swiglu import FuseSwigluPass

SWIGLU = "graphopt.swiglu.default"


def expected_swiglus(config) -> int:
    """One per dense MLP; two per MoE layer (the shared expert and the stacked routed experts)."""
    moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return (config.num_hidden_layers - moe) + moe * (1 + (1 if config.n_shared_experts else 0))


def test_fuses_every_gated_activation_of_the_step(main_fp32, run):
    before = count_ops(main_fp32.step.graph_module)
    ran = run(main_fp32, [FuseSwigluPass()])
    after = count_ops(ran.graph_module)
    n = expected_swiglus(main_fp32.config)
    assert n == 3 and ran.record("fuse_swiglu").matches == n and after[SWIGLU] == n
    assert before["aten.silu.default"] == n and after.get("aten.silu.default", 0) == 0
    assert after["aten.mul.Tensor"] == before["aten.mul.Tensor"] - n
    assert ran.record("fuse_swiglu").max_error == 0.0
    shapes = sorted(len(n.meta["val"].shape) for n in ran.graph_module.graph.nodes
                    if n.target is torch.ops.graphopt.swiglu.default)
    assert shapes == [3, 3, 3]   # [B, T, I] for the MLPs, [E, N, I] for the routed experts


def test_bf16_step(main_bf16, run):
    ran = run(main_bf16, [FuseSwigluPass()])
    assert count_ops(ran.graph_module)[SWIGLU] == expected_swiglus(main_bf16.config)
    assert ran.record("fuse_swiglu").max_error == 0.0


class Products(torch.nn.Module):
    def forward(self, a, b):
        return b * F.silu(a) + F.silu(b) * a     # both operand orders


def test_either_operand_order(small, run):
    ran = run(small(Products(), (torch.randn(4, 8), torch.randn(4, 8))), [FuseSwigluPass()])
    assert ran.record("fuse_swiglu").matches == 2 and count_ops(ran.graph_module)[SWIGLU] == 2
    assert "aten.silu.default" not in count_ops(ran.graph_module)


class NotSwiglu(torch.nn.Module):
    def forward(self, a, b):
        not_multiplied = F.silu(a) + b
        s = F.silu(b)
        silu_used_twice = s * a + s                       # fusing would compute silu(b) twice
        broadcast = F.silu(a) * b[:, :1]                  # [N, 8] * [N, 1]: not an elementwise gate
        return not_multiplied + silu_used_twice + broadcast


def test_does_not_fuse_other_silu_uses(small, run):
    captured = small(NotSwiglu(), (torch.randn(4, 8), torch.randn(4, 8)))
    ran = run(captured, [FuseSwigluPass()])
    assert ran.record("fuse_swiglu").matches == 0
    assert count_ops(ran.graph_module) == count_ops(captured.step.graph_module)
