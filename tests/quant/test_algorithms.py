"""Algorithms: transforms keep the float function, searches beat round-to-nearest where they should."""

import pytest
import torch

from graphopt.quant.algorithms import Target, Transformed, quantize_target
from graphopt.quant.algorithms.base import rows_in_basis
from graphopt.quant.algorithms.clipping import grid_clipping, learnable_clipping
from graphopt.quant.algorithms.flexsmooth import flexsmooth, quantized_output_error
from graphopt.quant.algorithms.hadamard import hadamard
from graphopt.quant.algorithms.hqq import hqq
from graphopt.quant.algorithms.smoothquant import smoothquant
from graphopt.quant.config import (ClippingConfig, FlexSmoothConfig, HadamardConfig, HQQConfig,
                                   LearnableClippingConfig, QuantConfig, RTNConfig, SmoothQuantConfig)
from graphopt.quant.observers import Observer
from graphopt.quant.qlinear import eager_call, emit_linear
from graphopt.ops.packing import pack_int4
from graphopt.quant.schemes import SCHEMES, dequantize, hqq_initial, quantize_weight


def _target(scheme, w, x=None, per_expert=False, **cfg):
    obs = None
    if x is not None:
        obs = Observer("t", max_rows=512, per_expert=per_expert)
        obs.observe(x)
    return Target("t", w, None, SCHEMES[scheme], QuantConfig(scheme, **cfg), obs)


def _outlier_inputs(rows=256, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, [3, 17]] *= 40.0                                       # two outlier channels, as in LLM activations
    return x, torch.randn(32, k, generator=g) * 0.05


@pytest.mark.parametrize("make", [
    lambda t: smoothquant(SmoothQuantConfig(0.5), t),
    lambda t: flexsmooth(FlexSmoothConfig(), t),
    lambda t: hadamard(HadamardConfig(), t),
])
def test_transforms_preserve_the_float_function(make):
    x, w = _outlier_inputs()
    t = make(_target("w8a8", w, x))
    ref = x.double() @ w.double().T
    got = rows_in_basis(x.double(), Transformed(t.weight, None if t.smooth_inv is None else t.smooth_inv.double(),
                                                 t.rotate_block)) @ t.weight.double().T
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)      # float32 rounding only


def test_per_expert_smoothing_has_one_vector_per_expert_and_preserves_each_expert():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 50, 32, generator=g) * torch.rand(4, 1, 32, generator=g) * 10   # [E, N, I]
    w = torch.randn(4, 16, 32, generator=g)                                               # [E, H, I]
    t = smoothquant(SmoothQuantConfig(0.5), _target("w8a8", w, x, per_expert=True))
    assert t.smooth_inv.shape == (4, 1, 32)
    torch.testing.assert_close(torch.matmul(x * t.smooth_inv, t.weight.transpose(1, 2)),
                               torch.matmul(x, w.transpose(1, 2)), rtol=1e-4, atol=1e-4)


def test_smoothing_beats_rtn_on_activation_outliers_and_flexsmooth_records_its_choice():
    x, w = _outlier_inputs()
    target = _target("w8a8", w, x)
    rtn = quantized_output_error(target, Transformed(w))
    sq = quantized_output_error(target, smoothquant(SmoothQuantConfig(0.5), target))
    fs = flexsmooth(FlexSmoothConfig(), target)
    assert sq < rtn and fs.meta["output_mse"] <= sq
    assert fs.meta["alpha"] is not None and fs.meta["beta"] is not None


def test_hadamard_spreads_outliers_before_activation_quantisation():
    x, w = _outlier_inputs()
    target = _target("w8a8", w, x)
    assert quantized_output_error(target, hadamard(HadamardConfig(), target)) < \
        quantized_output_error(target, Transformed(w))


def _clip_case():
    """Heavy-tailed (Laplace) weights: the abs-max grid spends its int4 steps on a few large values."""
    g = torch.Generator().manual_seed(3)
    u = torch.rand(24, 64, generator=g) - 0.5
    w = -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())
    x = torch.randn(256, 64, generator=g)
    return w, x


def _output_error(x, w, tensors):
    return float((x @ (w - dequantize(tensors, SCHEMES["w4a16"])).T).square().mean())


def test_clipping_search_reduces_output_error_against_rtn_on_weight_outliers():
    w, x = _clip_case()
    target = _target("w4a16", w, x, group_size=64)
    rtn = _output_error(x, w, quantize_weight(SCHEMES["w4a16"], w, 64, 128))
    t = Transformed(w)
    grid = _output_error(x, w, grid_clipping(ClippingConfig(), target, t))
    learnt = _output_error(x, w, learnable_clipping(LearnableClippingConfig(steps=15, lr=0.05), target, Transformed(w)))
    assert grid < 0.9 * rtn
    assert learnt <= grid * 1.0001                    # per entry, learnt ratios are kept only when better
    assert t.meta["clip_mean"] < 1.0


def test_hqq_beats_min_max_without_data():
    w, _ = _clip_case()
    target = _target("w4a16", w, None, group_size=16)
    init = hqq_initial(w, 4, 4)                                   # unpacked codes: HQQ's starting point
    init["weight"] = pack_int4(init["weight"])
    out = hqq(HQQConfig(iters=20), target, Transformed(w))
    err = lambda t: float((dequantize(t, SCHEMES["w4a16"]) - w).square().sum())
    assert out["weight"].dtype == torch.uint8 and out["weight"].shape == (*w.shape[:-1], w.shape[-1] // 2)
    assert err(out) < err(init)


def test_quantize_target_adds_smoothing_and_a_static_scale():
    x, w = _outlier_inputs()
    target = _target("w8a8_static", w, x, algorithms=(SmoothQuantConfig(0.5),))
    q = quantize_target(target)
    assert set(q.tensors) == {"weight", "scale", "smooth_inv", "input_scale"} and q.tensors["input_scale"].dim() == 0
    y = emit_linear(eager_call, x, q, q.tensors, torch.float32)
    ref = x @ w.T
    assert float((y - ref).norm() / ref.norm()) < 0.02


def test_calibration_free_methods_run_without_an_observer_and_others_say_why_they_cannot():
    w = torch.randn(16, 32)
    q = quantize_target(_target("w8a16", w, None, algorithms=(RTNConfig(),)))
    assert q.tensors["weight"].dtype == torch.int8
    with pytest.raises(RuntimeError, match="needs calibration statistics"):
        quantize_target(_target("w8a8", w, None, algorithms=(SmoothQuantConfig(),)))
