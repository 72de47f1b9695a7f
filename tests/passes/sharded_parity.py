"""The multi-process parity check the sharding tests share: every rank compiles the embedded model
(float32) with tp = ep = world size, generates greedily, and checks the tokens against the unsharded
model; W8A8 is compared with the unsharded W8A8 compile, logits bit for bit. Errors of bad plans are
checked first, before any capture. Runs in processes started by graphopt.runtime.distributed.run_local
(real gloo groups, a free port, timeouts on the collectives and on the whole run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

PROMPTS = [[1, 300, 400, 500], [1, 42, 43], [1, 7000, 12, 13, 14, 15]]
NEW_TOKENS = 16


def run_parity(tmp_path: Path, world: int, spec, quant, shard_only: bool = False) -> None:
    """shard_only: each rank loads only its slices (models.shard_load.load_shard) instead of the whole model."""
    from graphopt.runtime.distributed import run_local
    run_local(_rank, world, str(tmp_path), spec, quant, shard_only, timeout_s=420, collective_timeout_s=120)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["tokens"] == reports[0]["tokens"] for r in reports)     # every rank decoded the same


def expected_collectives(config, spec, quant) -> dict[str, int]:
    """Per call of the step graph: one all_reduce per row-parallel linear (o_proj, down_proj) and per MoE
    layer, one all_gather of the logits, and under w8a8 one all_gather of each row-parallel linear's input
    (quantised per token over the whole row); the MTP layer (spec on) adds its own."""
    layers, moe = config.num_hidden_layers, sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    rows = 2 * layers + (2 if spec is not None else 0)
    reduce = rows + moe + (1 if spec is not None else 0)
    gather = 1 + (1 if spec is not None else 0) + (rows if quant is not None else 0)
    return {"all_reduce": reduce, "all_gather": gather}


def _rank(rank: int, world: int, out: str, spec, quant, shard_only: bool) -> None:
    import graphopt
    from graphopt.models import load
    from graphopt.models.generate import greedy_generate
    from graphopt.models.random import random_model
    from graphopt.passes.sharding import ShardError, count_collectives

    model = load(dtype=torch.float32)
    # bad plans: errors before capture, naming what is wrong
    with pytest.raises(ShardError, match=f"world size {world}"):
        graphopt.compile(model, tp=world + 1)
    with pytest.raises(ShardError, match="num_attention_heads = 3"):
        graphopt.compile(random_model(num_attention_heads=3, vocab_size=96), tp=world)
    with pytest.raises(ShardError, match="n_routed_experts = 9"):
        graphopt.compile(random_model(n_routed_experts=9, n_group=3, vocab_size=96), ep=world)

    dump = Path(out) / f"dump{rank}"
    dumps = quant is None    # the float runs check the dumps; w8a8 counts the same graphs in memory (faster)
    if shard_only:
        from graphopt.models.shard_load import load_shard
        rank_model, shards = load_shard(None, tp=world, ep=world, rank=rank, dtype=torch.float32)
    else:
        rank_model, shards = model, None
    sharded = graphopt.compile(rank_model, spec=spec, quant=quant, tp=world, ep=world, shards=shards, progress=False,
                               dump_dir=str(dump) if dumps else None)
    tokens = sharded.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ids = torch.tensor([p + [5] * (6 - len(p)) for p in PROMPTS])
    logits = sharded(ids)
    if quant is None:
        reference = [greedy_generate(model, p, NEW_TOKENS) for p in PROMPTS]
        assert tokens == reference, f"rank {rank}: sharded {tokens} != unsharded {reference}"
        torch.testing.assert_close(logits, model(ids), rtol=1e-4, atol=1e-4)
    else:
        unsharded = graphopt.compile(model, spec=spec, quant=quant, progress=False)
        assert tokens == unsharded.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert torch.equal(logits, unsharded(ids)), "w8a8: int32 sums are exact, so the logits must be equal"
    expected = expected_collectives(model.config, spec, quant)
    assert count_collectives(sharded.graphs["step"]) == expected
    if dumps:   # the collectives are in the dumped graphs: counted in the step graph's final dump
        text = (dump / "step" / "final.py").read_text()
        counted = {"all_reduce": text.count("torch.ops._c10d_functional.all_reduce.default("),
                   "all_gather": text.count("torch.ops._c10d_functional.all_gather_into_tensor.default(")}
        assert counted == expected, counted
        assert list((dump / "main").glob("*.shard_tensor_parallel.after.py"))
        assert list((dump / "main").glob("*.shard_experts.after.py"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"tokens": tokens, "collectives": expected}))
