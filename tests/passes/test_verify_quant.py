"""Verify mode judges a quant pass by what quantisation may change, on the embedded model in float32.

The embedded model is captured once (main + mtp0, ~15 s) and normalised once; each preset then runs
the pipeline's quant phase in verify mode on fresh copies of both graphs, as `graphopt.compile(...,
spec="mtp", verify=True)` does (a full compile per preset is 7-40 s). spec=None quantises the main
graph alone, the same graph judged the same way, so the main graph's verdict stands for spec=None.
Calibration runs on random valid steps of each graph rather than the text windows graphopt.compile
tokenises (~12 s per calibrated preset): the verdicts are about the check, not the calibration data.
One full `graphopt.compile(..., verify=True)` per spec setting (capture stubbed by the cached graphs)
covers the whole pipeline, ("mtp", "w8a8") being the issue's failing case; every preset through the
full compile is benchmarks/verify_quant.py (docs/passes.md quotes it).
"""

import copy

import pytest
import torch

import graphopt
import graphopt.models
from graphopt import api
from graphopt.capture.step import LayerGraphs, capture_main, capture_mtp
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassError, PassManager, Phase
from graphopt.passes.verify import CHECKS, QUANT_BUDGETS, QuantBudget, quant_budget
from graphopt.passes.pipeline import normalise_phase, quant_phase, spec_phase
from graphopt.passes.program import CompileOptions, CompileState, Program
from graphopt.passes.quant_calibrate import QuantCalibratePass
from graphopt.passes.quant_insert import QuantInsertPass
from graphopt.quant import PRESETS, QuantConfig
from graphopt.quant.schemes import SCHEMES
from graphopt.step.paged import CacheLayout

BLOCK = 16
OPTIONS = CompileOptions(progress=False)


@pytest.fixture(scope="module")
def embedded():
    """(model, captured main + mtp0, the Program after the normalise and spec phases)."""
    model = graphopt.models.load(dtype=torch.float32)
    layers = LayerGraphs(model, BLOCK)
    captured = [capture_main(model, BLOCK, layers=layers), capture_mtp(model, 0, BLOCK, layers=layers)]
    w = model.lm_head.weight
    layout = CacheLayout.for_config(model.config, BLOCK, w.dtype, w.device, num_mtp=1)
    program = Program.from_captured(copy.deepcopy(captured), model.config, layout)
    program = PassManager([normalise_phase(), spec_phase()]).run_program(
        program, PassContext(model.config, OPTIONS, state=program.state))
    return model, captured, program


def quantise(program: Program, quant, passes=None, graphs=("main", "mtp0")) -> tuple[Program, PassManager]:
    """The quant phase (or `passes`) in verify mode over fresh copies of `graphs`."""
    state = CompileState(quant=quant, calibration_inputs=lambda name: [program.make_inputs[name](s)
                                                                     for s in range(100, 132)])
    fresh = Program(program.model_config, program.cache, state)
    for name in graphs:
        fresh.set(name, copy.deepcopy(program[name]), program.signatures[name], program.make_inputs[name])
    phase = quant_phase() if passes is None else Phase("quant", "passes under test", passes)
    manager = PassManager([phase], verify=True)
    return manager.run_program(fresh, PassContext(program.model_config, OPTIONS, state=state)), manager


def test_every_scheme_has_a_budget_and_quant_insert_declares_its_check():
    assert {s for s, sch in SCHEMES.items() if sch.quantized} | {"c8"} == set(QUANT_BUDGETS)
    assert QuantInsertPass.numerics == "quantised" and QuantCalibratePass.numerics == "close"
    assert set(CHECKS) == {"close", "pruned", "quantised"}
    name, budget = quant_budget("w4a8_c8")      # the loosest scheme, plus what the int8 cache adds
    assert name == "w4a8 + c8"
    assert budget.kl == pytest.approx(QUANT_BUDGETS["w4a8"].kl + QUANT_BUDGETS["c8"].kl)
    assert budget.top1 == pytest.approx(QUANT_BUDGETS["w4a8"].top1 - (1 - QUANT_BUDGETS["c8"].top1))
    mixed = QuantConfig("w8a8", overrides={"*.mlp.experts": "w4a16"})
    w4a16 = QUANT_BUDGETS["w4a16"]
    assert quant_budget(mixed) == ("w4a16 + w8a8", QuantBudget(w4a16.kl, w4a16.top1))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_verify_passes_every_preset_on_the_embedded_model(embedded, preset):
    _, _, program = embedded
    _, manager = quantise(program, PRESETS[preset])
    inserted = [r for r in manager.records if r.name == "quant_insert"]
    assert [r.graph for r in inserted] == ["main", "mtp0"]
    for r in inserted:
        assert r.modified and r.matches > 0
        # the verdict is in the record: KL and top-1 of the logits, measured over 8 draws x 6 positions
        assert any("next-token KL" in n and "over 48 positions" in n for n in r.notes), r.notes


@pytest.mark.parametrize("spec, quant", [(None, "fp8"), ("mtp", "w8a8")])
def test_compile_with_verify_and_quantisation(embedded, monkeypatch, spec, quant):
    """The whole pipeline; ("mtp", "w8a8") is the issue's case, which stopped at quant_insert."""
    model, (main, mtp), _ = embedded
    monkeypatch.setattr(api, "capture_main", lambda m, bs, **kw: copy.deepcopy(main))
    monkeypatch.setattr(api, "capture_mtp", lambda m, d, bs, **kw: copy.deepcopy(mtp))
    compiled = graphopt.compile(model, spec=spec, quant=quant, verify=True, progress=False)
    graphs = ["main"] if spec is None else ["main", "mtp0"]
    assert [r.graph for r in compiled.report.records if r.name == "quant_insert"] == graphs
    assert all("next-token KL" in compiled.report.notes[f"{g}/quant_insert"] for g in graphs)


class CorruptScaleInsert(QuantInsertPass):
    """quant_insert with one bug: one weight scale multiplied by `factor` (0: zeroed)."""

    def __init__(self, target: str, factor: float):
        self.target, self.factor = target, factor

    def run(self, gm, ctx):
        result = super().run(gm, ctx)
        scale = getattr(gm, self.target)
        scale.mul_(self.factor)
        return result


@pytest.mark.parametrize("factor", [8.0, 0.0])
def test_verify_names_a_quant_pass_that_corrupts_a_scale(embedded, factor):
    _, _, program = embedded
    target = "_quant_model__layers__0__self_attn__o_proj_scale"
    assert hasattr(quantise(program, "w8a8", [QuantInsertPass()], graphs=("main",))[0].main, target)
    with pytest.raises(PassError, match=r"pass 'quant_insert' changed output 0 \('logits'\) of graph 'main' "
                                        r"beyond what w8a8 may change: next-token KL [0-9.e-]+ > "):
        quantise(program, "w8a8", [CorruptScaleInsert(target, factor)], graphs=("main",))
