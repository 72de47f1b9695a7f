"""The Triton GEMV behind graphopt::linear (backends/inductor/kernels/gemv.py) against a float64 product.

CPU: Triton's interpreter runs the kernel on float32 CPU tensors, in one subprocess (this file run as a
script; TRITON_INTERPRET=1 must be set before triton.jit builds the kernel) that prints each case's
relative error as JSON. GPU (marked gpu, skipped without CUDA): bf16 / fp16 / float32 through the
registered op, replayed from a CUDA graph, and the inductor lowering's rewrite of aten.linear.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from kernel_interpreter import run_interpreted

from graphopt.ops import quant as _quant  # noqa: F401  registers graphopt::int8_matmul

# name -> (leading shape of x, out, K): odd sizes exercise the masks (K not a multiple of the tile,
# N not a multiple of the column tile)
CASES = {
    "one_row": ((1,), 576, 2048),
    "two_rows_3d": ((1, 2), 300, 256),
    "odd_k": ((3,), 97, 1000),
    "eight_rows": ((8,), 1024, 512),              # more rows than MAX_ROWS: the kernel itself still runs them
    "tiny": ((5,), 7, 9),
}


# batched int8 products (int8_gemv_batched): name -> (x batch, weight batch, rows, out, K)
BATCHED = {
    "per_assignment": (6, 6, 1, 96, 256),      # each routed assignment against its own expert
    "broadcast_x": (1, 4, 1, 33, 1000),        # one row against every expert, odd K and out
    "two_rows": (3, 3, 2, 17, 64),
}


def case_inputs(name, dtype=torch.float32, device="cpu", seed=0):
    lead, out, k = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen).to(dtype).to(device)
    w = (torch.randn(out, k, generator=gen) / k ** 0.5).to(dtype).to(device)
    return x, w


def int8_inputs(name, seed=0):
    """int8 activations and weight of the case's shape, over the whole int8 range (sums far past 2^24:
    a float32 accumulation would round them, int32 must not)."""
    lead, out, k = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-127, 128, (*lead, k), generator=gen, dtype=torch.int8),
            torch.randint(-127, 128, (out, k), generator=gen, dtype=torch.int8))


def rel_error(got, x, w) -> float:
    ref = F.linear(x.double(), w.double())
    assert got.shape == ref.shape and got.dtype == x.dtype
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _run_interpreted() -> None:
    from graphopt.backends.inductor.kernels import gemv
    out = {"available": gemv.available()}
    for name in CASES:
        x, w = case_inputs(name)
        y = gemv.gemv(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
        out[name] = {"error": rel_error(y, x, w), "op_error": rel_error(gemv.linear_cuda(x, w), x, w)}
        xq, wq = int8_inputs(name)
        out[name]["int8_equal"] = torch.equal(gemv.int8_gemv(xq.reshape(-1, xq.shape[-1]), wq),
                                              torch.ops.graphopt.int8_matmul(xq, wq).reshape(-1, wq.shape[0]))
    for name, (xb, wb, m, n, k) in BATCHED.items():
        gen = torch.Generator().manual_seed(m * n)
        x = torch.randint(-127, 128, (xb, m, k), generator=gen, dtype=torch.int8)
        w = torch.randint(-127, 128, (wb, n, k), generator=gen, dtype=torch.int8)
        out["batched_" + name] = torch.equal(gemv.int8_gemv_batched(x, w), torch.ops.graphopt.int8_matmul(x, w))
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_a_float64_product(interpreted, name):
    assert interpreted["available"]
    assert interpreted[name]["error"] < 1e-5, interpreted[name]
    assert interpreted[name]["op_error"] < 1e-5, interpreted[name]


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_int8_gemv_equals_int8_matmul_bit_for_bit(interpreted, name):
    assert interpreted[name]["int8_equal"], interpreted[name]


@pytest.mark.parametrize("name", list(BATCHED))
def test_interpreted_batched_int8_gemv_equals_int8_matmul_bit_for_bit(interpreted, name):
    assert interpreted["batched_" + name]


def test_batched_int8_matmul_takes_the_batched_gemv_at_one_row_once_registered(monkeypatch):
    """The routing of batched (per-expert) int8_matmul (the GEMV replaced by a recording stand-in):
    the reference before the "int8_expert_gemv" route is enabled, the batched GEMV after it at one row per entry,
    never at two rows per entry."""
    from graphopt.backends.inductor import kernels
    from graphopt.backends.inductor.kernels import gemv, quant_gemm
    calls = []
    monkeypatch.setattr(gemv, "int8_gemv_batched",
                        lambda x, w: calls.append(tuple(x.shape)) or torch.ops.graphopt.int8_matmul(x, w))
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (4, 24, 64), generator=gen, dtype=torch.int8)
    xs = {s: torch.randint(-127, 128, s, generator=gen, dtype=torch.int8) for s in [(4, 1, 64), (1, 1, 64), (4, 2, 64)]}
    monkeypatch.setitem(quant_gemm.ROUTE_ROWS, "int8_expert_gemv", 0)
    for x in xs.values():
        assert torch.equal(quant_gemm.int8_matmul_cuda(x, w), torch.ops.graphopt.int8_matmul(x, w))
    assert calls == []
    kernels.enable_route("int8_expert_gemv")          # monkeypatch restores ROUTE_ROWS afterwards
    for x in xs.values():
        assert torch.equal(quant_gemm.int8_matmul_cuda(x, w), torch.ops.graphopt.int8_matmul(x, w))
    assert calls == [(4, 1, 64), (1, 1, 64)]


def test_reference_op_is_aten_linear_and_refuses_bad_shapes():
    x, w = case_inputs("odd_k")
    assert torch.equal(torch.ops.graphopt.linear(x, w), F.linear(x, w))
    with pytest.raises(ValueError, match="weight must be \\[out, K\\] with K = x's last dimension"):
        torch.ops.graphopt.linear(x, w[:, :-1])
    with pytest.raises(ValueError, match="same dtype"):
        torch.ops.graphopt.linear(x, w.double())


def test_many_rows_or_a_strided_weight_fall_back_to_aten_linear():
    from graphopt.backends.inductor.kernels import gemv
    x, w = torch.randn(gemv.MAX_ROWS + 1, 16), torch.randn(8, 16)
    assert not gemv.usable(x, w)
    assert not gemv.usable(x[:1], w.t().contiguous().t())       # column-major weight
    assert not gemv.usable(x[:1], w.double())
    assert gemv.usable(x[:1], w) and gemv.usable(x[:1].reshape(1, 1, 16), w)


@pytest.mark.parametrize("rows, mib, expected", [(1, 200, True), (2, 11, True), (2, 13, False), (3, 2, True),
                                                 (4, 2, True), (4, 3, False), (5, 1, False)])
def test_few_rows_take_the_gemv_by_the_weight_s_size(rows, mib, expected):
    """ROW_LIMITS: one row at any size, two up to 12 MiB, three or four up to 2.5 MiB (the H200 sweep);
    an MTP verify (1 + k rows at batch 1) of a small model's projections runs the GEMV."""
    from graphopt.backends.inductor.kernels import gemv
    k = 1024
    w = torch.empty(mib * (1 << 20) // (2 * k), k, dtype=torch.bfloat16, device="meta")
    x = torch.empty(1, rows, k, dtype=torch.bfloat16, device="meta")
    assert gemv.usable(x, w) is expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_op_matches_a_float64_product(name, dtype):
    from graphopt.backends.inductor import kernels
    kernels.register_all()
    x, w = case_inputs(name, dtype, "cuda", seed=1)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_error(torch.ops.graphopt.linear(x, w), x, w) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_replays_in_a_cuda_graph():
    from graphopt.backends.inductor.kernels import gemv
    x, w = case_inputs("eight_rows", torch.bfloat16, "cuda", seed=2)
    gemv.linear_cuda(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.linear_cuda(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_error(out, x, w) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_lowering_rewrites_stored_weight_linears():
    from graphopt.backends.inductor import backend, kernels
    kernels.register_all()

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(64, 32))

        def forward(self, x, v):
            return F.linear(x, self.w) + F.linear(x, v)          # v: not a stored weight, kept as aten

    ep = torch.export.export(Proj().cuda(), (torch.randn(1, 32, device="cuda"), torch.randn(64, 32, device="cuda")))
    gm = ep.module()
    lowered = backend.for_inductor(gm)
    targets = [n.target for n in lowered.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.graphopt.linear.default) == 1
    assert targets.count(torch.ops.aten.linear.default) == 1
    x, v = torch.randn(1, 32, device="cuda"), torch.randn(64, 32, device="cuda")     # one row: the GEMV runs
    torch.testing.assert_close(lowered(x, v), gm(x, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn, x, w, message", [
    ("gemv", (2, 16), (8, 12), "K=16 but the weight is"),
    ("gemv", (2, 3, 16), (8, 16), "must be 2-D"),
    ("int8_gemv", (1, 16), (8, 16), "int8 x and weight expected"),
    ("int8_gemv_batched", (3, 1, 16), (2, 8, 16), "batches of 3 inputs and 2 weights"),
])
def test_the_entry_points_refuse_operands_the_kernel_would_misread(fn, x, w, message):
    """Checked before any launch, so no GPU or triton is needed to see the error."""
    from graphopt.backends.inductor.kernels import gemv
    dtype = torch.int8 if fn.startswith("int8") and "expected" not in message else torch.bfloat16
    with pytest.raises(ValueError, match=message):
        getattr(gemv, fn)(torch.zeros(x, dtype=dtype), torch.zeros(w, dtype=dtype))
    # the predicate callers route on (quant_gemm) is that same check
    assert not gemv.takes(torch.zeros(x, dtype=dtype), torch.zeros(w, dtype=dtype), int8=fn.startswith("int8"))


def test_a_weight_strided_along_k_is_refused():
    from graphopt.backends.inductor.kernels import gemv
    w = torch.zeros(16, 8, dtype=torch.bfloat16).t()                 # [8, 16], stride 8 along K
    with pytest.raises(ValueError, match="unit stride along K"):
        gemv.gemv(torch.zeros(1, 16, dtype=torch.bfloat16), w)
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    assert not gemv.takes(x, w) and gemv.takes(x, w.contiguous()) and gemv.takes(x[None], w.contiguous()[None])


if __name__ == "__main__":
    _run_interpreted()


def test_int8_matmul_runs_the_int8_gemv_at_one_row_only_once_registered(monkeypatch):
    """The routing inside int8_matmul's CUDA implementation (the GEMV replaced by a recording stand-in,
    so no GPU or triton is needed): off before the "int8_gemv" route is enabled, one row after it, never two."""
    from graphopt.backends.inductor import kernels
    from graphopt.backends.inductor.kernels import gemv, quant_gemm
    calls = []
    monkeypatch.setattr(gemv, "int8_gemv", lambda x, w: calls.append(tuple(x.shape)) or torch.ops.graphopt.int8_matmul(x, w))
    x, w = int8_inputs("two_rows_3d")
    one = x[:, :1]                                                   # [1, 1, K]
    monkeypatch.setitem(quant_gemm.ROUTE_ROWS, "int8_gemv", 0)
    assert torch.equal(quant_gemm.int8_matmul_cuda(one, w), torch.ops.graphopt.int8_matmul(one, w)) and calls == []
    kernels.enable_route("int8_gemv")          # monkeypatch restores ROUTE_ROWS afterwards
    assert quant_gemm.ROUTE_ROWS["int8_gemv"] == 1
    assert torch.equal(quant_gemm.int8_matmul_cuda(one, w), torch.ops.graphopt.int8_matmul(one, w))
    assert torch.equal(quant_gemm.int8_matmul_cuda(x, w), torch.ops.graphopt.int8_matmul(x, w))    # two rows
    assert calls == [(1, 256)]
