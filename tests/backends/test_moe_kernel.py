"""The grouped MoE expert kernels (backends/inductor/kernels/moe.py) against the op's reference.

CPU: the block alignment and the gathered fallback in plain torch; Triton's interpreter runs the two
kernels on CPU tensors. TRITON_INTERPRET=1 must be set before triton.jit builds the kernels, so the
interpreter cases run in one subprocess (this file, run as a script) that prints their errors as JSON;
each pytest case reads its own entry. GPU (marked gpu, skipped without CUDA): the registered CUDA
kernel through torch.ops.graphopt.moe_experts at model shapes, replayed from a CUDA graph with new
routing, and reading nothing but the chosen experts (the others are NaN).
"""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from graphopt.backends.inductor.kernels import moe
from graphopt.ops import core

ARGS = ("x", "weights", "ids", "gate_up", "down")


def make_experts(E, H, I, dtype=torch.float32, device="cpu", seed=0):
    """Stacked expert weights scaled so that every matmul output has unit scale."""
    g = torch.Generator(device).manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=g, device=device).mul_(H ** -0.5).to(dtype)
    down = torch.randn(E, H, I, generator=g, device=device).mul_(I ** -0.5).to(dtype)
    return dict(gate_up=gate_up, down=down)


def make_routing(N, E, H, k, dtype=torch.float32, device="cpu", seed=0, one_expert=None, strided=False):
    """x [N, H] and top-k routing (distinct experts per token, weights summing to 1). one_expert: every
    token's first choice is that expert. strided: x is a non-contiguous view."""
    g = torch.Generator(device).manual_seed(seed)
    scores = torch.rand(N, E, generator=g, device=device)
    if one_expert is not None:
        scores[:, one_expert] = 2.0
    top, ids = scores.topk(k, dim=1)
    x = torch.randn(N, 2 * H if strided else H, generator=g, device=device).to(dtype)
    return dict(x=x[:, ::2] if strided else x, weights=top / top.sum(1, keepdim=True), ids=ids)


def reference(a):
    """The op's own implementation on the inputs' device (a registered CUDA kernel switched off)."""
    cuda = a["x"].is_cuda
    with core.moe_experts.set_kernel_enabled("cuda", False) if cuda else contextlib.nullcontext():
        return core.moe_experts(*(a[name] for name in ARGS))


