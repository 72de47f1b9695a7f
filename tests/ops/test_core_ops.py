"""graphopt core ops: reference numerics against the model's modules, fake impls under dynamic shapes,
and clear errors on bad input."""

import pytest
import torch
from torch.export import Dim

from graphopt.models.deepseek import MLP, Experts, RMSNorm, TopkRouter
from graphopt.models.random import random_config
from graphopt.ops import core  # noqa: F401  registers torch.ops.graphopt.*

ops = torch.ops.graphopt


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- rms_norm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_equals_model_module(dtype, eps):
    norm = RMSNorm(48, eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen(1)))
    x = (torch.randn(2, 5, 48, generator=gen(2)) * 3).to(dtype)
    got = ops.rms_norm(x, norm.weight, eps)
    assert got.dtype == dtype
    torch.testing.assert_close(got, norm(x), rtol=0, atol=0)   # same ops in the same order


def test_rms_norm_rejects_weight_of_wrong_size():
    with pytest.raises(ValueError, match=r"weight must have shape \[hidden\] = \[8\].*got \(7,\)"):
        ops.rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)


# -- swiglu -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_inside_the_model_mlp(dtype):
    mlp = MLP(32, 48).to(dtype)
    x = torch.randn(4, 32, generator=gen(3)).to(dtype)
    with torch.no_grad():
        got = mlp.down_proj(ops.swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
        torch.testing.assert_close(got, mlp(x), rtol=0, atol=0)


def test_swiglu_rejects_mismatched_operands():
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        ops.swiglu(torch.randn(4, 8), torch.randn(4, 1))
    with pytest.raises(ValueError, match="same dtype"):
        ops.swiglu(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64))


# -- moe_route --------------------------------------------------------------------------------------

ROUTER_CONFIGS = {
    "v3_noaux_tc": dict(),
    "v3_norm_off": dict(norm_topk_prob=False, routed_scaling_factor=1.0),
    "v2_group_limited_softmax": dict(topk_method="group_limited_greedy", scoring_func="softmax", n_group=2,
                                     topk_group=1, num_experts_per_tok=3),
    "greedy_softmax": dict(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1),
    "noaux_one_group": dict(n_group=1, topk_group=1, num_experts_per_tok=3),
}


def make_router(**overrides):
    config = random_config(**overrides)
    router = TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen(4)))
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, generator=gen(5)) * 0.1)
    return router


def route_with_op(router, x):
    c = router.config
    grouped = c.topk_method != "greedy" and (c.n_group or 1) > 1
    return ops.moe_route(x, router.weight, router.e_score_correction_bias, c.num_experts_per_tok,
                         c.n_group if grouped else 1, c.topk_group if grouped else 1, c.topk_method,
                         c.scoring_func, c.norm_topk_prob, c.routed_scaling_factor)


@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_moe_route_equals_model_router(name):
    router = make_router(**ROUTER_CONFIGS[name])
    x = torch.randn(11, router.config.hidden_size, generator=gen(6))
    with torch.no_grad():
        weights, ids = route_with_op(router, x)
        ref_weights, ref_ids = router(x)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (11, router.config.num_experts_per_tok)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0)


def test_moe_route_casts_a_bf16_input_like_the_model():
    router = make_router().to(torch.bfloat16)
    x = torch.randn(5, router.config.hidden_size, generator=gen(7)).to(torch.bfloat16)
    with torch.no_grad():
        weights, ids = route_with_op(router, x)
        ref_weights, ref_ids = router(x)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)


def test_moe_route_rejects_bad_arguments():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"topk_method 'best' is not supported; accepted: \('noaux_tc'"):
        ops.moe_route(x, w, None, 2, 1, 1, "best", "sigmoid", True, 1.0)
    with pytest.raises(ValueError, match=r"n_group must be >= 1 and divide n_experts \(8\), got 3"):
        ops.moe_route(x, w, None, 2, 3, 1, "noaux_tc", "sigmoid", True, 1.0)
    with pytest.raises(ValueError, match=r"gate_weight must be \[n_experts, hidden=16\]"):
        ops.moe_route(x, torch.randn(8, 15), None, 2, 1, 1, "greedy", "sigmoid", True, 1.0)


# -- moe_experts ------------------------------------------------------------------------------------

def make_experts(e=6, h=24, i=10, dtype=torch.float32):
    experts = Experts(random_config(n_routed_experts=e, hidden_size=h, moe_intermediate_size=i,
                                    num_experts_per_tok=3, n_group=2, topk_group=2)).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen(8)) * 0.2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen(9)) * 0.2)
    return experts


def random_routing(n, e, k, seed=10, popular=None):
    """Distinct experts per token (as top-k gives); `popular` is every token's first choice."""
    g = gen(seed)
    rows = []
    for _ in range(n):
        perm = torch.randperm(e, generator=g)
        if popular is not None:
            perm = torch.cat([torch.tensor([popular]), perm[perm != popular]])
        rows.append(perm[:k])
    return torch.rand(n, k, generator=g), torch.stack(rows)


