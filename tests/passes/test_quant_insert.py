"""quant_insert: targeted linears and expert matmuls become quantize -> int matmul -> dequantize ops that
compute exactly what the eager quantised model computes; skipped linears stay; C8 writes int8-grid latents."""

import pytest
import torch

from graphopt.passes.base import count_ops
from graphopt.passes.quant_calibrate import QuantCalibratePass
from graphopt.passes.quant_insert import QuantInsertPass
from graphopt.quant import PRESETS, QuantConfig, quantize_model
from graphopt.quant.graph_sites import find_sites


def _opts(config, inputs=None):
    return {"quant": config, "progress": False, **({"calibration_inputs": inputs} if inputs else {})}


def test_w8a8_rewrites_every_site_and_matches_the_eager_quantised_model(main_fp32, run):
    config = PRESETS["w8a8"]
    sites = find_sites(main_fp32.fresh(), config)
    linears = sum(s.kind == "linear" for s in sites)
    before = count_ops(main_fp32.step.graph_module)
    ran = run(main_fp32, [QuantInsertPass()], options=_opts(config))           # verify mode: invariants too
    after = count_ops(ran.graph_module)
    assert ran.record("quant_insert").matches == len(sites) == linears + 2   # + gate_up and down of the MoE layer
    assert after["graphopt.int8_matmul.default"] == after["graphopt.quantize_per_token.default"] == len(sites)
    assert after["graphopt.dequantize_int32.default"] == len(sites)
    # negative: the router gate and kv_b_proj (skipped by default) keep their float linears
    assert after["aten.linear.default"] == before["aten.linear.default"] - linears == 2 + 2
    assert after.get("aten.matmul.default", 0) == before["aten.matmul.default"] - 2
    gm = ran.graph_module
    assert not hasattr(gm.get_submodule("model.model.layers.0.self_attn.q_a_proj"), "weight")  # float weight dropped

    eager = quantize_model(main_fp32.model, config, torch.zeros(1, 4, dtype=torch.long), progress=False)
    args, args_eager = main_fp32.step.make_inputs(3), main_fp32.step.make_inputs(3)
    with torch.no_grad():
        logits, hidden = gm(*args)
        ids, pos, slots, blocks, caches = args_eager
        want_logits, want_hidden = eager(ids, pos, caches, slots, blocks, return_hidden=True)
    # the int8 products are exact; the float ops around them may round differently between the graph's
    # and the module's calls on some CPUs (seen: one float32 ulp on an AVX512-FP16 machine)
    torch.testing.assert_close(logits, want_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(args[4], caches))           # same cache writes


@pytest.mark.parametrize("preset", ["w4a8", "fp8_block", "w4a16", "w8a8_static"])
def test_other_schemes_write_their_own_op_sequence(main_fp32, run, outputs, preset):
    config = PRESETS[preset].replace(group_size=16)
    inputs = [main_fp32.step.make_inputs(s) for s in range(2)]
    ran = run(main_fp32, [QuantCalibratePass(), QuantInsertPass()], verify=False, options=_opts(config, inputs))
    ops = count_ops(ran.graph_module)
    n = ran.record("quant_insert").matches
    expect = {"w4a8": "graphopt.w4a8_matmul.default", "fp8_block": "graphopt.fp8_linear.default",
              "w4a16": "graphopt.dequantize_int4.default", "w8a8_static": "graphopt.quantize_per_tensor.default"}
    assert n > 0 and ops[expect[preset]] == n
    ref, got = outputs(main_fp32.step.graph_module, ran.graph_module, main_fp32.step.make_inputs)
    rel = float((got[0] - ref[0]).norm() / ref[0].norm())                    # logits
    assert 0 < rel < 0.15


@pytest.mark.parametrize("scheme", ["w4a8", "w4a16"])
def test_int4_weights_are_packed_in_the_graph_and_match_the_eager_model(main_fp32, run, scheme):
    config = QuantConfig(scheme, group_size=16)                               # RTN: no calibration
    ran = run(main_fp32, [QuantInsertPass()], verify=False, options=_opts(config))
    gm = ran.graph_module
    float_k = {n: t.shape[-1] for n, t in main_fp32.step.graph_module.state_dict().items()}
    weights = {n: t for n, t in gm.state_dict().items() if n.startswith("_quant_") and n.endswith("_weight")}
    assert len(weights) == ran.record("quant_insert").matches > 0
    for name, t in weights.items():                                           # two int4 a byte, in the Program
        assert t.dtype == torch.uint8, name
    attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    q_a = "_quant_model__layers__0__self_attn__q_a_proj_weight"
    assert attrs[q_a].meta["val"].dtype == torch.uint8
    assert 2 * weights[q_a].shape[-1] == float_k["model.model.layers.0.self_attn.q_a_proj.weight"]

    eager = quantize_model(main_fp32.model, config, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert torch.equal(eager.model.layers[0].self_attn.q_a_proj.weight, weights[q_a])  # the same packed bytes
    args, (ids, pos, slots, blocks, caches) = main_fp32.step.make_inputs(3), main_fp32.step.make_inputs(3)
    with torch.no_grad():
        logits, _ = gm(*args)
        want, _ = eager(ids, pos, caches, slots, blocks, return_hidden=True)
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)


