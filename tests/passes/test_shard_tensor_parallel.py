"""shard_tensor_parallel: heads, dense / shared MLPs and the vocabulary split over tp ranks.

Graph-level tests run the pass for one rank without a process group (it only rewrites graphs); the
parity tests run real gloo process groups in spawned processes and compare the sharded greedy output
with the unsharded model token for token (float32), and W8A8 logits bit for bit."""

import torch
import pytest

from graphopt.passes.sharding import ShardError, count_collectives, weight_site
from graphopt.passes.shard_tensor_parallel import ShardTensorParallelPass, site_role

from shard_helpers import ctx, normalised_program, plan
from sharded_parity import run_parity


def _attr(gm, name_part):
    nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.name.endswith(name_part)]
    assert nodes, name_part
    return nodes[0]


def test_site_names_and_roles():
    assert weight_site("model.model.layers.0.self_attn.o_proj.weight") == ("model.layers.0.self_attn.o_proj", "weight")
    assert weight_site("_quant_model__layers__3__mlp__shared_experts__up_proj_scale") == \
        ("model.layers.3.mlp.shared_experts.up_proj", "scale")
    assert weight_site("model.model.layers.1.mlp.experts.gate_up_proj") == \
        ("model.layers.1.mlp.experts", "gate_up_proj")
    assert weight_site("model.mtp.0.shared_head.head.weight") == ("mtp.0.shared_head.head", "weight")
    assert site_role("model.layers.0.self_attn.q_b_proj") == "column"
    assert site_role("mtp.0.mlp.shared_experts.down_proj") == "row"
    assert site_role("lm_head") == site_role("mtp.0.shared_head.head") == "vocab"
    for replicated in ("model.layers.0.self_attn.kv_a_proj_with_mqa", "model.layers.1.mlp.gate", "mtp.0.eh_proj",
                       "model.layers.1.mlp.experts", "model.layers.0.self_attn.q_a_proj"):
        assert site_role(replicated) is None, replicated


@pytest.mark.parametrize("rank", [0, 1])
def test_heads_mlp_and_vocab_split_with_one_collective_each(rank):
    model, program = normalised_program()
    c = model.config
    before = program.main
    result = ShardTensorParallelPass(plan(rank)).run(program, ctx(model))
    gm = result.program.main
    assert gm is not before and count_collectives(before) == {"all_reduce": 0, "all_gather": 0}   # input kept
    # one all_reduce per row-parallel linear (o_proj and down_proj of both layers), one gather of the logits
    assert count_collectives(gm) == {"all_reduce": 2 * c.num_hidden_layers, "all_gather": 1}
    h, qk = c.num_attention_heads // 2, c.qk_nope_head_dim + c.qk_rope_head_dim
    full = model.state_dict()
    q_b = _attr(gm, "layers_0_self_attn_q_b_proj_weight")
    assert tuple(q_b.meta["val"].shape) == (h * qk, c.q_lora_rank)
    rows = full["model.layers.0.self_attn.q_b_proj.weight"].chunk(2, 0)[rank]
    assert torch.equal(getattr(gm, q_b.target), rows)                      # this rank's contiguous heads
    o = _attr(gm, "layers_1_self_attn_o_proj_weight")
    assert torch.equal(getattr(gm, o.target), full["model.layers.1.self_attn.o_proj.weight"].chunk(2, 1)[rank])
    down = _attr(gm, "layers_1_mlp_shared_experts_down_proj_weight")
    assert tuple(down.meta["val"].shape) == (c.hidden_size, c.moe_intermediate_size // 2)
    # the views that split / merge heads now hold h heads; attention runs on h heads
    attn = [n for n in gm.graph.nodes if n.target is torch.ops.graphopt.mla_paged_attention.default]
    assert len(attn) == c.num_hidden_layers and all(n.meta["val"].shape[2] == h for n in attn)
    splits = [n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default and n.args[0].op == "call_function"
              and n.args[0].target is torch.ops.aten.linear.default and n.args[0].args[1] is q_b]
    assert splits and list(splits[0].args[1][2:]) == [h, qk]
    # negative cases: replicated weights keep their full tensors
    for name in ("layers_0_self_attn_kv_a_proj_with_mqa_weight", "layers_1_mlp_gate_weight"):
        node = _attr(gm, name)
        assert not node.target.startswith("_tp_")
        assert tuple(node.meta["val"].shape) == tuple(_attr(before, name).meta["val"].shape)
    logits = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert logits.meta["val"].shape[-1] == c.vocab_size                    # gathered back to the whole vocab
    assert result.matches == 3 * 2 + 3 + 3 + 1 and "all_reduce" in result.notes[0]


def test_tp_1_and_no_plan_leave_the_program_alone():
    model, program = normalised_program()
    for p in (None, plan(tp=1, ep=2)):
        result = ShardTensorParallelPass(p).run(program, ctx(model))
        assert not result.modified and result.program.main is program.main


def test_must_run_before_the_spec_fusion():
    model, program = normalised_program()
    program.set("step", program.main, program.signatures["main"])
    program.set("prefill", program.main, program.signatures["main"])
    with pytest.raises(ShardError, match="before fuse_spec_step"):
        ShardTensorParallelPass(plan()).run(program, ctx(model))


# -- real process groups: token parity with the unsharded model -------------------------------------

@pytest.mark.slow   # CI runs the same 2-rank, spec on, shard-only parity through examples/tensor_parallel.py
def test_two_ranks_spec_on_float32_greedy_tokens_equal_unsharded(tmp_path):
    """Each rank loads only its slices of the checkpoint (load_shard), then compiles with them."""
    run_parity(tmp_path, world=2, spec="mtp", quant=None, shard_only=True)


@pytest.mark.slow   # two compiles per rank (~60 s on 2 cores): run with GRAPHOPT_SLOW_TESTS=1
def test_two_ranks_w8a8_logits_bit_identical_to_unsharded(tmp_path):
    run_parity(tmp_path, world=2, spec=None, quant="w8a8")


@pytest.mark.slow
def test_two_ranks_spec_off_float32(tmp_path):
    run_parity(tmp_path, world=2, spec=None, quant=None)


@pytest.mark.slow
def test_two_ranks_spec_on_float32_from_the_whole_model(tmp_path):
    run_parity(tmp_path, world=2, spec="mtp", quant=None)


@pytest.mark.slow
@pytest.mark.parametrize("spec,quant,shard_only", [("mtp", None, True), (None, None, False), ("mtp", "w8a8", False)])
def test_four_ranks(tmp_path, spec, quant, shard_only):
    run_parity(tmp_path, world=4, spec=spec, quant=quant, shard_only=shard_only)
