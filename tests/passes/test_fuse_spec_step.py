"""fuse_spec_step: the captured main + MTP graphs and the acceptance become ONE step graph (and one
prefill graph) that is token-identical to plain greedy decoding and equal to the eager SpecStep."""

import pytest
import torch

from graphopt.capture.spec_step import SpecPrefill, SpecStep, SpecStepProvider, decode_args, speculative_generate
from graphopt.capture.step import capture_main, capture_mtp
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.passes.base import PassContext, count_ops
from graphopt.passes.fuse_spec_step import FuseSpecStepPass, build_spec_step, cache_layout, example_inputs, fuse
from graphopt.passes.invariants import check_invariants
from graphopt.passes.rewrite_mla_absorbed import RewriteMLAAbsorbedPass
from graphopt.runtime.step_api import SpecStepInputs
from graphopt.spec import SpecConfig, resolve_spec

BS = 4


@pytest.fixture(scope="module")
def graphs():
    """One main layer and one MTP layer, captured once, MLA rewritten as the spec phase does."""
    model = random_model(0, num_hidden_layers=1, first_k_dense_replace=2)
    main, mtp = capture_main(model, BS).graph_module, capture_mtp(model, 0, BS).graph_module
    for gm in (main, mtp):
        RewriteMLAAbsorbedPass().run(gm, PassContext())
        gm.recompile()
    return model, main, mtp


@pytest.fixture(scope="module")
def fused(graphs):
    model, main, mtp = graphs
    return build_spec_step(main, [mtp], model.config, SpecConfig(num_speculative_tokens=2), BS)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def test_one_graph_holds_main_model_mtp_layer_and_acceptance(fused):
    step, prefill = fused
    for gm in (step, prefill):
        weights = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        assert any(".model.layers.0.self_attn." in w for w in weights)            # the main model's layer
        assert any(".model.mtp.0.self_attn." in w for w in weights)               # the MTP layer
        assert any(".model.mtp.0.eh_proj." in w for w in weights)
        assert {n.target for n in gm.graph.nodes if n.op == "call_module"} <= {"_guards_fn"}   # flat
        check_invariants(gm, "fused spec step")
    ops = count_ops(step)
    assert ops["graphopt.rejection_accept.default"] == 1 and ops["graphopt.sampling_probs.default"] == 1
    # attention: main layer, MTP over the 1+k window, MTP once more for the chained second draft
    assert ops["graphopt.mla_attention.default"] == 3 and ops["aten.embedding.default"] == 3
    assert count_ops(prefill)["graphopt.sample_from_probs.default"] == 1
    placeholders = [n.name for n in step.graph.nodes if n.op == "placeholder"]
    assert placeholders[:11] == ["tokens", "start_pos", "block_tables", "temperature", "top_k", "top_p", "min_p",
                                 "seed", "eos_token_id", "max_pos", "active"]


def test_fused_graphs_are_token_identical_to_greedy_decoding(graphs, fused):
    model = graphs[0]
    ps = prompts([1, 5, 9, 14])
    provider = SpecStepProvider(*fused, model.config, 2, BS)
    assert speculative_generate(provider, ps, 12) == [greedy_generate(model, p, 12) for p in ps]
    assert speculative_generate(provider, ps[1:2], 7) == [greedy_generate(model, ps[1], 7)]   # batch of 1


def test_pass_builds_greedy_graphs_for_k1_from_the_context(graphs):
    model, main, mtp = graphs
    ctx = PassContext(model_config=model.config, options={"spec": SpecConfig(num_speculative_tokens=1)},
                      state={"mtp_graphs": [mtp]})
    result = FuseSpecStepPass(sampling=False).run(main, ctx)
    step, prefill = result.graph_module, ctx.state["spec_prefill_graph"]
    assert result.modified and result.matches == 1 and "k = 1" in result.notes[0]
    ops = count_ops(step)
    assert ops["graphopt.greedy_accept.default"] == 1 and "graphopt.sampling_probs.default" not in ops
    assert ops["graphopt.mla_attention.default"] == 2                             # main layer + MTP window
    out = step(*ctx.make_inputs(5))                                              # inputs for later passes
    assert [tuple(t.shape) for t in out] == [(2, 2), (2,), (2, 2), (2,), (2,)]
    provider = SpecStepProvider(step, prefill, model.config, 1, BS)
    ps = prompts([3, 8, 2], seed=1)
    assert speculative_generate(provider, ps, 10) == [greedy_generate(model, p, 10) for p in ps]


