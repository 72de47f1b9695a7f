"""Pass manager: switches, error naming, verify mode, invariants, dumps — on a small exported graph."""

import copy

import pytest
import torch

from graphopt.passes.base import GraphPass, ModulePass, ModuleResult, PassContext, PassResult, count_ops
from graphopt.passes.dump import Dumper
from graphopt.passes.eliminate_dead_code import EliminateDeadCodePass
from graphopt.passes.invariants import InvariantError, check_invariants
from graphopt.passes.manager import PassError, PassManager, Phase, disabled_from_env
from graphopt.passes.program import CompileState, GraphSignature, Program
from graphopt.step.paged import CacheLayout


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.relu(x @ self.w.t()) + 1


def toy_graph(dead: bool = True):
    """The exported toy graph, plus (export removes dead code itself) a dead view and mul on x."""
    gm = torch.export.export(Toy(), (torch.randn(4, 8),)).run_decompositions({}).module()
    if dead:
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(x):
            view = gm.graph.call_function(torch.ops.aten.view.default, (x, [32]))
        with gm.graph.inserting_after(view):
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (view, 2))
        view.meta["val"] = x.meta["val"].view(32)
        mul.meta["val"] = view.meta["val"] * 2
        gm.recompile()
    return gm


def ctx():
    return PassContext(make_inputs=lambda seed: (torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)),))


class SwapReluForSigmoid(GraphPass):
    """A deliberately wrong pass: verify mode must catch it."""
    name = "swap_relu"

    def run(self, gm, c):
        n = 0
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.relu.default:
                node.target = torch.ops.aten.sigmoid.default
                n += 1
        return PassResult(gm, n > 0, n)


class Explode(GraphPass):
    name = "explode"

    def run(self, gm, c):
        raise RuntimeError("boom")


def test_dce_removes_dead_view_and_keeps_numerics():
    gm = toy_graph()
    before = count_ops(gm)
    x = torch.randn(4, 8)
    ref = gm(x)
    res = EliminateDeadCodePass().run(gm, ctx())
    gm.recompile()
    after = count_ops(gm)
    assert res.modified and res.matches >= 2
    assert before["aten.view.default"] == 1 and "aten.view.default" not in after
    assert after["aten.relu.default"] == 1
    torch.testing.assert_close(gm(x), ref)


def test_dce_leaves_a_graph_without_dead_code_alone():
    gm = toy_graph(dead=False)
    assert not EliminateDeadCodePass().run(gm, ctx()).modified


def test_verify_names_the_pass_that_changed_numerics():
    phases = [Phase("normalise", "t", [EliminateDeadCodePass(), SwapReluForSigmoid()])]
    with pytest.raises(PassError, match="pass 'swap_relu'.*tolerance.*passes before it: eliminate_dead_code"):
        PassManager(phases, verify=True).run(toy_graph(), ctx())
    # without verify the wrong pass goes through: verify is what catches it
    PassManager(phases, verify=False).run(toy_graph(), ctx())


def test_failing_pass_is_named_with_the_passes_before_it():
    phases = [Phase("normalise", "t", [EliminateDeadCodePass()]), Phase("spec", "t", [Explode()])]
    with pytest.raises(PassError, match="pass 'explode' \\(phase 'spec'\\).*after eliminate_dead_code.*boom"):
        PassManager(phases).run(toy_graph(), ctx())


def test_passes_can_be_switched_off_by_name(monkeypatch):
    phases = [Phase("normalise", "t", [EliminateDeadCodePass(), Explode()])]
    manager = PassManager(phases, disabled={"explode"})
    manager.run(toy_graph(), ctx())
    assert [(r.name, r.ran) for r in manager.records] == [("eliminate_dead_code", True), ("explode", False)]
    monkeypatch.setenv("GRAPHOPT_DISABLE_PASSES", "explode, swap_relu")
    assert disabled_from_env() == {"explode", "swap_relu"}
    with pytest.raises(ValueError, match="unknown pass.*nope"):
        PassManager(phases, disabled={"nope"})


def test_invariants_reject_inplace_ops_and_missing_meta():
    gm = toy_graph()
    check_invariants(gm, "ok")
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    relu.target = torch.ops.aten.relu_.default
    with pytest.raises(InvariantError, match="in-place"):
        check_invariants(gm, "x")
    relu.target = torch.ops.aten.relu.default
    del relu.meta["val"]
    with pytest.raises(InvariantError, match="no meta"):
        check_invariants(gm, "x")


def test_dumps_are_written_in_pipeline_order(tmp_path):
    phases = [Phase("normalise", "t", [EliminateDeadCodePass(), SwapReluForSigmoid()])]
    dumper = Dumper(tmp_path)
    manager = PassManager(phases, dumper=dumper)
    gm = manager.run(toy_graph(), ctx())
    dumper.write_final("main", gm)
    md = dumper.write_report(manager.records, {"note": "x"})
    names = sorted(p.name for p in (tmp_path / "main").iterdir())
    assert names[:4] == ["00.eliminate_dead_code.after.py", "00.eliminate_dead_code.before.py",
                         "01.swap_relu.after.py", "01.swap_relu.before.py"]
    assert "sigmoid" in (tmp_path / "main" / "01.swap_relu.after.py").read_text()
    assert "relu" in (tmp_path / "main" / "01.swap_relu.before.py").read_text()
    assert "f32[4, 8]" in (tmp_path / "main" / "00.eliminate_dead_code.before.py").read_text()
    assert "| main | normalise | swap_relu | changed | 1 |" in md
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")
    assert "aten.sigmoid.default | 0 | 1" in (tmp_path / "main" / "op_counts.md").read_text()
    assert "digraph" in (tmp_path / "main" / "final.dot").read_text()


