"""graphopt:: quantisation ops: reference numerics against float64 computations, exact integer results,
fake implementations, and bad input."""

import pytest
import torch

from torch._subclasses.fake_tensor import FakeTensorMode

from graphopt.ops import quant as qops
from graphopt.ops.packing import pack_int2, pack_int4

OPS = torch.ops.graphopt


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_quantize_per_token_matches_float64_definition():
    x = torch.randn(3, 5, 64, generator=_gen()) * torch.linspace(0.1, 8, 64)
    smooth_inv = torch.rand(64, generator=_gen(1)) + 0.5
    q, s = OPS.quantize_per_token(x, smooth_inv, 127)
    xs = x.double() * smooth_inv.double()
    want_s = xs.abs().amax(-1, keepdim=True) / 127
    assert q.dtype == torch.int8 and s.shape == (3, 5, 1)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-6, atol=0)
    want_q = torch.round(xs / s.double()).clamp(-127, 127)
    assert torch.equal(q.double(), want_q)
    assert int(q.abs().max()) == 127                       # the abs-max element lands on the grid end


def test_quantize_rounds_half_to_even_and_saturates():
    scale = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 300.0, -300.0])
    q = OPS.quantize_per_tensor(x, scale, 0, None, -128, 127)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]
    q_off = OPS.quantize_per_tensor(x, scale, 3, None, -128, 127)
    assert q_off.tolist() == [3, 5, 5, 3, 1, 127, -128]


def test_zero_rows_quantise_to_zero_with_finite_scale():
    x = torch.zeros(2, 16)
    q, s = OPS.quantize_per_token(x, None, 127)
    assert torch.equal(q, torch.zeros_like(q)) and torch.isfinite(s).all() and (s > 0).all()


def test_int8_matmul_is_exact_int32_including_broadcast_over_experts():
    g = _gen(2)
    x = torch.randint(-127, 128, (7, 96), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (4, 10, 96), generator=g, dtype=torch.int8)
    acc = OPS.int8_matmul(x, w)
    assert acc.dtype == torch.int32 and acc.shape == (4, 7, 10)
    want = torch.einsum("nk,eok->eno", x.double(), w.double())     # exact in float64 (< 2^53)
    assert torch.equal(acc.double(), want)


def test_w4a8_matmul_equals_int8_matmul_on_widened_weight():
    g = _gen(3)
    x = torch.randint(-127, 128, (5, 64), generator=g, dtype=torch.int8)
    q4 = torch.randint(-7, 8, (12, 64), generator=g, dtype=torch.int8)
    gs = torch.randint(1, 18, (12, 4), generator=g, dtype=torch.int8)
    w8 = (q4.double().view(12, 4, 16) * gs.double()[..., None]).view(12, 64)
    assert w8.abs().max() <= 119                                   # protective range: no saturation
    packed = pack_int4(q4)
    assert packed.dtype == torch.uint8 and packed.shape == (12, 32)   # two int4 a byte
    assert torch.equal(OPS.w4a8_matmul(x, packed, gs).double(), x.double() @ w8.T)


def test_w4a8_matmul_refuses_an_unpacked_or_mismatched_weight():
    x = torch.zeros(2, 64, dtype=torch.int8)
    q4 = torch.zeros(3, 64, dtype=torch.int8)
    gs = torch.ones(3, 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="packed two per byte"):
        OPS.w4a8_matmul(x, q4, gs)
    with pytest.raises(ValueError, match=r"K=64 but the packed weight \(3, 16\) holds K=32"):
        OPS.w4a8_matmul(x, pack_int4(q4[:, :32]), gs)


@pytest.mark.parametrize("signed", [True, False])
def test_dequantize_int4_equals_dequantize_weight_on_the_unpacked_values(signed):
    g = _gen(6)
    shape = (2, 6, 32)                                              # stacked experts
    if signed:                                                      # symmetric w4a16
        q, zero = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8), None
    else:                                                           # HQQ: codes 0..15 and a float zero
        q, zero = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8), torch.rand(2, 6, 4, generator=g) * 15
    scale = torch.rand(2, 6, 4, generator=g) + 0.1
    got = OPS.dequantize_int4(pack_int4(q), scale, zero, torch.float32)
    assert got.shape == shape
    assert torch.equal(got, OPS.dequantize_weight(q, scale, zero, torch.float32))   # bit for bit