def rel_max_error(got, ref) -> float:
    """max |got - ref| / max |ref| (NaN when got has NaN)."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# -- CPU: alignment and the gathered fallback (plain torch) ------------------------------------------

@pytest.mark.parametrize("block_m", [4, 16])
def test_align_groups_each_block_under_one_expert(block_m):
    ids = torch.tensor([3, 0, 3, 3, 1, 3, 0, 3, 3, 3, 3, 0])          # expert 2 and 4 unused, 3 overflows
    E, M = 5, ids.numel()
    sorted_ids, block_expert = moe._align_to_blocks(ids, E, block_m)
    n_blocks = -(-(M + min(E, M) * (block_m - 1)) // block_m)
    assert sorted_ids.shape == (n_blocks * block_m,) and block_expert.shape == (n_blocks,)
    real = sorted_ids[sorted_ids < M]
    assert sorted(real.tolist()) == list(range(M))                    # each assignment once, rest sentinel
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < M]
        if e == E:                                                     # past the last used block: empty
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (ids[rows] == e).all() and torch.equal(rows, rows.sort().values)
    used = [e for e in block_expert.tolist() if e < E]
    assert used == sorted(used) and set(used) == {0, 1, 3}
    assert used.count(3) == -(-8 // block_m)                           # 8 assignments of expert 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,E,H,I,k", [(1, 5, 40, 24, 2), (17, 6, 40, 24, 3), (3, 16, 256, 112, 2)])
def test_gathered_fallback_matches_reference(N, E, H, I, k, dtype):
    a = {**make_experts(E, H, I, dtype), **make_routing(N, E, H, k, dtype, seed=N)}
    got, ref = moe.moe_experts_gathered(*(a[name] for name in ARGS)), reference(a)
    assert got.dtype == dtype and got.shape == (N, H)
    # same rounding points, batched vs grouped matmuls: float32 to reassociation, bf16 to an ulp or two
    assert rel_max_error(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_gathered_fallback_reads_only_chosen_experts():
    a = {**make_experts(6, 40, 24), **make_routing(1, 6, 40, 2)}
    clean = reference(a)
    unused = torch.ones(6, dtype=torch.bool)
    unused[a["ids"][0]] = False
    a["gate_up"][unused], a["down"][unused] = float("nan"), float("nan")
    assert torch.equal(moe.moe_experts_gathered(*(a[name] for name in ARGS)), clean)


# -- CPU: the kernels under the interpreter ------------------------------------------------------------
# name: (E, H, I, k, N, dtype, make_routing extras). Tiny on purpose: the interpreter runs every program
# in Python. H = 160 and I = 80 cut into a full and a masked tile (BLOCK_K 128 / BLOCK_N 64); H = 40,
# I = 24 are single masked tiles; E is never a power of two except for the embedded model.
INTERPRETER_CASES = {
    "n1_float32": (5, 160, 80, 2, 1, "float32", {}),
    "n3_float32": (5, 160, 80, 2, 3, "float32", {}),
    "n17_float32_repeated_experts": (6, 40, 24, 3, 17, "float32", {}),
    "n17_float32_one_expert": (5, 40, 24, 2, 17, "float32", dict(one_expert=3)),
    "n17_float32_strided_x": (6, 40, 24, 3, 17, "float32", dict(strided=True)),
    "n1_bfloat16": (5, 160, 80, 2, 1, "bfloat16", {}),
    "n3_bfloat16": (5, 160, 80, 2, 3, "bfloat16", {}),
    "n17_bfloat16_repeated_experts": (6, 40, 24, 3, 17, "bfloat16", {}),
    "n17_bfloat16_one_expert_k1": (5, 40, 24, 1, 17, "bfloat16", dict(one_expert=2)),
    "n3_float16": (5, 160, 80, 2, 3, "float16", {}),
    "embedded_n3_bfloat16": (16, 256, 112, 2, 3, "bfloat16", {}),
    "n1_float32_unused_experts_nan": (6, 40, 24, 2, 1, "float32", dict(poison=True)),
    # M^2 <= 2E: one block per assignment, two tokens sharing expert 3 (read twice)
    "n2_float32_one_per_block_shared_expert": (24, 160, 80, 2, 2, "float32", dict(one_expert=3)),
    "n2_bfloat16_one_per_block_shared_expert": (24, 40, 24, 2, 2, "bfloat16", dict(one_expert=3)),
    "n2_float32_one_per_block_unused_experts_nan": (24, 40, 24, 2, 2, "float32", dict(poison=True)),
    # expert pruning: each token's last assignment has weight 0; its expert poisoned where only it uses it
    "n1_float32_pruned_expert_nan": (6, 160, 80, 3, 1, "float32", dict(poison=True, prune=True)),
    "n2_bfloat16_one_per_block_pruned_expert_nan": (24, 40, 24, 2, 2, "bfloat16", dict(poison=True, prune=True)),
    "n17_float32_sorted_pruned": (6, 40, 24, 3, 17, "float32", dict(prune=True)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bounds on max |kernel - reference| / max |reference|: float32 products are exact ("ieee") and sums
# reassociate; half types round at the reference's points, so only accumulation order differs
MAX_ERROR = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def _interpreter_main() -> None:
    """Run every interpreter case; print one JSON object {case: {rel_max_error, dtype, shape}}."""
    results = {"available": moe.available()}
    for name, (E, H, I, k, N, dtype_name, extra) in INTERPRETER_CASES.items():
        extra = dict(extra)
        poison, prune = extra.pop("poison", False), extra.pop("prune", False)
        dtype = DTYPES[dtype_name]
        a = {**make_experts(E, H, I, dtype, seed=len(results)), **make_routing(N, E, H, k, dtype, **extra)}
        if prune:
            a["weights"][:, -1] = 0.0
        ref = reference(a)
        if poison:                                       # the kernel may read only the chosen, kept experts
            unused = torch.ones(E, dtype=torch.bool)
            unused[a["ids"][a["weights"] != 0]] = False
            a["gate_up"][unused], a["down"][unused] = float("nan"), float("nan")
        got = moe.moe_experts_cuda(*(a[name] for name in ARGS))
        results[name] = dict(rel_max_error=rel_max_error(got, ref), dtype=str(got.dtype), shape=list(got.shape))
    for name, (E, M, block_m, seed) in ALIGN_CASES.items():
        ids = torch.randint(0, E, (M,), generator=torch.Generator().manual_seed(seed))
        if name.endswith("one_expert"):
            ids[::2] = E - 1
        want, got = moe._align_to_blocks(ids, E, block_m), moe._align_triton(ids, E, block_m)
        atomic = moe._align_triton(ids, E, block_m, atomic=True)
        results[name] = dict(equal=all(torch.equal(w, g) for w, g in zip(want, got)),
                             atomic_same_blocks=same_blocks(want, atomic, block_m, M))
    print(json.dumps(results))


# the one-program alignment against the torch one: (E, M, block_m, seed); M past M_PAD * CHUNK chunks
ALIGN_CASES = {"align_e5_m12": (5, 12, 4, 0), "align_e64_m48": (64, 48, 16, 1), "align_e64_m384": (64, 384, 16, 2),
               "align_e256_m1024_one_expert": (256, 1024, 64, 3), "align_e7_m300_one_expert": (7, 300, 16, 4)}


def same_blocks(want, got, block_m: int, n_assign: int) -> bool:
    """Same block experts, and each expert's blocks hold the same assignments (in any order and
    any split over its blocks) and the same padding count per block."""
    if not torch.equal(want[1], got[1]) or want[0].shape != got[0].shape:
        return False
    w, g, n = want[0].view(-1, block_m), got[0].view(-1, block_m), n_assign          # n: the padding sentinel
    if not torch.equal((w == n).sum(1), (g == n).sum(1)):
        return False
    return all(torch.equal(w[want[1] == e].flatten().sort().values, g[got[1] == e].flatten().sort().values)
               for e in want[1].unique().tolist())


@pytest.mark.parametrize("case", list(ALIGN_CASES))
def test_interpreted_align_kernel_equals_the_torch_alignment(interpreted, case):
    assert interpreted[case]["equal"] and interpreted[case]["atomic_same_blocks"]


@pytest.mark.parametrize("n_tokens, k, E, one", [
    (1, 8, 256, True), (1, 6, 64, True),        # one token: its k experts are distinct, nothing is re-read
    (2, 2, 24, True), (2, 6, 64, False),        # M^2 <= 2E: at most ~one repeated read; 144 > 128: sort
    (8, 8, 256, False), (3, 2, 5, False),
])
def test_one_block_per_assignment_only_where_few_experts_repeat(n_tokens, k, E, one):
    assert moe._one_per_block(n_tokens, n_tokens * k, E) is one
    assert all(case[4] > 1 or moe._one_per_block(case[4], case[4] * case[3], case[0])
               for case in INTERPRETER_CASES.values())              # the cases below cover both layouts
    assert any(moe._one_per_block(N, N * kk, EE) for EE, _, _, kk, N, _, _ in INTERPRETER_CASES.values() if N > 1)


@pytest.fixture(scope="module")
def interpreted():
    from kernel_interpreter import run_interpreted    # here: a subprocess below imports this file as a module
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(INTERPRETER_CASES))
def test_interpreted_kernels_match_reference(interpreted, case):
    assert interpreted["available"]
    E, H, I, k, N, dtype_name, _ = INTERPRETER_CASES[case]
    got = interpreted[case]
    assert got["dtype"] == str(DTYPES[dtype_name]) and got["shape"] == [N, H]
    assert got["rel_max_error"] < MAX_ERROR[dtype_name], got      # NaN (an unused expert read) fails too


def test_module_imports_and_falls_back_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"        # makes `import triton` raise ImportError
            "import torch\n"
            "from graphopt.backends.inductor.kernels import moe\n"
            "from tests.backends.test_moe_kernel import ARGS, make_experts, make_routing, reference\n"
            "assert not moe.available() and moe.register() and moe.register()\n"
            "a = {**make_experts(5, 40, 24), **make_routing(3, 5, 40, 2)}\n"
            "got = moe.moe_experts_cuda(*(a[name] for name in ARGS))\n"   # the gathered fallback on CPU tensors
            "assert torch.allclose(got, reference(a), rtol=1e-5, atol=1e-6)\n"
            "terms = moe.moe_expert_terms_cuda(*(a[name] for name in ARGS))\n"
            "assert terms.shape == (3, 2, 40) and torch.equal(terms.sum(1).to(got.dtype), got)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- GPU: the registered CUDA kernel ----------------------------------------------------------------------
MODELS = {"embedded": (16, 256, 112, 2), "v2_lite": (64, 2048, 1408, 6), "v3": (256, 7168, 2048, 8)}  # E,H,I,k
# bounds on rel_max_error against the reference on the same GPU. Measured on the H200 (torch 2.11,
# triton 3.6), max over N in 1..256: float32 6.8e-7 / 1.7e-6 / 2.8e-6 (embedded / V2-Lite / V3); bf16
# 0 / 1.7e-3 / 4.6e-3 (one-ulp flips of gate or up where the H = 7168 sums round differently)
GPU_MAX_ERROR = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
_experts_cache: dict = {}


def _cuda_experts(model, dtype):
    """One set of expert weights at a time (V3 in float32 is 45 GB)."""
    key = (model, dtype)
    if key not in _experts_cache:
        _experts_cache.clear()
        torch.cuda.empty_cache()
        E, H, I, _ = MODELS[model]
        _experts_cache[key] = make_experts(E, H, I, dtype, device="cuda")
    return _experts_cache[key]


@pytest.fixture(scope="module")
def cuda_kernel():
    assert moe.available() and moe.register() and moe.register()       # the second call does nothing
    yield
    _experts_cache.clear()
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("E, M, block_m", [(64, 48, 16), (64, 384, 16), (256, 2048, 64), (7, 300, 16)])
def test_cuda_align_kernels_give_the_torch_blocks(cuda_kernel, E, M, block_m):
    ids = torch.randint(0, E, (M,), device="cuda", generator=torch.Generator("cuda").manual_seed(M))
    want = moe._align_to_blocks(ids, E, block_m)
    assert all(torch.equal(w, g) for w, g in zip(want, moe._align_triton(ids, E, block_m)))
    assert same_blocks(want, moe._align_triton(ids, E, block_m, atomic=True), block_m, M)


GPU_CASES = [(m, d, n) for m in MODELS for d in (torch.bfloat16, torch.float32) for n in (1, 8, 64, 256)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model,dtype,N", GPU_CASES)
def test_cuda_kernel_matches_reference(cuda_kernel, model, dtype, N):
    E, H, I, k = MODELS[model]
    a = {**_cuda_experts(model, dtype), **make_routing(N, E, H, k, dtype, device="cuda", seed=N)}
    got = torch.ops.graphopt.moe_experts(*(a[name] for name in ARGS))
    assert got.dtype == dtype and got.shape == (N, H)
    assert rel_max_error(got, reference(a)) < GPU_MAX_ERROR[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [1, 2, 64])
def test_cuda_terms_are_the_kernel_before_its_sum(cuda_kernel, N):
    E, H, I, k = MODELS["v2_lite"]
    a = {**_cuda_experts("v2_lite", torch.bfloat16), **make_routing(N, E, H, k, torch.bfloat16, device="cuda", seed=N)}
    terms = torch.ops.graphopt.moe_expert_terms(*(a[name] for name in ARGS))
    assert terms.dtype == torch.float32 and terms.shape == (N, k, H)
    assert torch.equal(terms.sum(1).to(torch.bfloat16), torch.ops.graphopt.moe_experts(*(a[name] for name in ARGS)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["embedded", "v2_lite"])
def test_cuda_kernel_replays_in_a_cuda_graph_with_new_routing(cuda_kernel, model):
    E, H, I, k = MODELS[model]
    a = {**_cuda_experts(model, torch.bfloat16), **make_routing(8, E, H, k, torch.bfloat16, device="cuda")}
    call = lambda: torch.ops.graphopt.moe_experts(*(a[name] for name in ARGS))
    call()                                            # compile the kernels outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")           # a host sync in the op raises
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    # new routing, including every token to one expert (more blocks of it than the captured call had)
    for seed, one_expert in ((1, None), (2, E - 1), (3, 0)):
        new = make_routing(8, E, H, k, torch.bfloat16, device="cuda", seed=seed, one_expert=one_expert)
        for name in ("x", "weights", "ids"):
            a[name].copy_(new[name])
        graph.replay()
        torch.cuda.synchronize()
        assert rel_max_error(out, reference(a)) < GPU_MAX_ERROR[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_kernel_at_batch_1_reads_only_the_chosen_experts(cuda_kernel, model):
    E, H, I, k = MODELS[model]
    a = {**_cuda_experts(model, torch.bfloat16), **make_routing(1, E, H, k, torch.bfloat16, device="cuda")}
    clean = torch.ops.graphopt.moe_experts(*(a[name] for name in ARGS))
    unused = torch.ones(E, dtype=torch.bool, device="cuda")
    unused[a["ids"].flatten()] = False
    saved = {w: a[w][unused].clone() for w in ("gate_up", "down")}
    try:
        for w in ("gate_up", "down"):
            a[w][unused] = float("nan")
        got = torch.ops.graphopt.moe_experts(*(a[name] for name in ARGS))
    finally:
        for w in ("gate_up", "down"):                 # the weights are shared with later tests
            a[w][unused] = saved[w]
    assert got.isfinite().all() and torch.equal(got, clean)


if __name__ == "__main__":
    _interpreter_main()
