"""The Triton router kernel (backends/inductor/kernels/moe_route.py) against the reference `route`.

CPU: Triton's interpreter runs the kernel on float32 CPU tensors, in one subprocess (this file run as a
script; TRITON_INTERPRET=1 must be set before triton.jit builds the kernel) that prints each case's
comparison as JSON. GPU (marked gpu, skipped without CUDA): bf16 and float32 inputs through the
registered op, and replayed from a CUDA graph.

The logits are the reference's float32 sums in another order, so ids are compared on the rows whose
top k+1 choices are more than 1e-5 apart (a closer pair may swap); those must be nearly every row.
"""

import json

import pytest
import torch

from graphopt.ops import core
from kernel_interpreter import run_interpreted

# name -> (rows, experts, hidden, top_k, n_group, topk_group, topk_method, scoring, norm, scale, bias)
CASES = {
    "v2lite": (64, 64, 2048, 6, 1, 1, "greedy", "softmax", False, 1.0, False),
    "v3": (33, 256, 512, 8, 8, 4, "noaux_tc", "sigmoid", True, 2.5, True),
    "embedded": (17, 16, 256, 2, 4, 2, "noaux_tc", "sigmoid", True, 2.5, True),
    "limited_greedy": (9, 32, 96, 4, 4, 2, "group_limited_greedy", "softmax", True, 1.0, False),
    "odd_experts": (5, 48, 100, 6, 1, 1, "greedy", "sigmoid", False, 1.0, True),
    "odd_grouped": (5, 48, 64, 4, 4, 2, "noaux_tc", "sigmoid", True, 1.0, True),    # runs the reference
    "one_row": (1, 64, 2048, 6, 1, 1, "greedy", "softmax", False, 1.0, False),
}


def case_inputs(name, dtype=torch.float32, device="cpu", seed=0):
    n, e, h, k, g, tg, method, scoring, norm, scale, bias = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen).to(dtype).to(device)
    w = (torch.randn(e, h, generator=gen) / h ** 0.5).to(dtype).to(device)
    b = (torch.randn(e, generator=gen) * 0.1).to(device) if bias else None
    return (x, w, b, k, g, tg, method, scoring, norm, scale)


def compare(got, ref, args) -> dict:
    (gw, gi), (rw, ri) = got, ref
    x, w, b, k = args[:4]
    scores = torch.nn.functional.linear(x.float(), w.float())
    scores = scores.sigmoid() if args[7] == "sigmoid" else scores.softmax(-1)
    choice = (scores if b is None else scores + b.float()).sort(dim=-1, descending=True).values[:, :k + 1]
    clean = (choice[:, :-1] - choice[:, 1:]).min(dim=-1).values > 1e-5
    same = (gi == ri).all(dim=-1)
    return dict(shape=list(gw.shape), dtypes=[str(gw.dtype), str(gi.dtype)], rows=int(gi.shape[0]),
                clean=int(clean.sum()), ids_equal_on_clean=bool(same[clean].all()),
                weight_error=(gw - rw)[same].abs().max().item() if same.any() else 0.0)


def _run_interpreted() -> None:
    from graphopt.backends.inductor.kernels import moe_route
    out = {"available": moe_route.available()}
    for name in CASES:
        args = case_inputs(name)
        out[name] = compare(moe_route.moe_route_cuda(*args), core.route(*args), args)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


def _check(result, name):
    n, k = CASES[name][0], CASES[name][3]
    assert result["shape"] == [n, k] and result["dtypes"] == ["torch.float32", "torch.int64"]
    assert result["clean"] >= 0.9 * n, result               # near-ties are rare on random inputs
    assert result["ids_equal_on_clean"], result
    assert result["weight_error"] < 1e-5, result


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_the_reference(interpreted, name):
    assert interpreted["available"]
    _check(interpreted[name], name)


def test_bad_arguments_are_refused_before_the_kernel():
    from graphopt.backends.inductor.kernels import moe_route
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="n_group must be >= 1 and divide n_experts"):
        moe_route.moe_route_cuda(x, w, None, 2, 4, 1, "noaux_tc", "sigmoid", True, 1.0)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_op_matches_the_reference(name, dtype):
    from graphopt.backends.inductor import kernels
    kernels.register_all()
    args = case_inputs(name, dtype, "cuda", seed=1)
    got = torch.ops.graphopt.moe_route(*args)
    _check(compare(got, core.route(*args), args), name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_replays_in_a_cuda_graph():
    from graphopt.backends.inductor.kernels import moe_route
    args = list(case_inputs("v2lite", torch.bfloat16, "cuda", seed=2))
    x = args[0]
    moe_route.moe_route_cuda(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_route.moe_route_cuda(*args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    _check(compare(out, core.route(*args), args), "v2lite")


if __name__ == "__main__":
    _run_interpreted()
