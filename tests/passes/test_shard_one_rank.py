"""The sharded step at world size 1 (compile option shard_one_rank): both sharding passes run with the
plan tp = ep = world = 1, so every weight is its one piece (shared with the model, not copied) and every
collective is a graph node over the one-rank group. Graph-level tests run the passes without a process
group; the compile tests run a real one-rank gloo group in this process (a HashStore: no port, no spawn)
and hold the sharded compile to the unsharded one token for token and logit for logit (float32)."""

import functools
from collections import Counter
from operator import attrgetter

import pytest
import torch
import torch.distributed as dist

import graphopt
from graphopt.models import load
from graphopt.passes.sharding import ShardError, count_collectives
from graphopt.passes.shard_experts import ShardExpertsPass
from graphopt.passes.shard_tensor_parallel import ShardTensorParallelPass

from shard_helpers import ctx, normalised_program, plan
from sharded_parity import NEW_TOKENS, PROMPTS, expected_collectives


@functools.cache
def _embedded():
    return load(dtype=torch.float32)


@pytest.fixture
def one_rank_world():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_plan_splits_what_spans_the_world():
    one = plan(tp=1, ep=1)
    assert one.world_size == 1 and one.splits_heads and one.splits_experts
    assert plan(tp=2, ep=2).splits_heads and plan(tp=2, ep=2).splits_experts
    assert not plan(tp=1, ep=2).splits_heads and not plan(tp=2, ep=1).splits_experts   # negative: one side only


def test_one_rank_passes_insert_every_collective_and_keep_every_weight_whole():
    model, program = normalised_program()
    c = model.config
    before = program.main
    for p in (ShardTensorParallelPass(plan(tp=1, ep=1)), ShardExpertsPass(plan(tp=1, ep=1))):
        result = p.run(program, ctx(model))
        assert result.modified
        program = result.program
    gm = program.main
    moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert count_collectives(before) == {"all_reduce": 0, "all_gather": 0}
    assert count_collectives(gm) == {"all_reduce": 2 * c.num_hidden_layers + moe, "all_gather": 1}
    was = {n.name: attrgetter(n.target)(before) for n in before.graph.nodes if n.op == "get_attr"}
    split = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(("_tp_", "_ep_"))]
    assert len(split) == 3 * 2 + 3 + 3 + 1 + 2      # tp: q_b, kv_b, o per layer, 3 + 3 MLP, lm_head; ep: 2 stacked
    for node in split:
        piece = getattr(gm, node.target)
        assert piece.shape == was[node.name].shape
        assert piece.data_ptr() == was[node.name].data_ptr(), node.target   # the whole tensor, not a copy
    # every node keeps its shape: the one piece is the whole, so no view changed
    shapes = {n.name: tuple(n.meta["val"].shape) for n in before.graph.nodes
              if isinstance(n.meta.get("val"), torch.Tensor)}
    for node in gm.graph.nodes:
        if node.name in shapes:
            assert tuple(node.meta["val"].shape) == shapes[node.name], node.format_node()


def test_errors_before_capture_say_what_is_accepted(monkeypatch):
    model = _embedded()
    with pytest.raises(ValueError, match="shard_one_rank=1 must be True or False"):
        graphopt.compile(model, shard_one_rank=1)
    assert not dist.is_initialized()
    with pytest.raises(ShardError, match="needs torch.distributed initialised over a world of one rank"):
        graphopt.compile(model, shard_one_rank=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ShardError, match="takes tp=1, ep=1; got tp=2, ep=1"):
            graphopt.compile(model, tp=2, shard_one_rank=True)
        with pytest.raises(ShardError, match="got tp=1, ep=2"):
            graphopt.compile(model, ep=2, shard_one_rank=True)
        with pytest.raises(ShardError, match="run on backends"):
            graphopt.compile(model, backend="onnx", shard_one_rank=True)
        # a world of two ranks: only its size matters here, so the one-rank group reports two
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        with pytest.raises(ShardError, match="the process group has 2 ranks .*pass tp=2 and / or ep=2"):
            graphopt.compile(model, shard_one_rank=True)
    finally:
        dist.destroy_process_group()


