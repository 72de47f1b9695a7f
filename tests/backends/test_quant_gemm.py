"""The CUDA quantised GEMMs against the reference ops (GPU only): int8 bit-identical, FP8 within
bf16 rounding of the reference's float32 result, on decode-sized and prefill-sized row counts."""

import pytest
import torch

from graphopt.backends.inductor.kernels import quant_gemm
from graphopt.ops import quant
from graphopt.ops.packing import pack_int4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _int8(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).cuda()


@pytest.mark.parametrize("lead", [(1,), (3,), (16,), (17,), (2, 1), (8, 2), (64,), (129,)])
@pytest.mark.parametrize("k,out", [(112, 8192), (2048, 1408), (512, 2048)])
def test_int8_matmul_is_bit_identical(lead, k, out):
    x, w = _int8(*lead, k, seed=1), _int8(out, k, seed=2)
    got = quant_gemm.int8_matmul_cuda(x, w)
    assert got.dtype == torch.int32 and got.shape == (*lead, out)
    assert torch.equal(got, quant.int8_matmul._init_fn(x, w))


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2,)])
@pytest.mark.parametrize("k,out", [(112, 8192), (2048, 1408), (100, 24), (10944, 2048)])
def test_int8_gemv_path_is_bit_identical(monkeypatch, lead, k, out):
    """int8_matmul's one-row GEMV ("int8_gemv"); two rows take cuBLASLt."""
    monkeypatch.setitem(quant_gemm.ROUTE_ROWS, "int8_gemv", 1)
    x, w = _int8(*lead, k, seed=7), _int8(out, k, seed=8)
    assert torch.equal(quant_gemm.int8_matmul_cuda(x, w), quant.int8_matmul._init_fn(x, w))


@pytest.mark.parametrize("xb,experts,rows,out,k", [(6, 6, 1, 1408, 2048), (1, 4, 1, 2048, 1408),
                                                   (3, 3, 1, 24, 100), (8, 8, 1, 4096, 10944)])
def test_batched_int8_gemv_path_is_bit_identical(monkeypatch, xb, experts, rows, out, k):
    """Batched int8_matmul at one row per entry ("int8_expert_gemv", opt-in), alone and under a CUDA graph."""
    monkeypatch.setitem(quant_gemm.ROUTE_ROWS, "int8_expert_gemv", 1)
    x, w = _int8(xb, rows, k, seed=9), _int8(experts, out, k, seed=10)
    ref = quant.int8_matmul._init_fn(x, w)
    assert torch.equal(quant_gemm.int8_matmul_cuda(x, w), ref)
    quant_gemm.int8_matmul_cuda(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = quant_gemm.int8_matmul_cuda(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref)


def test_int8_shapes_the_tensor_cores_do_not_take_use_the_reference():
    x, w = _int8(5, 100, seed=3), _int8(24, 100, seed=4)              # K = 100 is not a multiple of 8
    assert torch.equal(quant_gemm.int8_matmul_cuda(x, w), quant.int8_matmul._init_fn(x, w))
    wb = _int8(3, 16, 64, seed=5)                                       # per-expert weights [E, out, K]
    xb = _int8(3, 4, 64, seed=6)
    assert torch.equal(quant_gemm.int8_matmul_cuda(xb, wb), quant.int8_matmul._init_fn(xb, wb))


@pytest.mark.parametrize("rows", [1, 8, 33, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_the_reference(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2048, generator=g).cuda()
    w = torch.randn(1408, 2048, generator=g).cuda() * 0.05
    x_q, x_s = quant.quantize_fp8(x, None, 0)
    w_s = (w.abs().amax(-1, keepdim=True) / quant.FP8_MAX).float()
    w_q = (w / w_s).to(quant.FP8_DTYPE)
    b = torch.randn(1408, generator=g).cuda().to(torch.bfloat16) if bias else None
    got = quant_gemm.fp8_linear_cuda(x_q, x_s, w_q, w_s, b, torch.bfloat16)
    ref = quant.fp8_linear._init_fn(x_q, x_s, w_q, w_s, b, torch.float32)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=1.6e-2, atol=1e-2 * ref.abs().max().item())


def test_registered_kernels_serve_the_ops():
    quant_gemm.register()
    x, w = _int8(2, 112, seed=7), _int8(64, 112, seed=8)
    assert torch.equal(torch.ops.graphopt.int8_matmul(x, w), quant.int8_matmul._init_fn(x, w))


@pytest.mark.parametrize("rows", [1, 17, 64])
def test_packed_int4_ops_on_cuda_equal_the_cpu_reference(rows):
    quant_gemm.register()
    g = torch.Generator().manual_seed(rows)
    q4 = torch.randint(-7, 8, (1408, 2048), generator=g, dtype=torch.int8)
    gs = torch.randint(1, 18, (1408, 16), generator=g, dtype=torch.int8)
    x = torch.randint(-127, 128, (rows, 2048), generator=g, dtype=torch.int8)
    packed = pack_int4(q4)                                             # uint8 [1408, 1024]
    want = torch.ops.graphopt.w4a8_matmul(x, packed, gs)
    got = torch.ops.graphopt.w4a8_matmul(x.cuda(), packed.cuda(), gs.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), want)                # integer maths: bit-identical
    scale = torch.rand(1408, 16, generator=g) + 0.01
    w = torch.ops.graphopt.dequantize_int4(packed.cuda(), scale.cuda(), None, torch.bfloat16)
    assert w.shape == (1408, 2048)
    assert torch.equal(w.cpu(), torch.ops.graphopt.dequantize_int4(packed, scale, None, torch.bfloat16))