# Both forms accumulate the weighted expert outputs in float32 (the model's `y.float()`), so even a
# float64 model agrees only to float32 rounding.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_moe_experts_sparse_equals_dense_dispatch(dtype):
    experts = make_experts(dtype=dtype)
    x = torch.randn(9, 24, generator=gen(11)).to(dtype)
    weights, ids = random_routing(9, 6, 3, popular=2)
    with torch.no_grad():
        got = ops.moe_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        ref = experts(x, weights, ids)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_moe_experts_with_unused_experts_and_one_token():
    experts = make_experts()
    x = torch.randn(1, 24, generator=gen(12))
    weights, ids = torch.tensor([[0.7, 0.3]]), torch.tensor([[5, 0]])
    with torch.no_grad():
        got = ops.moe_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        torch.testing.assert_close(got, experts(x, weights, ids), rtol=1e-5, atol=1e-6)


def test_moe_expert_terms_sum_to_moe_experts_one_term_per_assignment():
    experts = make_experts()
    x = torch.randn(9, 24, generator=gen(13))
    weights, ids = random_routing(9, 6, 3, popular=2)
    weights[4, 1] = 0.0                                            # a pruned assignment: its term is 0
    with torch.no_grad():
        terms = ops.moe_expert_terms(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        summed = ops.moe_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj)
        alone = ops.moe_experts(x[4:5, None].expand(1, 1, 24)[0], weights[4:5, :1], ids[4:5, :1],
                                experts.gate_up_proj, experts.down_proj)
    assert terms.shape == (9, 3, 24) and terms.dtype == torch.float32
    assert torch.equal(terms[4, 1], torch.zeros(24))
    torch.testing.assert_close(terms[4, 0], alone[0], rtol=1e-6, atol=1e-7)   # term = that expert alone
    torch.testing.assert_close(terms.sum(1), summed, rtol=1e-5, atol=1e-6)


def test_moe_experts_rejects_mismatched_weights():
    experts = make_experts()
    x = torch.randn(4, 24)
    weights, ids = random_routing(4, 6, 2)
    with pytest.raises(ValueError, match=r"gate_up must be \[E, 2I, 24\] and down \[E, 24, I\]"):
        ops.moe_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj[:, :, :-1])
    with pytest.raises(ValueError, match=r"weights and ids must both be \[tokens=4, top_k\]"):
        ops.moe_experts(x, weights[:3], ids, experts.gate_up_proj, experts.down_proj)


# -- fake implementations under torch.export with a dynamic token dimension --------------------------

class AllOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.Parameter(torch.randn(24, generator=gen(13)))
        self.gate = torch.nn.Parameter(torch.randn(6, 24, generator=gen(14)))
        self.bias = torch.nn.Parameter(torch.randn(6, generator=gen(15)) * 0.1)
        e = make_experts()
        self.gate_up, self.down = e.gate_up_proj, e.down_proj

    def forward(self, x):
        h = ops.rms_norm(x, self.norm, 1e-6)                                     # [N, 24]
        weights, ids = ops.moe_route(h, self.gate, self.bias, 2, 2, 1, "noaux_tc", "sigmoid", True, 2.5)
        gu = h @ self.gate_up[0].t()                                             # [N, 20]
        act = ops.swiglu(gu[:, :10], gu[:, 10:])                                 # [N, 10]
        return ops.moe_experts(h, weights, ids, self.gate_up, self.down), act, weights, ids


def test_fake_impls_keep_the_token_dimension_symbolic():
    module = AllOps()
    x = torch.randn(5, 24, generator=gen(16))
    ep = torch.export.export(module, (x,), dynamic_shapes=({0: Dim("tokens")},))
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "x")
    tokens = placeholder.meta["val"].shape[0]
    assert isinstance(tokens, torch.SymInt)
    for node in ep.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "graphopt":
            vals = node.meta["val"] if isinstance(node.meta["val"], tuple) else (node.meta["val"],)
            for v in vals:
                assert v.shape[0] is tokens or str(v.shape[0]) == str(tokens), (node.target, v.shape)
    out, act, weights, ids = ep.graph.find_nodes(op="output")[0].args[0]
    assert tuple(act.meta["val"].shape[1:]) == (10,) and weights.meta["val"].dtype == torch.float32
    assert ids.meta["val"].dtype == torch.int64 and out.meta["val"].dtype == torch.float32
    # the exported program runs at another token count and agrees with eager
    x7 = torch.randn(7, 24, generator=gen(17))
    with torch.no_grad():
        for got, ref in zip(ep.module()(x7), module(x7)):
            torch.testing.assert_close(got, ref)
