"""quant_calibrate: every site observed (each expert on its routed tokens), the graph left exactly as it
was, and the record saying which data calibrated it."""

import pytest
import torch

from graphopt.passes.base import count_ops
from graphopt.passes.program import CompileOptions, CompileState
from graphopt.passes.quant_calibrate import QuantCalibratePass
from graphopt.quant import PRESETS, CalibrationConfig, QuantConfig, SmoothQuantConfig
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


def test_random_steps_only_when_the_random_source_is_named(main_fp32, run):
    random_source = CalibrationConfig(sources=(("random", 1.0),), num_samples=2)
    ran = run(main_fp32, [QuantCalibratePass()], options=_ctx_options(PRESETS["w8a8_smooth"].replace(
        calibration=random_source)))
    assert "2 random valid steps (the 'random' source" in ran.record("quant_calibrate").notes[0]
    # negative: the default (text) source with no calibration inputs is an error, not random steps
    with pytest.raises(Exception, match=r"no calibration inputs.*calibration_inputs.*'random'"):
        run(main_fp32, [QuantCalibratePass()], options=_ctx_options(PRESETS["w8a8_smooth"]))


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


def _routed_run(main_fp32, gm, min_expert_tokens):
    """quant_calibrate on `gm` over real windows, and the eager model's own routing of the same windows."""
    from graphopt.passes.base import PassContext
    from graphopt.quant.calibration import GraphCalibration, step_inputs
    windows = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(5))
    inputs = step_inputs(main_fp32.model, windows, block_size=16, batch=3)
    config = PRESETS["w8a8_static"].replace(calibration=CalibrationConfig(min_expert_tokens=min_expert_tokens))
    ctx = PassContext(main_fp32.config, CompileOptions(progress=False), None, "main",
                      state=CompileState(quant=config, calibration_inputs=GraphCalibration(inputs, "3 test windows")))
    result = QuantCalibratePass().run(gm, ctx)
    experts = main_fp32.model.model.layers[1].mlp.experts
    seen = []
    hook = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[2])))
    with torch.no_grad():
        ids, pos, slots, tables, caches = inputs["main"][0]
        main_fp32.model(ids, pos, [torch.zeros_like(c) for c in caches], slots, tables)
    hook.remove()
    x, chosen = seen[0]                                                    # [N, H], [N, k]
    routed = torch.zeros(x.shape[0], experts.gate_up_proj.shape[0], dtype=torch.bool).scatter_(1, chosen, True).T
    g, u = torch.matmul(x, experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    h = torch.nn.functional.silu(g) * u                                    # [E, N, I]
    return result, ctx.state.quant_observers["model.layers.1.mlp.experts.down_proj"], h, routed


@pytest.mark.parametrize("fused", [False, True])
def test_each_expert_is_observed_on_its_routed_tokens(main_fp32, run, fused):
    from graphopt.passes.fuse_moe_experts import FuseMoeExpertsPass
    gm = run(main_fp32, [FuseMoeExpertsPass()], verify=False).graph_module if fused else main_fp32.fresh()
    assert count_ops(gm).get("graphopt.moe_experts.default", 0) == int(fused)
    result, down, h, routed = _routed_run(main_fp32, gm, min_expert_tokens=1)
    assert down.expert_tokens.tolist() == routed.sum(1).tolist() and down.tokens == 36
    for e in range(h.shape[0]):
        want = h[e][routed[e]].abs().amax(0) if routed[e].any() else h[e].abs().amax(0)
        torch.testing.assert_close(down.channel_amax()[e], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(down.channel_amax(), h.abs().amax(1))       # not the dense statistics
    assert result.notes[0] == "calibrated on 1 steps (36 tokens) of 3 test windows"


def test_the_record_lists_the_experts_that_fell_back_to_every_token(main_fp32):
    result, down, h, routed = _routed_run(main_fp32, main_fp32.fresh(), min_expert_tokens=10)
    counts = routed.sum(1)
    expected = [e for e in range(len(counts)) if counts[e] < 10]
    assert 0 < len(expected) < len(counts) and down.dense_experts() == expected
    assert f"model.layers.1.mlp.experts.down_proj: experts {expected} routed fewer than 10 tokens" in result.notes[1]
    for e in expected:
        torch.testing.assert_close(down.channel_amax()[e], h[e].abs().amax(0), rtol=1e-5, atol=1e-6)


def test_compile_records_the_data_and_refuses_text_without_a_tokenizer_before_capture(monkeypatch):
    import graphopt
    from graphopt import api
    from graphopt.models.random import random_model
    model = random_model(num_hidden_layers=2)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    config = PRESETS["w8a8_smooth"].replace(calibration=CalibrationConfig(tokens=ids))
    compiled = graphopt.compile(model, quant=config, progress=False)
    assert compiled.report.notes["main/quant_calibrate"].startswith(
        "calibrated on 1 steps (24 tokens) of 2 windows x 12 tokens of CalibrationConfig.tokens (token ids)")
    monkeypatch.setattr(api, "capture_main", lambda *a, **kw: pytest.fail("captured before checking the data"))
    with pytest.raises(ValueError, match=r"'default' needs the model's tokenizer"):
        graphopt.compile(model, quant="w8a8_smooth", progress=False)        # a random model has none