def test_greedy_step_graph_for_k3(graphs):
    model, main, mtp = graphs
    step = fuse(SpecStep(main, [mtp], 3, BS, sampling=False), model.config)
    assert count_ops(step)["graphopt.mla_attention.default"] == 4                 # + 2 chained drafts
    provider = SpecStepProvider(step, SpecPrefill(main, [mtp], 3, BS, sampling=False), model.config, 3, BS)
    ps = prompts([3, 8, 2], seed=3)
    assert speculative_generate(provider, ps, 10) == [greedy_generate(model, p, 10) for p in ps]


def test_fused_step_equals_eager_spec_step_when_sampling(graphs, fused):
    model, main, mtp = graphs
    eager = SpecStep(main, [mtp], 2, BS)
    B, M = 3, 6
    g = torch.Generator().manual_seed(3)
    kv = [torch.randn(1 + B * M, BS, model.config.kv_cache_dim, generator=g)]
    mtp_caches = [torch.randn(1 + B * M, BS, model.config.kv_cache_dim, generator=g)]
    inputs = SpecStepInputs(
        tokens=torch.randint(0, 97, (B, 3), generator=g), start_pos=torch.tensor([5, 0, 13]),
        block_tables=(1 + torch.arange(B * M)).view(B, M), temperature=torch.tensor([0.0, 0.8, 1.5]),
        top_k=torch.tensor([0, 20, 0]), top_p=torch.tensor([1.0, 0.9, 0.7]), min_p=torch.tensor([0.0, 0.0, 0.05]),
        seed=torch.tensor([1, 2, 3]), eos_token_id=torch.tensor([-1, 4, -1]), max_pos=torch.tensor([40, 40, 15]),
        active=torch.tensor([True, True, True]), kv_caches=kv, mtp_caches=mtp_caches)
    clone = lambda args: (*args[:-2], [c.clone() for c in args[-2]], [c.clone() for c in args[-1]])
    layout = cache_layout(main)
    for args in (decode_args(inputs), example_inputs(layout, 1, 2, 97, False, seed=4)):
        args_a, args_b = clone(args), clone(args)
        with torch.no_grad():
            want, got = eager(*args_a), fused[0](*args_b)
        for a, b in zip(want, got):
            assert torch.equal(a, b)
        for a, b in zip(args_a[-2] + args_a[-1], args_b[-2] + args_b[-1]):   # caches written the same way
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_pass_reads_mtp_graphs_from_the_context_and_names_what_is_missing(graphs):
    model, main, mtp = graphs
    ctx = PassContext(model_config=model.config, options={"spec": SpecConfig(num_speculative_tokens=1)})
    with pytest.raises(ValueError, match=r"needs the captured MTP graph\(s\)"):
        FuseSpecStepPass().run(main, ctx)
    with pytest.raises(ValueError, match="block_size = 8 but the main graph was captured with block_size 4"):
        build_spec_step(main, [mtp], model.config, SpecConfig(num_speculative_tokens=1), 8)
    with pytest.raises(TypeError, match="spec_config must be a graphopt.SpecConfig or None"):
        build_spec_step(main, [mtp], model.config, "mtp", BS)


def test_spec_config_is_validated_with_the_accepted_values():
    assert resolve_spec("mtp") == SpecConfig(method="mtp", num_speculative_tokens=1) and resolve_spec(None) is None
    assert resolve_spec(SpecConfig(num_speculative_tokens=3)).num_speculative_tokens == 3
    with pytest.raises(ValueError, match=r"SpecConfig.method = 'eagle' is not supported; accepted values: 'mtp'"):
        SpecConfig(method="eagle")
    for bad in (0, 8, True, "2"):
        with pytest.raises(ValueError, match=r"accepted values: integers 1..7"):
            SpecConfig(num_speculative_tokens=bad)
    with pytest.raises(ValueError, match=r"spec = 'medusa' is not supported; accepted values: None, 'mtp'"):
        resolve_spec("medusa")