def _compare(tmp_path, spec, quant=None) -> None:
    """The one-rank sharded compile against the unsharded one: tokens, logits, collectives in the dumps."""
    model = _embedded()
    dump = tmp_path / "dump"
    sharded = graphopt.compile(model, spec=spec, quant=quant, shard_one_rank=True, progress=False, dump_dir=str(dump))
    assert sharded.parallel == {"tp": 1, "ep": 1, "rank": 0, "world_size": 1,
                                "group_name": dist.group.WORLD.group_name}
    tokens = sharded.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ids = torch.tensor([p + [5] * (6 - len(p)) for p in PROMPTS])
    expected = expected_collectives(model.config, spec, quant)
    assert count_collectives(sharded.graphs["step"]) == expected
    text = (dump / "step" / "final.py").read_text()
    assert text.count("torch.ops._c10d_functional.all_reduce.default(") == expected["all_reduce"]
    assert text.count("torch.ops._c10d_functional.all_gather_into_tensor.default(") == expected["all_gather"]
    assert list((dump / "main").glob("*.shard_tensor_parallel.after.py"))
    assert list((dump / "main").glob("*.shard_experts.after.py"))
    _inductor_elides_the_collectives(sharded.graphs["step"], expected)
    if spec is None and quant is None:   # against the reference model (which the unsharded compile equals)
        from graphopt.models.generate import greedy_generate
        assert tokens == [greedy_generate(model, p, NEW_TOKENS) for p in PROMPTS]
        return
    unsharded = graphopt.compile(model, spec=spec, quant=quant, progress=False)
    assert count_collectives(unsharded.graphs["step"]) == {"all_reduce": 0, "all_gather": 0}
    # lowered, nothing of the sharding is left over one rank: no dispatch masks, no split-and-join of the
    # gathered logits (they cost ~7 us a step on the H100 before), the same ops as the unsharded step
    assert _lowered_ops(sharded) == _lowered_ops(unsharded)
    assert tokens == unsharded.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    # a sum over one rank adds nothing: the logits are the unsharded compile's, bit for bit
    assert torch.equal(sharded(ids), unsharded(ids))
    if quant is None:   # the artefact names the one-rank world and reloads in it
        sharded.save(tmp_path / "artefact")
        reloaded = graphopt.load_compiled(tmp_path / "artefact")
        assert reloaded.parallel == sharded.parallel and reloaded.options.shard_one_rank
        assert reloaded.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True) == tokens


def _lowered_ops(compiled) -> Counter:
    from graphopt.backends.inductor.backend import for_inductor
    gm = for_inductor(compiled.graphs["step"], {}, few_rows=True)
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _inductor_elides_the_collectives(step, expected) -> None:
    """The Inductor backend's graph drops every collective over the one rank and its wait (NCCL would launch
    a kernel for each); GRAPHOPT_KEEP_ONE_RANK_COLLECTIVES=1 keeps them (the benchmark's comparison)."""
    import os
    from unittest import mock

    from graphopt.backends.inductor.backend import KEEP_ONE_RANK_COLLECTIVES, for_inductor
    waits = lambda gm: sum(n.target is torch.ops._c10d_functional.wait_tensor.default   # noqa: E731
                           for n in gm.graph.nodes)
    lowered = for_inductor(step, few_rows=False)
    assert count_collectives(lowered) == {"all_reduce": 0, "all_gather": 0} and waits(lowered) == 0
    with mock.patch.dict(os.environ, {KEEP_ONE_RANK_COLLECTIVES: "1"}):
        kept = for_inductor(step, few_rows=False)
    assert count_collectives(kept) == expected and waits(kept) == sum(expected.values())
    assert len(kept.graph.nodes) - len(lowered.graph.nodes) == 2 * sum(expected.values())   # nothing else dropped
    with mock.patch.dict(os.environ, {KEEP_ONE_RANK_COLLECTIVES: "yes"}), \
            pytest.raises(ValueError, match="accepted are 1 .* and 0 or unset"):
        for_inductor(step, few_rows=False)


def test_one_rank_spec_on_equals_the_unsharded_compile(tmp_path, one_rank_world):
    """~25 s on 2 cores: two compiles of the embedded model (spec on: 20 all_reduce, 2 all_gather per step)."""
    _compare(tmp_path, "mtp")


@pytest.mark.slow
def test_one_rank_spec_off_equals_the_reference_model(tmp_path, one_rank_world):
    _compare(tmp_path, None)


@pytest.mark.slow   # two w8a8 compiles (~30 s): the gather of each row-parallel input and the int32 all_reduce
def test_one_rank_w8a8_equals_the_unsharded_w8a8_compile(tmp_path, one_rank_world):
    _compare(tmp_path, None, "w8a8")


@pytest.mark.slow   # two compiles in a fresh process: 25 s on an idle 2-core machine, over a minute under load
def test_the_benchmark_runs_on_cpu_with_gloo(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "shard_one_rank.py"), "--device", "cpu", "--steps", "2",
           "--repeats", "1", "--batches", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ROW " in out.stdout
    run = json.loads((tmp_path / "shard_one_rank_embedded_cpu.json").read_text())
    assert run["tokens_equal"] == "yes" and not run["failures"]
    assert run["collectives"] == "17 all_reduce + 1 all_gather" and run["pg"] == "gloo"
    (row,) = run["rows"]
    assert row["batch"] == 1 and row["unsharded"] > 0 and row["one-rank sharded"] > 0
    assert "| embedded | off | 1 |" in (tmp_path / "shard_one_rank_embedded_cpu.md").read_text()
