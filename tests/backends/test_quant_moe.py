"""The routed quantised experts without host synchronisation (what the CUDA kernel runs while a CUDA
graph is captured) against the reference `sparse_moe`, on CPU: gathered (few assignments) and
dense (more assignments than experts), for the integer, FP8 and weight-only schemes."""

import pytest
import torch

from graphopt.backends.inductor.kernels.quant_gemm import moe_without_sync
from graphopt.ops.quant_linear import QuantizedLinear, sparse_moe
from graphopt.quant.schemes import SCHEMES, quantize_weight

E, H, I = 8, 64, 32


def _linear(name, out, k, seed):
    w = torch.randn(E, out, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    return QuantizedLinear(name, quantize_weight(SCHEMES[name], w, group_size=16, fp8_block=32))


@pytest.mark.parametrize("name", ["w8a8", "w4a8", "fp8", "w8a16"])
@pytest.mark.parametrize("tokens", [1, 3, 16])          # 2 / 6 assignments <= 8 experts: gathered; 32: dense
def test_without_sync_equals_the_reference(name, tokens):
    g = torch.Generator().manual_seed(tokens)
    up, dn = _linear(name, 2 * I, H, 1), _linear(name, H, I, 2)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=g)
    ref = sparse_moe(x, weights, ids, up, dn)
    got = moe_without_sync(x, weights, ids, up, dn)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
