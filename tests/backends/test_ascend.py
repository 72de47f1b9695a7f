"""The ascend backend, as far as a machine without an NPU allows: the lowering plan covers every node of a
spec + w8a8 Program, the decomposition rewrite keeps the numbers, the torch_npu rewrite leaves no graphopt
op, and asking for the backend without torch_npu is a clear error."""

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils import _pytree as pytree

import graphopt
from graphopt import backends
from graphopt.backends.ascend import ASCEND_OPS, UnmappedOpError, check_plan, for_ascend, lowering_plan, summary
from graphopt.backends.ascend.npu_impls import FUSED, IMPLS, quant_linear
from graphopt.models.random import random_model

BS = 4


@pytest.fixture(scope="module")
def compiled():
    """spec k=1 + w8a8 on a one-MoE-layer random model (calibration: random valid steps)."""
    return graphopt.compile(random_model(0, num_hidden_layers=1, first_k_dense_replace=0),
                            spec=graphopt.SpecConfig(num_speculative_tokens=1), quant="w8a8", block_size=BS,
                            progress=False)


def test_every_graphopt_op_has_a_route():
    # ops named _* are compile-time stand-ins (capture/splice.py), never in a final graph
    ops = {f"graphopt.{q.split('::')[1]}.default" for q in OPDEFS if q.startswith("graphopt::") and "::_" not in q}
    assert ops and ops <= set(ASCEND_OPS), f"no route: {sorted(ops - set(ASCEND_OPS))}"
    fused = {name for pair in FUSED for name in pair}
    for name, route in ASCEND_OPS.items():
        assert route.kind in ("torch_npu", "decomposition")
        if route.kind == "torch_npu":                  # an implementation, alone or as half of a fused pair
            assert name in IMPLS or name in fused, name


def test_the_plan_maps_every_node_of_a_spec_w8a8_program(compiled):
    rows = check_plan(compiled.program)
    assert {r.graph for r in rows} == set(compiled.program.names)
    kinds = summary(rows)
    assert set(kinds) <= {"torch_npu", "decomposition", "aten", "python"}
    npu = kinds["torch_npu"]
    for op in ("graphopt.rms_norm.default", "graphopt.mla_paged_attention.default", "graphopt.kv_cache_write.default",
               "graphopt.quantize_per_token.default", "graphopt.int8_matmul.default", "graphopt.moe_experts.default"):
        assert npu.get(op, 0) > 0 or op == "graphopt.moe_experts.default" and "graphopt.quantized_moe_experts.default" \
            in kinds["decomposition"], op
    assert kinds["decomposition"]["graphopt.rejection_accept.default"] >= 1


def test_an_op_without_a_route_is_named():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.ops.graphopt_test_ascend.odd(x)

    torch.library.define("graphopt_test_ascend::odd", "(Tensor x) -> Tensor")
    torch.library.impl("graphopt_test_ascend::odd", "CompositeExplicitAutograd", lambda x: x + 1)
    torch.library.register_fake("graphopt_test_ascend::odd", lambda x: torch.empty_like(x))
    gm = torch.export.export(Odd(), (torch.ones(2),)).module()

    class P:
        graphs = {"main": gm}
    assert [r.route.kind for r in lowering_plan(P) if r.op.startswith("graphopt_test")] == ["unmapped"]
    with pytest.raises(UnmappedOpError, match="graphopt_test_ascend.odd.default"):
        check_plan(P)


@pytest.mark.parametrize("graph", ["step", "prefill"])
def test_the_decomposed_graph_computes_the_same_numbers(compiled, graph):
    program = compiled.program
    gm = program[graph]
    lowered = for_ascend(gm, npu=False)
    assert not [n for n in lowered.graph.nodes if "graphopt" in str(n.target) and "function" not in str(n.target)
                and isinstance(n.target, torch._ops.OpOverload)]
    ref_args, got_args = program.make_inputs[graph](3), program.make_inputs[graph](3)
    ref, got = gm(*ref_args), lowered(*got_args)
    for a, b in zip(pytree.tree_leaves((ref, ref_args)), pytree.tree_leaves((got, got_args))):
        assert torch.equal(a, b)                           # outputs and the caches written in place


def test_the_npu_graph_calls_torch_npu_kernels_and_no_graphopt_op(compiled):
    lowered = for_ascend(compiled.program["step"], npu=True)
    targets = [n.target for n in lowered.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace == "graphopt"]
    assert quant_linear in targets                          # int8_matmul + dequantize_int32 fused
    assert IMPLS["graphopt.kv_cache_write.default"] in targets and IMPLS["graphopt.rms_norm.default"] in targets


def test_asking_for_ascend_without_torch_npu_says_what_is_missing():
    backend = backends.get("ascend")
    with pytest.raises(RuntimeError, match="torch_npu.*missing: torch_npu"):
        backend.check()


def test_compile_for_ascend_fails_before_capture(monkeypatch):
    from graphopt import api

    def no_capture(*a, **k):
        raise AssertionError("captured before checking the backend")
    monkeypatch.setattr(api, "capture_main", no_capture)
    with pytest.raises(RuntimeError, match="needs torch_npu and torchair"):
        graphopt.compile(random_model(0, num_hidden_layers=1), backend="ascend", progress=False)