def test_dequantize_int2_and_lut4_equal_their_unpacked_ops_bit_for_bit():
    g = _gen(7)
    codes2 = torch.randint(0, 4, (6, 32), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(6, 2, generator=g) + 0.1, torch.rand(6, 2, generator=g) * 3
    got = OPS.dequantize_int2(pack_int2(codes2), scale, zero, torch.float32)
    assert got.shape == (6, 32) and torch.equal(got, OPS.dequantize_weight(codes2, scale, zero, torch.float32))
    codes4 = torch.randint(0, 16, (2, 6, 32), generator=g, dtype=torch.uint8)
    book, scale4 = torch.randn(16, generator=g), torch.rand(2, 6, 4, generator=g)
    got4 = OPS.dequantize_lut4(pack_int4(codes4), book, scale4, torch.bfloat16)
    assert got4.shape == (2, 6, 32) and torch.equal(got4, OPS.dequantize_lut(codes4, book, scale4, torch.bfloat16))
    with pytest.raises(ValueError, match="int2 weight must be packed four per byte"):
        OPS.dequantize_int2(codes2.to(torch.int8), scale, zero, torch.float32)


def test_dequantize_int4_fake_gives_the_unpacked_shape_and_refuses_int8():
    with FakeTensorMode():
        w = torch.empty(4, 8, dtype=torch.uint8)
        assert OPS.dequantize_int4(w, torch.empty(4, 1), None, torch.bfloat16).shape == (4, 16)
    with pytest.raises(ValueError, match="packed two per byte"):
        OPS.dequantize_int4(torch.zeros(4, 16, dtype=torch.int8), torch.ones(4, 1), None, torch.float32)


def test_dequantize_int32_applies_token_and_channel_scales_and_bias():
    acc = torch.randint(-10000, 10000, (3, 4), generator=_gen(4), dtype=torch.int32)
    xs, ws, b = torch.rand(3, 1) + 0.1, torch.rand(4, 1) + 0.1, torch.randn(4)
    y = OPS.dequantize_int32(acc, xs, ws, b, torch.float32)
    want = acc.double() * xs.double() * ws.double().T + b.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-5)


def test_dequantize_weight_groups_and_zero_point():
    q = torch.randint(0, 16, (6, 32), generator=_gen(5), dtype=torch.uint8)
    scale, zero = torch.rand(6, 4) + 0.1, torch.rand(6, 4) * 15
    w = OPS.dequantize_weight(q, scale, zero, torch.float32)
    want = ((q.double().view(6, 4, 8) - zero.double()[..., None]) * scale.double()[..., None]).view(6, 32)
    torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [0, 32])
def test_fp8_linear_matches_float64_on_the_quantised_values(block):
    g = _gen(6)
    x, w = torch.randn(5, 64, generator=g), torch.randn(40, 64, generator=g)
    x_q, x_s = OPS.quantize_fp8(x, None, block)
    if block:   # weights in 32x32 blocks, ragged last row-block (40 rows)
        from graphopt.quant.schemes import quantize_fp8
        t = quantize_fp8(w, 32)
        w_q, w_s = t["weight"], t["scale"]
        assert w_s.shape == (2, 2) and x_s.shape == (5, 2)
        xd = x_q.double().view(5, 2, 32) * x_s.double()[..., None]
        wd = w_q.double().view(40, 2, 32) * w_s.double().repeat_interleave(32, 0)[:40, :, None]
        want = torch.einsum("nbk,obk->no", xd, wd)
    else:
        w_s = w.abs().amax(-1, keepdim=True) / qops.FP8_MAX
        w_q = (w / w_s).to(qops.FP8_DTYPE)
        want = (x_q.double() * x_s.double()) @ (w_q.double() * w_s.double()).T
    y = OPS.fp8_linear(x_q, x_s, w_q, w_s, None, torch.float32)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert (y - x @ w.T).norm() / (x @ w.T).norm() < 0.06          # and e4m3 is close to the float matmul


def test_kv_quantize_round_trip_error_is_half_a_step():
    x = torch.randn(2, 9, 32, generator=_gen(7))
    scale = x.abs().amax(dim=(0, 1)) / 127
    back = OPS.dequantize_kv(OPS.quantize_kv(x, scale), scale, torch.float32)
    assert ((back - x).abs() <= scale / 2 + 1e-7).all()


def test_hadamard_is_orthonormal_and_blockwise():
    h = qops.hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16))
    x = torch.randn(3, 64, generator=_gen(8))
    y = OPS.hadamard_transform(x, 16)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :16], x[:, :16] @ h)
    with pytest.raises(ValueError, match="power of two"):
        qops.hadamard_matrix(12)


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(7, 64)
        q, s = OPS.quantize_per_token(x, torch.empty(3, 1, 64), 127)
        assert q.shape == (3, 7, 64) and q.dtype == torch.int8 and s.shape == (3, 7, 1)
        acc = OPS.int8_matmul(torch.empty(7, 64, dtype=torch.int8), torch.empty(3, 10, 64, dtype=torch.int8))
        assert acc.shape == (3, 7, 10) and acc.dtype == torch.int32
        y = OPS.dequantize_int32(acc, s, torch.empty(3, 10, 1), None, torch.bfloat16)
        assert y.dtype == torch.bfloat16
        xq, xs = OPS.quantize_fp8(x, None, 32)
        assert xq.dtype == qops.FP8_DTYPE and xs.shape == (7, 2)


def test_mismatched_k_is_a_clear_error():
    x = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"K=8 .* K=16"):
        OPS.int8_matmul(x, torch.zeros(4, 16, dtype=torch.int8))
