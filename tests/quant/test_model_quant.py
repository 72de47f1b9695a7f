"""quantize_model on the reference model: module swaps, accuracy per scheme, C8, MTP scheme, budgets."""

import pytest
import torch

from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.quant import PRESETS, MixedPrecisionConfig, QuantConfig, quantize_model, quantized_names
from graphopt.quant.mixed_precision import layer_sizes
from graphopt.quant.qlinear import QuantExperts, QuantLatentNorm, QuantLinear


@pytest.fixture(scope="module")
def setup():
    model = random_model()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 97, (8, 24), generator=g)
    ids = torch.randint(0, 97, (2, 20), generator=g)
    with torch.no_grad():
        ref = model(ids)
    return model, data, ids, ref


# relative logits error bounds on the random model (no outliers: grids and rounding dominate)
BOUNDS = {"w8a8": 0.03, "w8a8_static": 0.05, "w8a16": 0.02, "w4a8": 0.2, "w4a16": 0.15, "fp8": 0.1,
          "fp8_block": 0.1, "c8": 0.03}


@pytest.mark.parametrize("preset", sorted(BOUNDS))
def test_presets_stay_close_to_the_float_model(setup, preset):
    model, data, ids, ref = setup
    q = quantize_model(model, PRESETS[preset].replace(group_size=16), data, progress=False)
    with torch.no_grad():
        out = q(ids)
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < BOUNDS[preset]


def test_swaps_every_targeted_matmul_and_leaves_the_original_alone(setup):
    model, data, ids, ref = setup
    q = quantize_model(model, "w8a8_c8", data, progress=False)
    names = quantized_names(q)
    L = model.config.num_hidden_layers
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == L - 1 + 1    # MoE layers + the MTP layer
    assert sum(isinstance(m, QuantLatentNorm) for m in q.modules()) == L + 1
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "mtp.0.eh_proj" in names
    assert not any("kv_b_proj" in n or n.endswith("mlp.gate") or n == "lm_head" for n in names)
    assert isinstance(q.model.layers[0].self_attn.q_a_proj, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_a_proj, torch.nn.Linear)  # a copy was quantised
    with torch.no_grad():
        assert torch.equal(model(ids), ref)


def test_c8_model_generates_through_the_paged_cache_like_without_it(setup):
    model, data, ids, _ = setup
    q = quantize_model(model, "c8", data, progress=False)
    prompt = ids[0, :6].tolist()
    out = greedy_generate(q, prompt, 6)                  # latent goes int8 -> cache -> read back
    with torch.no_grad():                                # same tokens as the cache-less forward
        seq = prompt + out
        logits = q(torch.tensor([seq[:-1]]))[0, len(prompt) - 1:]
    assert logits.argmax(-1).tolist() == out


def test_mtp_scheme_quantises_the_draft_harder(setup):
    model, data, _, _ = setup
    q = quantize_model(model, QuantConfig("w8a8", mtp_scheme="w4a8", group_size=16), data, progress=False)
    names = quantized_names(q)
    assert names["mtp.0.self_attn.o_proj"] == "w4a8" and names["model.layers.0.self_attn.o_proj"] == "w8a8"


def test_mixed_precision_meets_the_size_budget(setup):
    model, data, _, _ = setup
    cfg = QuantConfig("w8a8", group_size=16, mixed_precision=MixedPrecisionConfig(("w8a8", "w4a8"), 6.5))
    q = quantize_model(model, cfg, data, progress=False)
    chosen = dict(q.quant_config.overrides)
    assert set(chosen.values()) == {"w8a8", "w4a8"}                       # a real mix
    bits = sum(layer_sizes(model, q.quant_config, i, chosen[f"model.layers.{i}.*"])[0] for i in range(3))
    elems = sum(layer_sizes(model, q.quant_config, i, "w8a8")[1] for i in range(3))
    assert bits / elems <= 6.5
    with pytest.raises(ValueError, match="below the smallest reachable"):
        quantize_model(model, cfg.replace(mixed_precision=MixedPrecisionConfig(("w8a8", "w4a8"), 3.0)), data,
                       progress=False)


def test_sparse_expert_dispatch_equals_the_dense_form(setup):
    model, data, _, _ = setup
    q = quantize_model(model, PRESETS["w8a8_static"], data, progress=False)    # per-expert static scales too
    moe = q.model.layers[1].mlp
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    weights, ids = moe.gate(x)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts(x, weights, ids), moe.experts._dense(x, weights, ids),
                                   rtol=1e-5, atol=1e-6)
