"""The inductor backend: Inductor-compiled step graphs, on the CPU (here, in CI) and on CUDA with the whole
decode step replayed as CUDA graphs per batch bucket (gpu tests, run on the H200)."""

import pytest
import torch

import graphopt
from graphopt.backends.inductor import batch_buckets, for_inductor, prefill_shape
from graphopt.config import resolve_backend
from graphopt.passes.program import CompileOptions
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model

PROMPTS = [[1, 50, 60, 70], [1, 42], [1, 9, 8, 7, 6, 5, 4, 3, 2]]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_auto_picks_inductor_on_cuda_ascend_on_an_npu_and_eager_on_the_cpu():
    assert resolve_backend("auto", "cuda") == "inductor" and resolve_backend("auto", torch.device("cuda", 0)) == "inductor"
    assert resolve_backend("auto", "cpu") == "eager" and resolve_backend("inductor", "cpu") == "inductor"
    assert resolve_backend("auto", "npu:0") == "ascend"          # an NPU device means torch_npu is loaded


def test_buckets_cover_every_batch_size_up_to_the_largest():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(200)[-3:] == [160, 192, 200]


def test_prefill_chunks_pad_to_row_token_and_width_buckets_up_to_a_token_budget():
    buckets = batch_buckets(64)
    assert prefill_shape(1, 5, 1, buckets, 300, 8192) == (1, 16, 1)
    assert prefill_shape(3, 17, 5, buckets, 300, 8192) == (4, 32, 8)
    assert prefill_shape(8, 512, 40, buckets, 300, 8192) == (8, 512, 64)
    assert prefill_shape(2, 129, 9, buckets, 300, 8192) == (2, 256, 16)       # multiples of 128 above 128
    assert prefill_shape(2, 300, 19, buckets, 300, 8192) == (2, 384, 32)
    assert prefill_shape(8, 512, 290, buckets, 300, 8192) == (8, 512, 300)     # width capped at the table
    assert prefill_shape(17, 512, 40, buckets, 300, 8192) is None              # 24 x 512 padded tokens
    assert prefill_shape(65, 16, 1, buckets, 300, 8192) is None                # past the last bucket
    assert prefill_shape(1, 16, 301, buckets, 300, 8192) is None
    assert prefill_shape(1, 16, 1, buckets, 300, 0) is None                    # prefill_graph_tokens=0: off
    with pytest.raises(ValueError, match="prefill_graph_tokens must be an int >= 0"):
        CompileOptions.from_kwargs({"prefill_graph_tokens": -1})


def test_inductor_sees_the_elementwise_ops_as_torch_maths():
    compiled = graphopt.compile(random_model(0, num_hidden_layers=1, first_k_dense_replace=0), backend="eager", progress=False, block_size=4)
    gm = for_inductor(compiled.program["step"])
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not {"graphopt.rms_norm.default", "graphopt.swiglu.default", "graphopt.moe_route.default"} & targets
    assert "graphopt.kv_cache_write.default" in targets and "graphopt.moe_experts.default" in targets
    ids = torch.tensor(PROMPTS[2:])
    assert torch.equal(compiled(ids), compiled(ids))                    # the eager graphs are untouched


def _stored_weight_linears_by_input(gm):
    by_input = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default and n.args[1].op == "get_attr":
            by_input.setdefault(n.args[0], []).append(n)
    return by_input


@pytest.fixture(scope="module")
def two_layer_program():
    """A 2-layer random model compiled by the eager backend: its Program, for for_inductor's rewrites."""
    return graphopt.compile(random_model(0, num_hidden_layers=2), backend="eager", progress=False, block_size=4).program


def test_projections_of_one_input_become_one_gemm_with_the_same_logits(two_layer_program):
    from graphopt.backends.base import fresh_cache_forward
    program, fused = two_layer_program, {}
    before = _stored_weight_linears_by_input(program.main)
    shared = sum(len(v) - 1 for v in before.values())
    assert shared >= 2 * 2                           # per layer: q_a_proj + kv_a_proj, gate_proj + up_proj
    gm = for_inductor(program.main, fused)
    after = _stored_weight_linears_by_input(gm)
    assert all(len(v) == 1 for v in after.values())
    assert sum(map(len, after.values())) == sum(map(len, before.values())) - shared
    assert len(fused) == sum(len(v) > 1 for v in before.values())
    ids = torch.tensor([PROMPTS[2]])
    torch.testing.assert_close(fresh_cache_forward(gm, program.cache, ids),
                               fresh_cache_forward(program.main, program.cache, ids), rtol=1e-5, atol=1e-5)
    for_inductor(program["prefill"], fused)          # the prefill graph reuses the same concatenated weights
    assert len(fused) == sum(len(v) > 1 for v in before.values())
    assert sum(map(len, _stored_weight_linears_by_input(program.main).values())) == sum(map(len, before.values()))


