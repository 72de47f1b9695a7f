"""The Triton W4A8 GEMM (backends/inductor/kernels/w4a8_gemm.py) against graphopt::w4a8_matmul's reference:
int8 activations x packed int4 weights with int8 group scales -> int32, equal bit for bit.

CPU: Triton's interpreter runs the kernel in a subprocess (this file run as a script, TRITON_INTERPRET=1
set before triton.jit builds it) that prints one JSON line; the tests read it. GPU (marked gpu, skipped
without CUDA): the registered CUDA kernel through torch.ops.graphopt.w4a8_matmul.
"""

import json
import subprocess
import sys

import pytest
import torch

from graphopt.ops import quant as _quant  # noqa: F401  registers graphopt::w4a8_matmul
from graphopt.ops.packing import pack_int4
from kernel_interpreter import checkout_env, run_interpreted

# name: (rows M, K, out, group size G). Tails on every axis; G = 21 is odd, so the two nibbles of a byte
# can sit in different groups; G = K is one group per row.
CASES = {
    "decode_1_row": (1, 256, 96, 32),
    "ragged_5_rows_tails": (5, 200, 40, 40),
    "odd_group": (3, 42, 24, 21),
    "one_group": (17, 128, 64, 128),
    "many_rows": (70, 128, 72, 64),
}

SPLIT_CASE = (5, 1000, 40, 50)     # split_k_2 / split_k_3: the same shape with K split in 2 and 3


