"""quantize_model on the reference model: module swaps, accuracy per scheme, C8, MTP scheme, budgets."""

import pytest
import torch

from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.quant import (PRESETS, CalibrationConfig, MixedPrecisionConfig, QuantConfig, quantize_model,
                            quantized_names)
from graphopt.quant.mixed_precision import layer_sizes, mixed_precision_units
from graphopt.quant.qlinear import QuantExperts, QuantLatentNorm, QuantLinear
from graphopt.quant.schemes import SCHEMES, QuantError, weight_bits_per_element


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


def test_mixed_precision_per_linear_meets_the_budget_with_one_override_per_linear(setup):
    model, data, _, _ = setup
    cfg = QuantConfig("w8a8", group_size=16, mixed_precision=MixedPrecisionConfig(("w8a8", "w4a8"), 6.0, unit="linear"))
    units = mixed_precision_units(model, cfg, "linear")
    assert len(units) > 3 * 3 and all(len(ws) == 1 and not u.endswith("*") for u, ws in units.items())
    q = quantize_model(model, cfg, data, progress=False)
    chosen = dict(q.quant_config.overrides)
    assert set(chosen) == set(units) and set(chosen.values()) == {"w8a8", "w4a8"}
    names = quantized_names(q)
    assert all(names[u] == s for u, s in chosen.items())                  # each linear got its own scheme
    bits = sum(weight_bits_per_element(SCHEMES[chosen[u]], w.shape[-1], 16) * w.numel() for u, (w,) in units.items())
    assert bits / sum(w.numel() for (w,) in units.values()) <= 6.0
    mixed_layers = [i for i in range(3) if len({s for u, s in chosen.items() if u.startswith(f"model.layers.{i}.")}) > 1]
    assert mixed_layers                                                   # finer than one scheme per layer
    with pytest.raises(ValueError, match="unit 'expert' is not supported; accepted"):
        MixedPrecisionConfig(unit="expert")


def test_sparse_expert_dispatch_equals_the_dense_form(setup):
    model, data, _, _ = setup
    q = quantize_model(model, PRESETS["w8a8_static"], data, progress=False)    # per-expert static scales too
    moe = q.model.layers[1].mlp
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    weights, ids = moe.gate(x)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts(x, weights, ids), moe.experts._dense(x, weights, ids),
                                   rtol=1e-5, atol=1e-6)


def test_the_calibration_report_says_which_data_and_which_experts_fell_back(setup):
    model, data, _, _ = setup
    cfg = PRESETS["w8a8_static"]    # layer 0 kept in float, so layer 1 is observed on the float model's hidden states
    cfg = cfg.replace(skip=cfg.skip + ("model.layers.0.*",), calibration=CalibrationConfig(min_expert_tokens=30))
    q = quantize_model(model, cfg, data, progress=False)
    report = q.calibration_report
    assert report["data"] == "8 windows x 24 tokens given as data= (token ids)"
    # the routing of layer 1, recomputed from the float model on the same windows
    seen = []
    hook = model.model.layers[1].mlp.experts.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    with torch.no_grad():
        model(data)
    hook.remove()
    counts = torch.zeros(model.config.n_routed_experts, dtype=torch.long).index_add_(
        0, seen[0].flatten(), torch.ones(seen[0].numel(), dtype=torch.long))
    expected = [e for e in range(len(counts)) if counts[e] < 30]
    assert expected and report["dense_experts"].get("model.layers.1.mlp.experts.down_proj", []) == expected
    # calibration-free configs report no data
    assert quantize_model(model, "w8a8", progress=False).calibration_report == {"data": None, "dense_experts": {}}


def test_bad_calibration_data_is_refused_before_any_work(setup, monkeypatch):
    import graphopt.quant.model_quant as mq
    model, data, _, _ = setup
    monkeypatch.setattr(mq.copy, "deepcopy", lambda m: pytest.fail("copied the model before checking the data"))
    cases = [([], r"data=\.\.\.\) is empty"), (torch.zeros(0, 8, dtype=torch.long), r"is empty \(shape \(0, 8\)\)"),
             (data.float(), r"integer token ids, got dtype torch.float32"),
             (data[0], r"must be 2-D \[windows, tokens\], got shape \(24,\)"),
             (data + 97, r"token id \d+ >= the model's vocab_size 97"),
             (data[:, :1], r"1 MTP module\(s\) need at least 2 tokens per window")]
    for bad, match in cases:
        with pytest.raises(QuantError, match=match):
            quantize_model(model, "w8a8_static", bad, progress=False)
    # no tokenizer for this model and the default (text) source: says what to pass
    with pytest.raises(QuantError, match=r"'default' needs the model's tokenizer.*data=.*'random'"):
        quantize_model(model, "w8a8_static", progress=False)
