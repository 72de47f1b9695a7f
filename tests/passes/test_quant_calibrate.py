"""quant_calibrate: every site observed (every expert on every token), the graph left exactly as it was."""

import torch

from graphopt.passes.base import count_ops
from graphopt.passes.program import CompileOptions, CompileState
from graphopt.passes.quant_calibrate import QuantCalibratePass
from graphopt.quant import PRESETS, QuantConfig, SmoothQuantConfig
from graphopt.quant.graph_sites import find_sites


def _ctx_options(config, inputs=None):
    opts = {"quant": config, "progress": False}
    if inputs is not None:
        opts["calibration_inputs"] = inputs
    return opts


def test_observes_every_site_and_leaves_the_graph_unchanged(main_fp32, run, outputs):
    config = PRESETS["w8a8_c8"].replace(algorithms=(SmoothQuantConfig(0.5),))
    inputs = [main_fp32.step.make_inputs(s) for s in range(3)]
    before = main_fp32.fresh()
    from graphopt.passes.base import PassContext
    ctx = PassContext(main_fp32.config, CompileOptions(progress=False), main_fp32.step.make_inputs,
                      state=CompileState(quant=config, calibration_inputs=inputs))
    result = QuantCalibratePass().run(before, ctx)
    sites = find_sites(main_fp32.fresh(), config)
    observers = ctx.state.quant_observers
    assert result.matches == len(sites) == len(observers) and not result.modified
    assert {s.kind for s in sites} == {"linear", "experts", "latent"}
    tokens = sum(int(a[0].numel()) for a in inputs)
    down = observers["model.layers.1.mlp.experts.down_proj"]
    assert down.per_expert and down.tokens == tokens                       # each expert: every token
    assert (down.channel_amax() > 0).all()
    assert observers["model.layers.0.self_attn.q_a_proj"].tokens == tokens
    assert count_ops(result.graph_module) == count_ops(main_fp32.step.graph_module)
    ref, got = outputs(main_fp32.step.graph_module, result.graph_module, main_fp32.step.make_inputs)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_calibration_free_configs_do_not_run_the_graph(main_fp32, run):
    for config in (PRESETS["w8a8"], PRESETS["w4a16"], QuantConfig("bf16")):
        ran = run(main_fp32, [QuantCalibratePass()], options=_ctx_options(config))
        rec = ran.record("quant_calibrate")
        assert rec.matches == 0 and not rec.modified and not rec.notes


def test_without_calibration_inputs_it_says_it_used_random_steps(main_fp32, run):
    config = PRESETS["w8a8_smooth"].replace(calibration=PRESETS["w8a8"].calibration.__class__(num_samples=2))
    ran = run(main_fp32, [QuantCalibratePass()], options=_ctx_options(config))
    assert "random valid steps" in ran.record("quant_calibrate").notes[0]


def test_step_inputs_feed_real_windows_to_the_main_graph(main_fp32):
    from graphopt.passes.base import PassContext
    from graphopt.quant.calibration import step_inputs
    windows = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(4))
    inputs = step_inputs(main_fp32.model, windows, block_size=16, batch=2)
    assert len(inputs["main"]) == 2 and len(inputs["mtp0"]) == 2
    config = PRESETS["w8a8_smooth"]
    ctx = PassContext(main_fp32.config, CompileOptions(progress=False), None, "main",
                      state=CompileState(quant=config, calibration_inputs=inputs.__getitem__))
    QuantCalibratePass().run(main_fp32.fresh(), ctx)
    assert ctx.state.quant_observers["model.layers.0.self_attn.q_a_proj"].tokens == windows.numel()
