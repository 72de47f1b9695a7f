"""load_shard reads only a rank's slices: they equal the same slices of the whole model; the sharded
parameters of the returned model are placeholders; bad uses are errors. (Compiling and decoding with
the slices on real process groups: tests/passes/test_shard_tensor_parallel.py.)"""

import functools

import pytest
import torch

from graphopt.models import load
from graphopt.models.shard_load import load_shard
from graphopt.models.shard_plan import param_shard


@functools.cache
def _whole():
    return load(dtype=torch.float32)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_slice_is_the_whole_models_slice(rank):
    whole = dict(_whole().named_parameters(remove_duplicate=False))
    model, shards = load_shard(None, tp=2, ep=2, rank=rank, dtype=torch.float32)
    assert shards.tensors and (shards.tp, shards.ep, shards.rank) == (2, 2, rank)
    for name, (dim, part) in shards.tensors.items():
        assert param_shard(name, 2, 2)[0] == dim
        assert torch.equal(part, whole[name].chunk(2, dim)[rank]), name
    kinds = {name.rsplit(".", 2)[-2] for name in shards.tensors}
    assert {"q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"} <= kinds
    # replicated parameters are loaded whole and equal
    for name in ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.gate.weight",
                 "lm_head.weight", "mtp.0.eh_proj.weight"):
        assert name not in shards.tensors and torch.equal(model.get_parameter(name), whole[name])
    # half the bytes of what is split
    split = sum(whole[n].numel() * 4 for n in shards.tensors)
    assert shards.nbytes() * 2 == split


def test_tp_only_keeps_experts_whole():
    _, shards = load_shard(None, tp=2, ep=1, rank=0, dtype=torch.float32)
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in shards.tensors)


def test_compile_refuses_shards_of_another_plan_or_model():
    import graphopt
    from graphopt.passes.sharding import ShardError
    model, shards = load_shard(None, tp=2, ep=2, rank=0, dtype=torch.float32)
    with pytest.raises(ShardError, match="needs tp= / ep= above 1"):
        graphopt.compile(model, shards=shards)