@pytest.mark.parametrize("preset, matmul", [("w8a8", "int8_matmul"), ("w4a8", "w4a8_matmul"), ("fp8", "fp8_linear")])
def test_quantised_matmuls_of_one_quantised_input_become_one_with_the_same_logits(preset, matmul):
    """After share_activation_quant the quantised linears of one input read one quantised value; fused,
    each dequantize reads its slice of one int32 product (bit-identical logits), or each fp8 linear its
    slice of one float32-accumulated product (the same to rounding)."""
    from graphopt.backends.base import fresh_cache_forward
    from graphopt.passes.base import count_ops
    from graphopt.quant import PRESETS, CalibrationConfig
    calibration = CalibrationConfig(sources=(("random", 1.0),), num_samples=2, seq_len=16)
    program = graphopt.compile(random_model(0, num_hidden_layers=2), backend="eager", progress=False, block_size=4,
                               quant=PRESETS[preset].replace(calibration=calibration)).program
    op = f"graphopt.{matmul}.default"
    inputs = {}
    for n in program.main.graph.nodes:
        if n.op == "call_function" and str(n.target) == op:
            inputs.setdefault(n.args[0], []).append(n)
    shared = sum(len(v) - 1 for v in inputs.values())
    assert shared >= 2 * 2                         # per layer: q_a + kv_a, gate + up
    fused = {}
    gm = for_inductor(program.main, fused)
    assert count_ops(gm)[op] == count_ops(program.main)[op] - shared and len(fused) == shared
    ids = torch.tensor([PROMPTS[2]])
    got, want = fresh_cache_forward(gm, program.cache, ids), fresh_cache_forward(program.main, program.cache, ids)
    if preset == "fp8":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


def test_decode_graphs_leave_the_moe_sum_over_k_to_inductor(monkeypatch, two_layer_program):
    """With the MoE kernel registered (CUDA), a few-row graph calls moe_expert_terms and sums over k in
    the graph, where the sum fuses into its consumer; the logits stay those of the graph it came from."""
    from graphopt.backends.base import fresh_cache_forward
    from graphopt.backends.inductor import kernels
    program = two_layer_program
    targets = lambda gm: [n.target for n in gm.graph.nodes if n.op == "call_function"]   # noqa: E731
    monkeypatch.setattr(kernels, "registered", lambda: ["moe_experts"])
    gm, prefill = for_inductor(program.main, few_rows=True), for_inductor(program.main, few_rows=False)
    experts = targets(program.main).count(torch.ops.graphopt.moe_experts.default)
    assert experts >= 1 and targets(prefill).count(torch.ops.graphopt.moe_experts.default) == experts
    assert torch.ops.graphopt.moe_experts.default not in targets(gm)
    assert targets(gm).count(torch.ops.graphopt.moe_expert_terms.default) == experts
    ids = torch.tensor([PROMPTS[2]])
    torch.testing.assert_close(fresh_cache_forward(gm, program.cache, ids),
                               fresh_cache_forward(program.main, program.cache, ids), rtol=1e-5, atol=1e-5)


def test_inductor_on_the_cpu_is_token_identical_to_greedy_decoding():
    model = random_model(0, num_hidden_layers=1, first_k_dense_replace=0)
    compiled = graphopt.compile(model, spec=graphopt.SpecConfig(num_speculative_tokens=1), backend="inductor",
                                progress=False, block_size=4, max_batch_size=4)
    assert compiled.backend == "inductor" and not compiled.executable.cuda_graphs
    assert compiled.generate(PROMPTS, max_new_tokens=8, ignore_eos=True) == [greedy_generate(model, p, 8) for p in PROMPTS]


