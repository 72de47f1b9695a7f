"""fuse_rms_norm: every norm of the captured step fused, exact numerics, eps read from the graph, and
norm-like subgraphs that must stay as they are."""

import torch

from graphopt.models.deepseek import RMSNorm
from graphopt.passes.base import count_ops
from graphopt.passes.fuse_rms_norm import FuseRmsNormPass

RMS = "graphopt.rms_norm.default"


def expected_norms(config) -> int:
    """input + post-attention norm per layer, q_a and kv_a norms inside MLA, and the final norm."""
    per_layer = 2 + (config.q_lora_rank is not None) + 1
    return config.num_hidden_layers * per_layer + 1


def test_fuses_every_norm_of_the_float32_step(main_fp32, run):
    before = count_ops(main_fp32.step.graph_module)
    ran = run(main_fp32, [FuseRmsNormPass()])   # verify mode: outputs and caches compared, exact
    after = count_ops(ran.graph_module)
    n = expected_norms(main_fp32.config)
    assert n == 9 and ran.record("fuse_rms_norm").matches == n
    assert after[RMS] == n and before.get(RMS, 0) == 0
    for op in ("aten.rsqrt.default", "aten.pow.Tensor_Scalar", "aten.mean.dim"):
        assert before[op] == n and after.get(op, 0) == 0
    assert after["aten.mul.Tensor"] == before["aten.mul.Tensor"] - 2 * n
    assert ran.record("fuse_rms_norm").max_error == 0.0
    eps = {node.args[2] for node in ran.graph_module.graph.nodes if node.target is torch.ops.graphopt.rms_norm.default}
    assert eps == {main_fp32.config.rms_norm_eps}


def test_bf16_step_absorbs_both_casts_of_each_norm(main_bf16, run):
    before = count_ops(main_bf16.step.graph_module)
    ran = run(main_bf16, [FuseRmsNormPass()])
    after = count_ops(ran.graph_module)
    n = expected_norms(main_bf16.config)
    assert after[RMS] == n and ran.record("fuse_rms_norm").max_error == 0.0
    assert after["aten._to_copy.default"] == before["aten._to_copy.default"] - 2 * n
    for node in ran.graph_module.graph.nodes:
        if node.target is torch.ops.graphopt.rms_norm.default:
            assert node.meta["val"].dtype == torch.bfloat16 and node.args[0].meta["val"].dtype == torch.bfloat16


class Norm(torch.nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.norm = RMSNorm(16, eps)

    def forward(self, x):
        return self.norm(x) * 2


def test_reads_any_epsilon(small, run):
    ran = run(small(Norm(3e-5), (torch.randn(4, 16),)), [FuseRmsNormPass()])
    (node,) = [n for n in ran.graph_module.graph.nodes if n.target is torch.ops.graphopt.rms_norm.default]
    assert node.args[2] == 3e-5 and ran.record("fuse_rms_norm").max_error == 0.0


class NotQuiteNorms(torch.nn.Module):
    """Norm-shaped subgraphs with a different meaning: none may become graphopt.rms_norm."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16))
        self.w2d = torch.nn.Parameter(torch.randn(1, 16))

    def forward(self, x):
        mean_other_dim = self.w * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6))
        eps_outside = self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) + 1e-6)
        no_weight = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        weight_2d = self.w2d * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return mean_other_dim + eps_outside + no_weight + weight_2d


def test_does_not_fuse_norm_lookalikes(small, run):
    captured = small(NotQuiteNorms(), (torch.randn(4, 16),))
    ran = run(captured, [FuseRmsNormPass()])
    assert ran.record("fuse_rms_norm").matches == 0 and not ran.record("fuse_rms_norm").modified
    assert count_ops(ran.graph_module) == count_ops(captured.step.graph_module)
