"""prune_routed_experts: the decode steps' routers get the threshold (a visible argument), the pruned
graph computes what the eager pruned model computes, prefill and other graphs are left alone, and
the option's bad values and missing passes are clear errors before any work."""

import pytest
import torch

import graphopt
from graphopt.models.random import random_model
from graphopt.passes.base import PassContext, count_ops
from graphopt.passes.fuse_moe_routing import FuseMoeRoutingPass
from graphopt.passes.manager import PassManager, Phase
from graphopt.passes.program import CompileOptions, CompileState
from graphopt.passes.prune_routed_experts import PruneRoutedExpertsPass
from graphopt.quant.expert_pruning import prune_experts
from graphopt.step.model_step import MainStep

ROUTE = torch.ops.graphopt.moe_route.default


def _routes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ROUTE]


def _run(captured, graph_name: str, threshold: float, verify: bool = False):
    ctx = PassContext(captured.config, CompileOptions(moe_prune_threshold=threshold), captured.step.make_inputs,
                      graph_name, CompileState())
    manager = PassManager([Phase("test", "under test", [FuseMoeRoutingPass(), PruneRoutedExpertsPass()])],
                          verify=verify)
    return manager.run(captured.fresh(), ctx), manager.records


def test_decode_graph_routers_get_the_threshold_and_match_the_eager_pruned_model(main_fp32):
    gm, records = _run(main_fp32, "step", 0.45, verify=True)    # verify: the "pruned" check holds
    (route,) = _routes(gm)
    assert route.args[10] == 0.45 and len(route.args) == 11
    rec = records[-1]
    assert rec.name == "prune_routed_experts" and rec.modified and rec.matches == 1
    assert rec.ops_before == rec.ops_after                        # an argument changed, no op added
    # (2 experts per token in the random model: a share below 0.45 drops the second)
    # numerics: the captured main step with pruned routing equals the eager model with pruned routers
    inputs = main_fp32.step.make_inputs(5)
    eager_inputs = main_fp32.step.make_inputs(5)
    with torch.no_grad():
        logits = gm(*inputs)[0]
        expected = MainStep(prune_experts(main_fp32.model, 0.45))(*eager_inputs)[0]
        unpruned = MainStep(main_fp32.model)(*main_fp32.step.make_inputs(5))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, unpruned, atol=1e-4)        # pruning did change something


@pytest.mark.parametrize("graph_name, threshold", [("prefill", 0.3), ("main", 0.3), ("step", 0.0)])
def test_not_pruned_outside_decode_steps_or_at_zero(main_fp32, graph_name, threshold):
    gm, records = _run(main_fp32, graph_name, threshold)
    (route,) = _routes(gm)
    assert len(route.args) == 10 and not records[-1].modified


@pytest.fixture(scope="module")
def model():
    return random_model()


def test_compile_prunes_step_graphs_only_and_the_artefact_keeps_it(model, tmp_path):
    compiled = graphopt.compile(model, block_size=4, progress=False, moe_prune_threshold=0.25)
    moe_layers = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    for name in ("step", "step_greedy"):
        assert [n.args[10:] for n in _routes(compiled.graphs[name])] == [(0.25,)] * moe_layers, name
    for name in ("prefill", "main"):
        assert [len(n.args) for n in _routes(compiled.graphs[name])] == [10] * moe_layers, name
    assert count_ops(compiled.graphs["step"])["graphopt.moe_route.default"] == moe_layers > 0
    assert "step/prune_routed_experts" in compiled.report.notes
    out = compiled.generate([[1, 2, 3], [4, 5]], max_new_tokens=5, ignore_eos=True)
    assert [len(o) for o in out] == [5, 5]
    compiled.save(tmp_path / "artefact")
    loaded = graphopt.load_compiled(tmp_path / "artefact")
    assert [n.args[10:] for n in _routes(loaded.graphs["step"])] == [(0.25,)] * moe_layers
    assert loaded.options.moe_prune_threshold == 0.25
    assert loaded.generate([[1, 2, 3], [4, 5]], max_new_tokens=5, ignore_eos=True) == out


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "0.2"])
def test_bad_threshold_is_a_clear_error(model, bad):
    with pytest.raises(ValueError, match="moe_prune_threshold must be a number in \\[0, 1\\]"):
        graphopt.compile(model, progress=False, moe_prune_threshold=bad)


def test_pruning_without_fused_routers_is_refused_before_capture(model):
    with pytest.raises(ValueError, match="moe_prune_threshold needs the \\['fuse_moe_routing'\\] pass"):
        graphopt.compile(model, progress=False, moe_prune_threshold=0.2, disable_passes=["fuse_moe_routing"])


def test_verify_check_names_what_pruning_must_not_change():
    from graphopt.passes.verify import CHECKS, Mismatch, Run
    judge = lambda before, after: CHECKS["pruned"].judge(PruneRoutedExpertsPass(), PassContext(), [(before, after)])
    tokens, cache = torch.tensor([[1, 2]]), torch.ones(3, 4)
    assert judge(Run([tokens], [cache]), Run([tokens + 1], [cache * 1.1]))   # other tokens, a nearby cache: fine
    with pytest.raises(Mismatch, match="non-finite"):
        judge(Run([tokens], [cache]), Run([tokens], [cache * float("inf")]))
    with pytest.raises(Mismatch, match="changed integer input 1"):
        judge(Run([tokens], [cache, tokens]), Run([tokens], [cache, tokens + 1]))
    with pytest.raises(Mismatch, match="changed output 0"):
        judge(Run([tokens], []), Run([tokens[:, :1]], []))