# -- on the GPU ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_model():
    from graphopt.models import load
    return load(dtype=torch.float32, device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_cuda_graph_steps_are_token_identical_to_greedy_in_float32(gpu_model, k):
    spec = graphopt.SpecConfig(num_speculative_tokens=k) if k else None
    compiled = graphopt.compile(gpu_model, spec=spec, progress=False, max_batch_size=8)
    assert compiled.backend == "inductor" and compiled.executable.cuda_graphs
    ragged = PROMPTS + [[1, 7] * 9, [3]]
    want = [greedy_generate(gpu_model, p, 24) for p in ragged]
    assert compiled.generate(ragged, max_new_tokens=24, ignore_eos=True) == want          # 5 rows: the bucket of 8, padded
    ex = compiled.executable
    assert ex._bound                            # a graph bound to the engine's own batch rows
    assert compiled.generate(ragged[:1], max_new_tokens=24, ignore_eos=True) == want[:1]  # the bucket of 1
    sampled = compiled.generate(ragged, max_new_tokens=8, temperature=0.8, seed=3)
    assert sampled == compiled.generate(ragged, max_new_tokens=8, temperature=0.8, seed=3)
    # rows finishing at different steps move the batch to smaller buckets: each is captured once (its
    # copying graph, then a bound one); a repeat of a generation replays what it captured
    captures, steps = (ex.captures, ex.prefill_captures), ex.stats["steps"] if k else 0
    assert captures[0] <= 2 * 2 * len(ex.buckets) and 1 <= captures[1] <= 3
    assert compiled.generate(ragged, max_new_tokens=24, ignore_eos=True) == want
    assert (ex.captures, ex.prefill_captures) == captures
    if k:
        assert ex.stats["steps"] > steps        # counted inside the replayed graph
    if k:
        assert compiled.stats["acceptance_rate"] > 0.2


@pytest.mark.gpu
@cuda
def test_a_replayed_prefill_graph_equals_the_compiled_prefill_on_padded_rows_and_tokens(gpu_model):
    from graphopt.step.contract import IDLE_SAMPLING, SAMPLING_FIELDS, SpecPrefillInputs
    from graphopt.step.spec_step import as_outputs, prefill_args
    spec = graphopt.SpecConfig(num_speculative_tokens=1)
    ex = graphopt.compile(gpu_model, spec=spec, progress=False, max_batch_size=8).executable
    dev, (B, T) = ex.device, (3, 11)                          # bucket (4, 16, 2): a padding row and 5 tokens
    g = torch.Generator().manual_seed(1)
    params = {n: torch.full((B,), IDLE_SAMPLING[n], dtype=d, device=dev) for n, d in SAMPLING_FIELDS}
    params["max_pos"].fill_(40)
    inputs = lambda kv, mtp: SpecPrefillInputs(   # noqa: E731
        ids=torch.randint(3, ex.config.vocab_size, (B, T), generator=g).to(dev),
        lengths=torch.tensor([11, 4, 7], device=dev), start_pos=torch.zeros(B, dtype=torch.int64, device=dev),
        block_tables=torch.tensor([[1, 2], [3, 0], [4, 5]], device=dev), **params, kv_caches=kv, mtp_caches=mtp)
    kv, mtp = ex.new_caches(8)
    a = inputs(kv, mtp)
    kv2, mtp2 = [c.clone() for c in kv], [c.clone() for c in mtp]
    b = SpecPrefillInputs(**{**a.__dict__, "kv_caches": kv2, "mtp_caches": mtp2})
    with torch.no_grad():                               # as prefill() runs it: the same compiled graph
        want = as_outputs(ex._prefill(*prefill_args(a)))
    got = ex.prefill(b)
    assert ex.prefill_captures == 1 and next(iter(ex._prefill_graphs)) == (4, 16, 2)
    for name, w in want.__dict__.items():
        assert torch.equal(getattr(got, name), w), name
    for c, d in zip((*kv, *mtp), (*kv2, *mtp2)):       # the same slots written, the sink aside
        torch.testing.assert_close(d[1:], c[1:], rtol=1e-5, atol=1e-5)
    again = ex.prefill(b)                               # a replay: no new capture, the same tokens
    assert ex.prefill_captures == 1 and torch.equal(again.out_tokens, want.out_tokens)


@pytest.mark.gpu
@cuda
def test_inductor_forward_is_within_bf16_tolerance_of_eager():
    from graphopt.models import load
    model = load(dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()
    eager = graphopt.compile(model, backend="eager", progress=False)(ids).double()
    ind = graphopt.compile(model, backend="inductor", progress=False)(ids).double()
    assert ((ind - eager).norm() / eager.norm()) < 2e-2
    assert (ind.argmax(-1) == eager.argmax(-1)).float().mean() > 0.95
