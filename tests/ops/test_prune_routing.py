"""Expert pruning in graphopt::moe_route (prune_threshold) and its consumers: the rule on exact
values, the op equal to route + prune_routing, moe_experts skipping pruned assignments with the
dense dispatch's result, the CUDA kernel's wrapper honouring the threshold, and bad thresholds."""

import pytest
import torch

from graphopt.backends.inductor.kernels import moe_route as moe_route_kernel
from graphopt.models.deepseek import Experts
from graphopt.models.random import random_config
from graphopt.ops import core

ROUTE = torch.ops.graphopt.moe_route


def test_rule_on_exact_values():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05],      # shares as given (they sum to 1)
                      [2.0, 1.0, 1.0, 0.0],        # total 4: shares 0.5, 0.25, 0.25, 0
                      [0.1, 0.1, 0.1, 0.1]])       # all below 0.3: the top expert alone is kept
    got = core.prune_routing(w, 0.3)
    expected = torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0],
                             [4.0, 0.0, 0.0, 0.0],
                             [0.4, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(-1), w.sum(-1))                  # the total is kept
    assert torch.equal(core.prune_routing(w, 0.0), w)                   # 0: nothing dropped
    assert ((core.prune_routing(w, 1.0) != 0).sum(-1) == 1).all()       # 1: the top expert only


def _router_args(seed=0, n=32, e=16, h=24):
    g = torch.Generator().manual_seed(seed)
    x, gate = torch.randn(n, h, generator=g), torch.randn(e, h, generator=g)
    bias = torch.randn(e, generator=g) * 0.1
    return (x, gate, bias, 6, 4, 2, "noaux_tc", "sigmoid", True, 2.5)


@pytest.mark.parametrize("threshold", [0.05, 0.15, 0.3])
def test_op_is_route_then_prune(threshold):
    args = _router_args()
    full_w, full_ids = ROUTE(*args)
    w, ids = ROUTE(*args, threshold)
    assert torch.equal(ids, full_ids)                                   # ids never change
    assert torch.equal(w, core.prune_routing(full_w, threshold))
    dropped = (w == 0).sum()
    assert 0 < dropped and ((w != 0).sum(-1) >= 1).all()               # some dropped, every token keeps one
    assert torch.equal(ROUTE(*args, 0.0)[0], full_w)


def test_moe_experts_skips_pruned_assignments_and_equals_the_dense_dispatch():
    cfg = random_config()
    experts = Experts(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    n, e, k = 40, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(n, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    w = core.prune_routing(torch.rand(n, k, generator=g), 0.3)
    assert (w == 0).any()
    sparse = core.moe_experts(x, w, ids, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(sparse, experts(x, w, ids), rtol=1e-5, atol=1e-5)
    # a pruned expert's weights are not read: poisoning an expert no token keeps changes nothing
    unused = sorted(set(range(e)) - set(ids[w != 0].tolist()))
    if unused:
        gu = experts.gate_up_proj.detach().clone()
        gu[unused] = float("nan")
        assert torch.equal(core.moe_experts(x, w, ids, gu, experts.down_proj), sparse)


def test_cuda_kernel_wrapper_honours_the_threshold():
    # on the CPU the wrapper takes the reference route (no Triton device); the pruning is applied on
    # every path after the routing, so this checks the rule the CUDA path runs too
    args = _router_args(seed=3)
    w, ids = moe_route_kernel.moe_route_cuda(*args, 0.2)
    ref_w, ref_ids = ROUTE(*args, 0.2)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w) and (w == 0).any()


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_threshold_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="prune_threshold must be in \\[0, 1\\]"):
        ROUTE(*_router_args(), bad)
