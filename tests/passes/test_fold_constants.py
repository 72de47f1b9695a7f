"""fold_constants: weight-only subgraphs computed once; views of weights, anything touching an input,
random ops and constants over the size limit left in the graph."""

import torch

from graphopt.passes.base import count_ops
from graphopt.passes.fold_constants import FoldConstantsPass


def moe_layers(config) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def test_bf16_step_folds_the_float32_casts_of_weights(main_bf16, run):
    c = main_bf16.config
    before = count_ops(main_bf16.step.graph_module)
    ran = run(main_bf16, [FoldConstantsPass()])      # verify: exact
    rec = ran.record("fold_constants")
    # rotary inv_freq.float() once; per MoE layer the router's weight.float() and bias.float()
    n = 1 + 2 * moe_layers(c)
    assert rec.matches == n and rec.max_error == 0.0
    assert count_ops(ran.graph_module)["aten._to_copy.default"] == before["aten._to_copy.default"] - n
    nbytes = 4 * (c.qk_rope_head_dim // 2 + moe_layers(c) * (c.n_routed_experts * c.hidden_size + c.n_routed_experts))
    assert rec.notes[0] == f"folded {n} node(s) into {n} new constant(s), {nbytes} bytes"
    gm = ran.graph_module
    folded = [node for node in gm.graph.nodes if node.op == "get_attr" and node.target.endswith("_folded")]
    assert len(folded) == n
    for node in folded:
        value = getattr(gm, node.target)
        assert value.dtype == torch.float32 and node.meta["val"].shape == value.shape
    assert not any(node.target is torch.ops.aten._to_copy.default and node.args[0].op == "get_attr"
                   for node in gm.graph.nodes)


def test_float32_step_has_nothing_worth_folding(main_fp32, run):
    ran = run(main_fp32, [FoldConstantsPass()])
    # the only weight-only ops are the experts' weight transposes: views, free at run time
    assert ran.record("fold_constants").matches == 0
    assert count_ops(ran.graph_module) == count_ops(main_fp32.step.graph_module)


class Consts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 16, generator=g))
        self.v = torch.nn.Parameter(torch.randn(16, generator=g))
        self.big = torch.nn.Parameter(torch.randn(64, 16, generator=g))

    def forward(self, x):
        scaled = x @ (self.w.t() * 2)                 # t + mul: folded into one [16, 8] constant
        viewed = x @ self.w.t()                       # a view of a weight: free, left alone
        total = x + self.w.sum(0) + self.v.clone()    # sum folded; the clone equals v: v itself is reused
        touched = (x * self.w[0]).sum()               # depends on the input: stays
        big = x @ (self.big.t() + 1)                  # 4 KiB: over the limit the test sets
        return scaled.sum(-1) + viewed.sum(-1) + total.sum(-1) + touched + big.sum(-1)


def test_folds_weight_subgraphs_and_respects_the_size_limit(small, run):
    captured = small(Consts(), (torch.randn(3, 16),))
    before = count_ops(captured.step.graph_module)
    ran = run(captured, [FoldConstantsPass()], options={"fold_max_bytes": 1024})
    after = count_ops(ran.graph_module)
    rec = ran.record("fold_constants")
    assert rec.max_error == 0.0
    # folded: t+mul (2 ops), sum (1), clone (1, reusing w)
    assert rec.matches == 4
    assert before["aten.mul.Tensor"] - after["aten.mul.Tensor"] == 1
    assert before["aten.sum.dim_IntList"] - after["aten.sum.dim_IntList"] == 1
    assert "aten.clone.default" not in after
    assert after["aten.t.default"] == 2           # w.t() for `viewed`, big.t() (skipped, over the limit)
    assert rec.notes[0] == f"folded 4 node(s) into 2 new constant(s), {16 * 8 * 4 + 16 * 4} bytes"
    assert rec.notes[1].startswith("skipped add") and "4096 bytes > fold_max_bytes 1024" in rec.notes[1]


class Random(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        return x + torch.rand_like(self.w)


def test_never_folds_random_ops(small, run):
    captured = small(Random(), (torch.randn(3, 16),))
    ran = run(captured, [FoldConstantsPass()], verify=False)   # random: two runs differ anyway
    assert ran.record("fold_constants").matches == 0
    assert count_ops(ran.graph_module) == count_ops(captured.step.graph_module)