# -- Programs: per-graph phases over every graph, module passes over the whole Program ----------------

def toy_program(**graphs) -> Program:
    program = Program(None, CacheLayout(1, 4, 8, torch.float32, torch.device("cpu")))
    make_inputs = ctx().make_inputs
    for name, gm in graphs.items():
        program.set(name, gm, GraphSignature(("x",), ("y",)), make_inputs)
    return program


class AddDoubled(ModulePass):
    """A module pass: adds graph "step" = 2 * main (a copy), and leaves main alone."""
    name = "add_doubled"

    def run(self, program, c):
        gm = copy.deepcopy(program.main)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (out.args[0][0], 2))
        mul.meta["val"] = out.args[0][0].meta["val"] * 2
        out.args = ((mul,),)
        gm.recompile()
        program.set("step", gm, GraphSignature(("x",), ("y",)))
        return ModuleResult(program, modified=True, matches=1, notes=["doubled main"])


def test_verify_checks_every_captured_graph_before_any_pass():
    broken = toy_graph()
    relu = next(n for n in broken.graph.nodes if n.target is torch.ops.aten.relu.default)
    del relu.meta["val"]
    manager = PassManager([Phase("normalise", "t", [EliminateDeadCodePass()])], verify=True)
    with pytest.raises(InvariantError, match="mtp0: after capture"):
        manager.run_program(toy_program(main=toy_graph(), mtp0=broken), PassContext())
    assert manager.records == []                                  # caught before the first pass ran
    PassManager(manager.phases, verify=False).run_program(toy_program(main=toy_graph(), mtp0=toy_graph()),
                                                          PassContext())


def test_graph_phases_run_over_every_graph_and_module_phases_once():
    phases = [Phase("normalise", "t", [EliminateDeadCodePass()]), Phase("step", "t", [AddDoubled()])]
    manager = PassManager(phases, verify=True)
    program = manager.run_program(toy_program(main=toy_graph(), mtp0=toy_graph()), PassContext())
    assert [(r.graph, r.name) for r in manager.records] == [("main", "eliminate_dead_code"),
                                                            ("mtp0", "eliminate_dead_code"), ("step", "add_doubled")]
    assert program.names == ["main", "mtp0", "step"]
    for name in ("main", "mtp0"):
        assert "aten.view.default" not in count_ops(program[name])
    x = torch.randn(4, 8)
    torch.testing.assert_close(program["step"](x), 2 * program.main(x))
    assert program.state.notes["step/add_doubled"] == "doubled main"       # pass notes reach the report
    assert program.state.records is manager.records


def test_a_phase_cannot_mix_graph_and_module_passes():
    with pytest.raises(TypeError, match="mixes graph passes and module passes"):
        Phase("bad", "t", [EliminateDeadCodePass(), AddDoubled()])


def test_pass_context_is_typed():
    with pytest.raises(TypeError, match="CompileOptions and a CompileState"):
        PassContext(options={"fold_max_bytes": 1})


# -- verify mode dispatches on what a pass declares it may change (GraphPass.numerics) --------------

class ScaleOutput(GraphPass):
    """Multiplies the graph's output by `factor`; `numerics` as given (a quant pass says "quantised")."""
    name = "scale_output"

    def __init__(self, factor: float, numerics: str = "close"):
        self.factor, self.numerics = factor, numerics

    def run(self, gm, c):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        y = out.args[0][0]
        with gm.graph.inserting_before(out):
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (y, self.factor))
        mul.meta["val"] = y.meta["val"] * self.factor
        out.args = ((mul,),)
        return PassResult(gm, True, 1)


def quant_ctx(output_names=()):
    return PassContext(make_inputs=ctx().make_inputs, state=CompileState(quant="w8a8"), output_names=output_names)


def test_a_close_pass_is_judged_by_its_tolerance_a_quantised_one_by_its_scheme():
    phases = lambda p: [Phase("quant", "t", [p])]
    with pytest.raises(PassError, match="pass 'scale_output' changed output 0 of graph 'main' beyond its tolerance"):
        PassManager(phases(ScaleOutput(1.02)), verify=True).run(toy_graph(), ctx())
    # the same 2% as quantisation error passes (this graph has no logits: only the sanity bound applies)
    manager = PassManager(phases(ScaleOutput(1.02, "quantised")), verify=True)
    manager.run(toy_graph(), quant_ctx())
    assert manager.records[0].notes == ["verify: other float values within relative error 2.00e-02 (bound 1)"]
    with pytest.raises(PassError, match="beyond what w8a8 may change: relative error 2 >= 1"):
        PassManager(phases(ScaleOutput(3.0, "quantised")), verify=True).run(toy_graph(), quant_ctx())


def test_quantised_logits_are_judged_as_next_token_distributions():
    phases = lambda p: [Phase("quant", "t", [p])]
    manager = PassManager(phases(ScaleOutput(1.02, "quantised")), verify=True)
    manager.run(toy_graph(), quant_ctx(("logits",)))
    note = manager.records[0].notes[0]     # 8 draws x 4 rows of the toy's [4, 8] output, as logits
    assert note.startswith("verify output 0 ('logits'): next-token KL") and "over 32 positions" in note
    with pytest.raises(PassError, match=r"output 0 \('logits'\) of graph 'main' beyond what w8a8 may change: "
                                        r"next-token KL .* > 0.1 \(top-1 agreement"):
        PassManager(phases(ScaleOutput(-1.0, "quantised")), verify=True).run(toy_graph(), quant_ctx(("logits",)))


def test_a_pass_declaring_an_unknown_check_is_refused():
    with pytest.raises(ValueError, match="numerics='approximately'; verify knows \\['close', 'pruned', 'quantised'\\]"):
        PassManager([Phase("t", "t", [ScaleOutput(1.0, "approximately")])])
