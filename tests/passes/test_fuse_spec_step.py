"""fuse_spec_step: the captured main + MTP graphs and the acceptance become ONE step graph (and one
prefill graph) that is token-identical to plain greedy decoding and equal to the eager SpecStep."""

import functools

import pytest
import torch

from graphopt.step.provider import SpecStepProvider, speculative_generate
from graphopt.step.spec_step import SpecPrefill, SpecStep, decode_args
from graphopt.capture.step import capture_main, capture_mtp
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.passes.base import PassContext, count_ops
from graphopt.passes.fuse_spec_step import FuseSpecStepPass, build_spec_step, cache_layout, example_inputs, fuse
from graphopt.passes.invariants import check_invariants
from graphopt.passes.program import CompileState, GraphSignature, Program
from graphopt.passes.rewrite_mla_absorbed import RewriteMLAAbsorbedPass
from graphopt.step.contract import SpecStepInputs
from graphopt.step.paged import CacheLayout
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


def _program(model, main, mtp_graphs, spec):
    """The Program capture hands the pipeline: main + mtp0 .., the cache layout, the spec config."""
    layout = CacheLayout.for_config(model.config, BS, num_mtp=len(mtp_graphs))
    program = Program(model.config, layout, CompileState(spec=spec))
    program.set("main", main, GraphSignature(("input_ids", "positions", "slot_mapping", "block_tables", "kv_caches"),
                                             ("logits", "hidden")))
    for d, gm in enumerate(mtp_graphs):
        program.set(f"mtp{d}", gm, GraphSignature(("next_ids", "hidden", "positions", "slot_mapping", "block_tables",
                                                   "mtp_cache"), ("logits", "hidden")))
    return program


def test_pass_adds_greedy_step_and_prefill_graphs_for_k1_to_the_program(graphs):
    model, main, mtp = graphs
    program = _program(model, main, [mtp], SpecConfig(num_speculative_tokens=1))
    main_ops = count_ops(main)
    result = FuseSpecStepPass(sampling=False).run(program, PassContext(model_config=model.config))
    program = result.program
    assert program.names == ["main", "mtp0", "step", "prefill"]
    assert program.main is main and count_ops(main) == main_ops                   # main left as it was
    assert program.signatures["step"].inputs[0] == "tokens" and program.signatures["prefill"].inputs[0] == "ids"
    step, prefill = program["step"], program["prefill"]
    assert result.modified and result.matches == 1 and "k = 1" in result.notes[0]
    ops = count_ops(step)
    assert ops["graphopt.greedy_accept.default"] == 1 and "graphopt.sampling_probs.default" not in ops
    assert ops["graphopt.mla_attention.default"] == 2                             # main layer + MTP window
    out = step(*program.make_inputs["step"](5))                                  # inputs for later passes
    assert [tuple(t.shape) for t in out] == [(2, 2), (2,), (2, 2), (2,), (2,)]
    assert len(prefill(*program.make_inputs["prefill"](5))) == 5
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


def test_pass_reads_mtp_graphs_from_the_program_and_names_what_is_missing(graphs):
    model, main, mtp = graphs
    program = _program(model, main, [], SpecConfig(num_speculative_tokens=1))
    with pytest.raises(ValueError, match=r"needs the captured MTP graph\(s\)"):
        FuseSpecStepPass().run(program, PassContext(model_config=model.config))
    assert program.names == ["main"]
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


def test_spliced_graphs_carry_one_shape_env_and_a_symbolic_batch(graphs, fused):
    """The captured nodes are spliced in (no second trace): their meta["val"] must be rebuilt in the
    fused graph's fake mode, with the step's sizes (batch symbolic, 1+k tokens static)."""
    model, main, _ = graphs
    step, prefill = fused
    for gm in (step, prefill):
        vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        assert len({id(v.fake_mode) for v in vals}) == 1                         # one fake mode, one ShapeEnv
        assert "graphopt._step_graph.default" not in count_ops(gm)               # every stand-in replaced
    logits = next(n for n in step.graph.nodes if n.target is torch.ops.aten.linear.default
                  and n.meta["val"].shape[-1] == model.config.vocab_size)       # the main model's head
    batch, tokens, vocab = logits.meta["val"].shape
    tokens_in = next(n for n in step.graph.nodes if n.op == "placeholder").meta["val"]   # tokens [B, 1+k]
    assert isinstance(batch, torch.SymInt) and str(batch) == str(tokens_in.shape[0])
    assert tokens == 3 and vocab == model.config.vocab_size                      # k = 2: 1+k static
    # a weight the main and MTP graphs share (embedding, head) is one attribute of the fused graph
    targets = [n.target for n in step.graph.nodes if n.op == "get_attr"]
    held = [functools.reduce(getattr, t.split("."), step) for t in targets]
    assert len({id(w) for w in held}) == len(set(targets))                    # one name per tensor


def test_splice_refuses_a_graph_whose_output_size_is_not_an_input_size(graphs):
    from graphopt.capture.splice import GraphCall
    from graphopt.passes.fuse_spec_step import FunctionalStep
    _, main, _ = graphs
    GraphCall(FunctionalStep(main).graph_module, 12345).release()   # [B, T, vocab], [B, T, H], caches
    gm = torch.export.export(_Nonzero(), (torch.tensor([1, 0, 2]),), strict=False).module()
    with pytest.raises(ValueError, match="is not an input size"):
        GraphCall(gm, 12346)


class _Nonzero(torch.nn.Module):
    def forward(self, x):
        return (x.nonzero(),)   # a data-dependent size: no argument of a call holds it
