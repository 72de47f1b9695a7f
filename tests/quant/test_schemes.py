"""Weight quantisation per scheme: error floors (SQNR), grid invariants, bad input."""

import pytest
import torch

from graphopt.quant.schemes import (SCHEMES, W4A8_PROTECT, QuantError, dequantize, get_scheme, groups_of,
                                    quantize_weight, weight_bits_per_element)


def sqnr_db(w, wq):
    return float(10 * torch.log10(w.square().sum() / (w - wq).square().sum()))


# SQNR floors (dB) on Gaussian weights; int8 ~ 40 dB, fp8 e4m3 (3 mantissa bits) ~ 30, int4 group ~ 20
FLOORS = {"w8a8": 38, "w8a8_static": 38, "w8a16": 38, "fp8": 28, "fp8_block": 28, "w4a8": 16, "w4a16": 18}


@pytest.mark.parametrize("name", sorted(FLOORS))
@pytest.mark.parametrize("shape", [(48, 64), (3, 40, 64)])     # a linear and stacked experts (ragged fp8 rows)
def test_scheme_round_trip_meets_sqnr_floor(name, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = quantize_weight(SCHEMES[name], w, group_size=16, fp8_block=32)
    assert t["weight"].shape == w.shape
    assert sqnr_db(w, dequantize(t)) > FLOORS[name]


def test_coarser_grids_lose_more():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    err = {n: sqnr_db(w, dequantize(quantize_weight(SCHEMES[n], w, 32, 128))) for n in ("w8a8", "fp8", "w4a16")}
    assert err["w8a8"] > err["fp8"] > err["w4a16"]


def test_w4a8_is_progressive_and_never_leaves_int8():
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.01, 5, 64)
    t = quantize_weight(SCHEMES["w4a8"], w, group_size=16, fp8_block=128)
    assert t["weight"].abs().max() <= 7 and t["group_scale"].dtype == torch.int8
    assert t["group_scale"].min() >= 1 and t["group_scale"].max() <= 17
    widened = t["weight"].int().view(2, 16, 4, 16) * t["group_scale"].int()[..., None]
    assert widened.abs().max() <= W4A8_PROTECT      # int4 x int8 scale stays an unsaturated int8


def test_clip_ratio_shrinks_the_grid():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    full = quantize_weight(SCHEMES["w8a16"], w, 128, 128)
    half = quantize_weight(SCHEMES["w8a16"], w, 128, 128, clip=torch.full((8, 1), 0.5))
    torch.testing.assert_close(half["scale"], full["scale"] * 0.5)


def test_weight_bits_include_scales():
    assert weight_bits_per_element(SCHEMES["bf16"], 128, 128) == 16
    assert 8 < weight_bits_per_element(SCHEMES["w8a8"], 128, 128) < 8.5
    assert 4 < weight_bits_per_element(SCHEMES["w4a8"], 1024, 128) < 4.2


def test_unknown_scheme_lists_accepted_ones():
    with pytest.raises(QuantError, match=r"unknown quantisation scheme 'w3a7'.*w8a8.*fp8_block"):
        get_scheme("w3a7")


def test_group_size_must_divide_k():
    with pytest.raises(QuantError, match="not a multiple of group_size 64"):
        groups_of(96, 64)
    assert groups_of(32, 128) == 1              # a group larger than K is one group


def test_clipping_is_refused_for_fp8():
    with pytest.raises(QuantError, match="integer schemes"):
        quantize_weight(SCHEMES["fp8"], torch.randn(4, 8), 128, 128, clip=torch.ones(4, 1))
