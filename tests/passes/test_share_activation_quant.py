"""share_activation_quant: the linears of one input quantise it once, and the graph computes bit for bit
what it computed before (verify mode runs the pass with zero tolerance)."""

import operator

import pytest
import torch

from graphopt.passes.quant_calibrate import QuantCalibratePass
from graphopt.passes.quant_insert import QuantInsertPass
from graphopt.passes.share_activation_quant import QUANTISERS, ShareActivationQuantPass
from graphopt.quant import PRESETS, QuantConfig, SmoothQuantConfig

G = torch.ops.graphopt


def _quantisers_by_input(gm):
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in QUANTISERS:
            out.setdefault((n.target, n.args[0].name), []).append(n)
    return out


def _run(run, captured, config, share=True, verify=True):
    inputs = [captured.step.make_inputs(s) for s in range(2)]
    options = {"quant": config, "progress": False, "calibration_inputs": inputs}
    passes = [QuantCalibratePass(), QuantInsertPass()] + ([ShareActivationQuantPass()] if share else [])
    return run(captured, passes, verify=verify, options=options)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "fp8"])
def test_one_quantiser_per_input_and_the_same_outputs(main_fp32, run, preset):
    config = PRESETS[preset].replace(group_size=16)
    ran = _run(run, main_fp32, config)                    # verify mode: bit-identical outputs and caches
    before = _quantisers_by_input(_run(run, main_fp32, config, share=False, verify=False).graph_module)
    after = _quantisers_by_input(ran.graph_module)
    shared = sum(len(v) - 1 for v in before.values())
    assert shared >= 2 * 2                                # per layer: q_a + kv_a, gate + up (and shared experts)
    assert set(after) == set(before) and all(len(v) == 1 for v in after.values())
    assert ran.record("share_activation_quant").matches == shared
    # the integer matmuls of one input now read one quantised value node
    matmul = {"w8a8": G.int8_matmul.default, "w4a8": G.w4a8_matmul.default, "fp8": G.fp8_linear.default}[preset]
    readers = {}
    for n in ran.graph_module.graph.nodes:
        if n.op == "call_function" and n.target is matmul:
            assert n.args[0].target is operator.getitem
            readers.setdefault(n.args[0], []).append(n)
    assert sum(len(v) - 1 for v in readers.values()) == shared


def test_different_smoothing_vectors_are_not_merged_and_equal_ones_are(main_fp32, run):
    per_linear = _run(run, main_fp32, QuantConfig("w8a8", algorithms=(SmoothQuantConfig(0.5),)))
    assert per_linear.record("share_activation_quant").matches == 0          # each linear its own vector
    per_input = _run(run, main_fp32, QuantConfig("w8a8", algorithms=(SmoothQuantConfig(0.5, scope="input"),)))
    assert per_input.record("share_activation_quant").matches >= 2 * 2       # equal buffers: one quantiser
    assert all(len(v) == 1 for v in _quantisers_by_input(per_input.graph_module).values())


def test_the_pipeline_runs_it_after_quant_insert():
    from graphopt.passes.pipeline import quant_phase
    names = [p.name for p in quant_phase().passes]
    assert names.index("share_activation_quant") == names.index("quant_insert") + 1