def inputs(m, k, out, g, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    w4 = torch.randint(-8, 8, (out, k), generator=gen, dtype=torch.int8)
    # scales up to 20: |w4 * s| reaches 160, so the saturation at +-127 is exercised too
    s = torch.randint(1, 21, (out, k // g), generator=gen, dtype=torch.int8)
    return x.to(device), pack_int4(w4).to(device), s.to(device)


def _interpreter_main() -> None:
    from graphopt.backends.inductor.kernels import w4a8_gemm

    results = {"available": w4a8_gemm.available()}
    for name, shape in CASES.items():
        x, w, s = inputs(*shape, seed=len(results))
        got = w4a8_gemm.w4a8_gemm(x, w, s)
        ref = torch.ops.graphopt.w4a8_matmul(x, w, s)             # CPU: the reference
        results[name] = dict(equal=torch.equal(got, ref), dtype=str(got.dtype), shape=list(got.shape))
    for split in (2, 3):   # split-K: int32 partial sums added atomically; 4 byte tiles over 3 splits is uneven
        x, w, s = inputs(*SPLIT_CASE, seed=split)
        got = w4a8_gemm.w4a8_gemm(x, w, s, split_k=split)
        results[f"split_k_{split}"] = dict(equal=torch.equal(got, torch.ops.graphopt.w4a8_matmul(x, w, s)),
                                           dtype=str(got.dtype), shape=list(got.shape))
    for name, shape in CASES.items():                              # the few-row GEMV form, any M
        x, w, s = inputs(*shape, seed=len(results))
        got = w4a8_gemm.w4a8_gemv(x, w, s)
        results[f"gemv/{name}"] = dict(equal=torch.equal(got, torch.ops.graphopt.w4a8_matmul(x, w, s)),
                                       dtype=str(got.dtype), shape=list(got.shape))
    x, w, s = inputs(2, 64, 16, 32)
    lead = w4a8_gemm.w4a8_gemm(x.view(1, 2, 64), w, s)            # leading dims kept
    results["lead_dims"] = dict(shape=list(lead.shape), equal=torch.equal(lead[0], torch.ops.graphopt.w4a8_matmul(x, w, s)))
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(CASES) + ["split_k_2", "split_k_3"] + [f"gemv/{c}" for c in CASES])
def test_interpreted_kernel_equals_the_reference_bit_for_bit(interpreted, case):
    assert interpreted["available"]
    got = interpreted[case]
    m, _, out, _ = CASES.get(case.removeprefix("gemv/"), SPLIT_CASE)
    assert got["dtype"] == "torch.int32" and got["shape"] == [m, out]
    assert got["equal"], got


def test_interpreted_kernel_keeps_leading_dims(interpreted):
    assert interpreted["lead_dims"] == dict(shape=[1, 2, 16], equal=True)


def test_a_bad_weight_is_a_clear_error():
    pytest.importorskip("triton")
    from graphopt.backends.inductor.kernels import w4a8_gemm
    x, w, s = inputs(1, 64, 16, 32)
    with pytest.raises(ValueError, match="packed two per byte"):
        w4a8_gemm.w4a8_gemm(x, w.to(torch.int8), s)
    with pytest.raises(ValueError, match="group scales"):
        w4a8_gemm.w4a8_gemm(x, w, s[:, :1].expand(16, 3))


@pytest.mark.parametrize("disable, registered", [("", True), ("w4a8_matmul", False)])
def test_the_kernel_is_registered_by_default_and_can_be_left_out(disable, registered):
    pytest.importorskip("triton")
    code = ("from graphopt.backends.inductor import kernels\n"
            "names = kernels.register_all()\n"
            "print('w4a8_matmul' in names)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=checkout_env(TRITON_INTERPRET="1", GRAPHOPT_DISABLE_KERNELS=disable))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(registered)


def test_the_op_runs_the_kernel_up_to_max_rows_and_the_reference_above(monkeypatch):
    """Measured: above 16 rows the kernel is no faster than the reference path (w4a8_gemm.py's doc). The
    dispatch rule needs no triton: the kernel is replaced by a recording stand-in."""
    from graphopt.backends.inductor.kernels import w4a8_gemm
    calls = []
    monkeypatch.setattr(w4a8_gemm, "w4a8_gemm", lambda *a: calls.append(a[0].shape) or _quant.w4a8_matmul._init_fn(*a))
    for rows in (1, w4a8_gemm.MAX_ROWS, w4a8_gemm.MAX_ROWS + 1):
        x, w, s = inputs(rows, 64, 16, 32, seed=rows)
        assert torch.equal(w4a8_gemm.w4a8_matmul_cuda(x.view(1, rows, 64), w, s),
                           _quant.w4a8_matmul._init_fn(x.view(1, rows, 64), w, s))
    assert calls == [(1, 1, 64), (1, w4a8_gemm.MAX_ROWS, 64)]     # 17 rows: the reference, not the kernel
    x, w, s = inputs(1, 64, 16, 32)
    assert w4a8_gemm.w4a8_matmul_cuda(x[:0], w, s).shape == (0, 16) and len(calls) == 2   # no rows: no launch


def test_the_gemv_form_takes_one_row_once_registered(monkeypatch):
    from graphopt.backends.inductor import kernels
    from graphopt.backends.inductor.kernels import w4a8_gemm
    used = []
    monkeypatch.setattr(w4a8_gemm, "w4a8_gemm", lambda *a: used.append(("mma", a[0].shape[-2])) or _quant.w4a8_matmul._init_fn(*a))
    monkeypatch.setattr(w4a8_gemm, "w4a8_gemv", lambda *a: used.append(("gemv", a[0].shape[-2])) or _quant.w4a8_matmul._init_fn(*a))
    x, w, s = inputs(5, 64, 16, 32)
    monkeypatch.setitem(w4a8_gemm.ROUTE_ROWS, "w4a8_gemv", 0)
    w4a8_gemm.w4a8_matmul_cuda(x[:1], w, s)                          # before register(): the MMA kernel
    kernels.enable_route("w4a8_gemv")                                # monkeypatch restores ROUTE_ROWS after
    for rows in (1, 2, 5):
        assert torch.equal(w4a8_gemm.w4a8_matmul_cuda(x[:rows], w, s), _quant.w4a8_matmul._init_fn(x[:rows], w, s))
    assert used == [("mma", 1), ("gemv", 1), ("mma", 2), ("mma", 5)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES) + ["v2lite_q_proj"])
def test_cuda_kernel_equals_the_cpu_reference(case):
    from graphopt.backends.inductor.kernels import w4a8_gemm
    assert w4a8_gemm.register() and w4a8_gemm.register()
    shape = CASES.get(case, (8, 1536, 3072, 128))
    x, w, s = inputs(*shape)
    got = torch.ops.graphopt.w4a8_matmul(x.cuda(), w.cuda(), s.cuda())
    assert torch.equal(got.cpu(), torch.ops.graphopt.w4a8_matmul(x, w, s))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES) + ["v2lite_q_proj"])
def test_cuda_gemv_form_equals_the_cpu_reference(case):
    from graphopt.backends.inductor.kernels import w4a8_gemm
    shape = CASES.get(case, (1, 1536, 3072, 128))
    x, w, s = inputs(*shape)
    got = w4a8_gemm.w4a8_gemv(x.cuda(), w.cuda(), s.cuda())
    assert torch.equal(got.cpu(), torch.ops.graphopt.w4a8_matmul(x, w, s))


if __name__ == "__main__":
    _interpreter_main()
