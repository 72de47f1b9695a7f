"""The w8a8 routed-expert kernel (backends/inductor/kernels/int8_moe.py) against the op's reference
(`ops.quant_linear.sparse_moe`), under Triton's interpreter on the CPU; on a GPU (gpu tests) the same
comparison at the embedded and V2-Lite shapes."""

import json

import pytest
import torch

from graphopt.ops.quant_linear import TENSOR_FIELDS, QuantizedLinear, sparse_moe
from graphopt.ops.quant_schemes import SCHEMES
from graphopt.quant.schemes import quantize_weight

# name -> (E, H, I, k, N, dtype, smoothing: None | "expert" | "shared")
CASES = {
    "one_token_float32": (8, 48, 40, 2, 1, "float32", None),
    "two_tokens_bfloat16_expert_smoothing": (16, 64, 24, 2, 2, "bfloat16", "expert"),
    "four_tokens_float32_shared_smoothing": (16, 40, 36, 3, 4, "float32", "shared"),
    "one_token_bfloat16_odd_sizes": (6, 72, 20, 3, 1, "bfloat16", None),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bounds on max |got - want| / max |want|: the quantised activations, their scales and the int32 sums
# are the reference's (the interpreter's cases measured 0 to 1e-7: the sum over k in another order);
# on a GPU silu's exp can move a bf16 intermediate by one ulp and so a quantised value by one step
MAX_ERROR = {"float32": 1e-5, "bfloat16": 1e-2}


def stacked_w8a8(w: torch.Tensor, smooth: torch.Tensor | None) -> QuantizedLinear:
    t = quantize_weight(SCHEMES["w8a8"], w, 0, 0)
    if smooth is not None:
        t["smooth_inv"] = smooth
    return QuantizedLinear("w8a8", t)


def make_case(name: str, device="cpu"):
    E, H, I, k, N, dtype_name, smoothing = CASES[name] if name in CASES else name
    gen = torch.Generator().manual_seed(E * H + N)
    dtype = DTYPES[dtype_name]
    x = torch.randn(N, H, generator=gen).to(dtype)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(E, H, I, generator=gen) / I ** 0.5
    smooth = {None: (None, None), "expert": (torch.rand(E, 1, H, generator=gen) + 0.5, torch.rand(E, 1, I, generator=gen) + 0.5),
              "shared": (torch.rand(H, generator=gen) + 0.5, torch.rand(I, generator=gen) + 0.5)}[smoothing]
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    weights = torch.rand(N, k, generator=gen).softmax(-1)
    up, dn = stacked_w8a8(gate_up, smooth[0]), stacked_w8a8(down, smooth[1])
    move = lambda q: QuantizedLinear(q.scheme, {n: t.to(device) for n, t in q.tensors.items()})   # noqa: E731
    return x.to(device), weights.to(device), ids.to(device), move(up), move(dn)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _op_args(up: QuantizedLinear, dn: QuantizedLinear):
    """quantized_moe_experts' tensor lists and params for two stacked linears."""
    lists = [[q.tensors.get(f) for f in TENSOR_FIELDS] for q in (up, dn)]
    return lists[0], lists[1], up.scheme, dn.scheme, [0, 0, 0, 0, 0, 0]


def _run_interpreted() -> None:
    from graphopt.backends.inductor import kernels
    from graphopt.backends.inductor.kernels import int8_moe, quant_gemm
    out = {"available": int8_moe.available()}
    for name in CASES:
        x, weights, ids, up, dn = make_case(name)
        got = int8_moe.moe_experts(x, weights, ids, up, dn)
        out[name] = {"takes": int8_moe.takes(x, ids, up, dn), "dtype": str(got.dtype), "shape": list(got.shape),
                     "error": rel_error(got, sparse_moe(x, weights, ids, up, dn))}
    x, weights, ids, up, dn = make_case("two_tokens_bfloat16_expert_smoothing")
    out["refused"] = {
        "more_assignments_than_experts": int8_moe.takes(x.repeat(5, 1), ids.repeat(5, 1), up, dn),
        "static_scheme": int8_moe.takes(x, ids, QuantizedLinear("w8a8_static", up.tensors), dn),
        "bias": int8_moe.takes(x, ids, up, QuantizedLinear("w8a8", {**dn.tensors, "bias": torch.zeros(64)})),
        "rotation": int8_moe.takes(x, ids, QuantizedLinear("w8a8", up.tensors, rotate_block=64), dn),
    }
    kernels.enable_route("int8_moe")                  # the op's CUDA implementation now takes the kernel
    routed = quant_gemm.quantized_moe_experts_cuda(x, weights, ids, *_op_args(up, dn))
    out["routed_equal"] = torch.equal(routed, int8_moe.moe_experts(x, weights, ids, up, dn))
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    from kernel_interpreter import run_interpreted    # here: a subprocess below imports this file as a module
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_the_reference(interpreted, name):
    assert interpreted["available"]
    got = interpreted[name]
    dtype_name = CASES[name][5]
    assert got["takes"] and got["dtype"] == str(DTYPES[dtype_name]) and got["shape"] == [CASES[name][4], CASES[name][1]]
    assert got["error"] < MAX_ERROR[dtype_name], got


def test_interpreted_kernel_refuses_what_it_does_not_compute(interpreted):
    assert not any(interpreted["refused"].values()), interpreted["refused"]


def test_the_enabled_route_runs_the_kernel_inside_the_op(interpreted):
    assert interpreted["routed_equal"]


def test_nothing_is_taken_without_triton_or_a_device():
    from graphopt.backends.inductor.kernels import int8_moe
    x, weights, ids, up, dn = make_case("one_token_float32")
    assert int8_moe.takes(x, ids, up, dn) == int8_moe.available()


def test_what_it_does_not_take_is_an_error_naming_what_it_takes():
    from graphopt.backends.inductor.kernels import int8_moe
    x, weights, ids, up, dn = make_case("one_token_float32")
    with pytest.raises(ValueError, match="at most E assignments.*Got x \\(9, 48\\)"):
        int8_moe.moe_experts(x.repeat(9, 1), weights.repeat(9, 1), ids.repeat(9, 1), up, dn)   # 18 > 8 experts


# -- GPU -----------------------------------------------------------------------------------------------
GPU_CASES = {"embedded": (16, 256, 112, 2), "v2_lite": (64, 2048, 1408, 6)}   # E, H, I, k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("smoothing", [None, "expert"])
@pytest.mark.parametrize("N", [1, 2, 8])
@pytest.mark.parametrize("model", list(GPU_CASES))
def test_cuda_kernel_matches_the_reference(model, N, smoothing):
    from graphopt.backends.inductor.kernels import int8_moe
    E, H, I, k = GPU_CASES[model]
    if N * k > E:
        pytest.skip("more assignments than experts: not the kernel's regime")
    x, weights, ids, up, dn = make_case((E, H, I, k, N, "bfloat16", smoothing), device="cuda")
    assert int8_moe.takes(x, ids, up, dn)
    got = int8_moe.moe_experts(x, weights, ids, up, dn)
    assert rel_error(got, sparse_moe(x, weights, ids, up, dn)) < MAX_ERROR["bfloat16"]


if __name__ == "__main__":
    _run_interpreted()
