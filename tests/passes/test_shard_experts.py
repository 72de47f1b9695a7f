"""shard_experts: routed experts split over ep ranks, local dispatch, one all_reduce per MoE layer.
Token parity on real process groups: test_shard_tensor_parallel.py (both passes run there)."""

import pytest
import torch

from graphopt.passes.sharding import ShardError, count_collectives
from graphopt.passes.shard_experts import ShardExpertsPass

from shard_helpers import ctx, normalised_program, plan

MOE = torch.ops.graphopt.moe_experts.default


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_holds_its_experts_and_combines_with_one_all_reduce(rank):
    model, program = normalised_program()
    c = model.config
    result = ShardExpertsPass(plan(rank)).run(program, ctx(model))
    gm = result.program.main
    moes = [n for n in gm.graph.nodes if n.target is MOE]
    assert len(moes) == 1 and result.matches == 1
    assert count_collectives(gm) == {"all_reduce": 1, "all_gather": 0}
    moe = moes[0]
    local = c.n_routed_experts // 2
    gate_up = getattr(gm, moe.args[3].target)
    full = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up, full[rank * local:(rank + 1) * local])
    # dispatch: ids shifted by this rank's first expert, other ranks' pairs weighted 0
    ids, weights = moe.args[2], moe.args[1]
    assert ids.target is torch.ops.aten.where.ScalarOther and weights.target is torch.ops.aten.where.ScalarOther
    shift = ids.args[1]
    assert shift.target is torch.ops.aten.sub.Tensor and shift.args[1] == rank * local
    (user,) = moe.users
    assert user.target is torch.ops._c10d_functional.all_reduce.default


def test_dense_dispatch_is_an_error_naming_the_experts():
    model, program = normalised_program(frozenset({"fuse_moe_experts"}))
    with pytest.raises(ShardError, match="dense dispatch"):
        ShardExpertsPass(plan()).run(program, ctx(model))


def test_ep_1_leaves_the_program_alone():
    model, program = normalised_program()
    result = ShardExpertsPass(plan(tp=2, ep=1)).run(program, ctx(model))
    assert not result.modified and result.program.main is program.main