def test_c8_writes_latents_on_the_int8_grid(main_fp32, run):
    inputs = [main_fp32.step.make_inputs(s) for s in range(2)]
    ran = run(main_fp32, [QuantCalibratePass(), QuantInsertPass()], verify=False,
              options=_opts(PRESETS["c8"], inputs))
    gm = ran.graph_module
    layers = main_fp32.config.num_hidden_layers
    ops = count_ops(gm)
    assert ops["graphopt.quantize_kv.default"] == ops["graphopt.dequantize_kv.default"] == layers
    assert "graphopt.int8_matmul.default" not in ops                          # c8 alone: linears untouched
    ids, pos, slots, blocks, caches = main_fp32.step.make_inputs(9)
    with torch.no_grad():
        gm(ids, pos, slots, blocks, caches)
    R = main_fp32.config.kv_lora_rank
    scale = getattr(gm, "_quant_model__layers__0__self_attn__kv_a_layernorm_kv_scale")
    written = caches[0].view(-1, caches[0].shape[-1])[slots.flatten(), :R]    # latents written this step
    steps = written / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_nothing_to_quantise_is_not_a_rewrite(main_fp32, run):
    ran = run(main_fp32, [QuantInsertPass()], options=_opts(QuantConfig("bf16")))
    assert not ran.record("quant_insert").modified
    assert count_ops(ran.graph_module) == count_ops(main_fp32.step.graph_module)


def test_fused_experts_become_quantized_moe_experts_equal_to_the_eager_model(main_fp32, run):
    from graphopt.passes.fuse_moe_experts import FuseMoeExpertsPass
    config = PRESETS["w8a8_smooth"]
    inputs = [main_fp32.step.make_inputs(s) for s in range(2)]
    fused = run(main_fp32, [FuseMoeExpertsPass()], verify=False).graph_module
    assert count_ops(fused)["graphopt.moe_experts.default"] == 1
    ran = run(main_fp32, [FuseMoeExpertsPass(), QuantCalibratePass(), QuantInsertPass()], verify=False,
              options=_opts(config, inputs))
    ops = count_ops(ran.graph_module)
    assert ops["graphopt.quantized_moe_experts.default"] == 1 and "graphopt.moe_experts.default" not in ops
    assert "aten.matmul.default" not in ops
    gm = ran.graph_module
    assert gm._quant_model__layers__1__mlp__experts__down_proj_smooth_inv.shape[:2] == (8, 1)  # per expert
    args = main_fp32.step.make_inputs(3)
    ids, pos, slots, blocks, caches = main_fp32.step.make_inputs(3)
    with torch.no_grad():
        ref = main_fp32.model(ids, pos, caches, slots, blocks)
        got = gm(*args)[0]
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.05


def test_fused_rtn_experts_compute_what_the_eager_quantised_model_computes(main_fp32, run):
    from graphopt.passes.fuse_moe_experts import FuseMoeExpertsPass
    ran = run(main_fp32, [FuseMoeExpertsPass(), QuantInsertPass()], verify=False, options=_opts(PRESETS["w8a8"]))
    eager = quantize_model(main_fp32.model, "w8a8", progress=False)
    args = main_fp32.step.make_inputs(4)
    ids, pos, slots, blocks, caches = main_fp32.step.make_inputs(4)
    with torch.no_grad():
        got = ran.graph_module(*args)
        want = eager(ids, pos, caches, slots, blocks, return_hidden=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


# -- SmoothQuant scope="input": one factor per tensor, shared by the quantised matmuls reading it ---------

def _smoothing(scope: str, **kw) -> QuantConfig:
    from graphopt.quant import SmoothQuantConfig
    return QuantConfig("w8a8", algorithms=(SmoothQuantConfig(0.5, scope=scope),), **kw)


def _eager_groups(model) -> set[tuple[str, ...]]:
    """quantize_model's groups (norm_readers) of the main layers with more than one quantised matmul:
    model-level names, without the float router."""
    from graphopt.quant.model_quant import norm_readers
    groups = {tuple(sorted(f"model.layers.{i}.{r}" for r in readers if not r.endswith("mlp.gate")))
              for i, layer in enumerate(model.model.layers) for readers in norm_readers(layer).values()}
    return {g for g in groups if len(g) > 1}


@pytest.mark.parametrize("fused", [False, True])
def test_scope_input_gives_the_readers_of_one_tensor_one_factor(main_fp32, run, fused):
    from graphopt.passes.fuse_moe_experts import FuseMoeExpertsPass
    from graphopt.quant.graph_sites import readers_of_one_input
    first = [FuseMoeExpertsPass()] if fused else []
    config = _smoothing("input")
    gm = run(main_fp32, first, verify=False).graph_module if first else main_fp32.fresh()
    groups = readers_of_one_input(find_sites(gm, config), config)
    names = {tuple(sorted(n for n, _ in g)) for g in groups}
    # q_a + kv_a in both layers; the dense gate + up; the experts' gate_up + the shared gate + up
    assert names == _eager_groups(main_fp32.model) and len(names) == 4
    # negative: a reader kept in 16 bit is in no group, so q_a_proj is left on its own
    skip = _smoothing("input", skip=(*config.skip, "*kv_a_proj_with_mqa"))
    kept = {tuple(sorted(n for n, _ in g)) for g in readers_of_one_input(find_sites(gm, skip), skip)}
    assert kept == {g for g in names if not any("q_a_proj" in n for n in g)}

    inputs = [main_fp32.step.make_inputs(s) for s in range(2)]
    ran = {scope: run(main_fp32, [*first, QuantCalibratePass(), QuantInsertPass()], verify=False,
                      options=_opts(_smoothing(scope), inputs)).graph_module for scope in ("input", "linear")}
    assert count_ops(ran["input"]) == count_ops(ran["linear"])          # the same op sequence
    inv = lambda scope, name: getattr(ran[scope], f"_quant_{name.replace('.', '__')}_smooth_inv")
    for group in names:
        assert all(torch.equal(inv("input", n), inv("input", group[0])) for n in group), group
        assert not torch.equal(inv("linear", group[0]), inv("linear", group[1])), group   # per linear: its own
    # negative: a matmul alone on its input keeps its own factor, and per-expert inputs one per expert
    for alone in ("model.layers.0.self_attn.q_b_proj", "model.layers.1.mlp.experts.down_proj"):
        assert torch.equal(inv("input", alone), inv("linear", alone))


@pytest.mark.parametrize("dense", [False, True])
def test_scope_input_compiles_to_what_the_eager_quantised_model_computes(dense):
    """One decoder layer (a MoE or a dense one), so both paths observe the same float activations
    (quantize_model calibrates each later layer on the quantised layers before it, the graph path on
    the float graph); verify mode on; the MoE model with its MTP graph."""
    import graphopt
    from graphopt.models.random import random_model
    from graphopt.quant import CalibrationConfig
    model = random_model(num_hidden_layers=1, first_k_dense_replace=int(dense))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    config = _smoothing("input", calibration=CalibrationConfig(tokens=ids))
    compiled = graphopt.compile(model, quant=config, spec=None if dense else "mtp", verify=True, progress=False)
    eager = quantize_model(model, config, ids, progress=False)
    assert "next-token KL" in compiled.report.notes["main/quant_insert"]        # judged by verify mode
    invs = {n: t for n, t in compiled.program["main"].state_dict().items() if n.endswith("_smooth_inv")}
    for name, t in invs.items():   # the eager model's factors (past attention: float rounding apart, ~1 ulp)
        path = name.removeprefix("_quant_").removesuffix("_smooth_inv").replace("__", ".")
        parent, _, leaf = path.rpartition(".")
        holder = (getattr(eager.get_submodule(parent), leaf.removesuffix("_proj")) if parent.endswith(".mlp.experts")
                  else eager.get_submodule(path))
        torch.testing.assert_close(t, holder.tensors()["smooth_inv"], msg=name)
    mlp = "mlp" if dense else "mlp.shared_experts"
    siblings = [("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), (f"{mlp}.gate_proj", f"{mlp}.up_proj")]
    siblings += [] if dense else [("mlp.experts.gate_up_proj", "mlp.shared_experts.up_proj")]
    layers = [("main", "model.layers.0")] + ([] if dense else [("mtp0", "mtp.0")])
    for graph, layer in layers:
        tensors = compiled.program[graph].state_dict()
        key = lambda n: f"_quant_{layer}.{n}_smooth_inv".replace(".", "__")
        for a, b in siblings:
            assert torch.equal(tensors[key(a)], tensors[key(b)]), (graph, a, b)
    test = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = compiled(test), eager(test)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
