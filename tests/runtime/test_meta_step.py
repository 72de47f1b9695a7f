"""The compiled speculative step and the engine's own step preparation never read a device value on the
host: both run on the `meta` device, where any .item() / .tolist() / bool(tensor) raises. So a step can
be captured in a CUDA graph and launched ahead of the host."""

import copy

import pytest
import torch

import graphopt
from graphopt.models.random import random_model
from graphopt.runtime.batch import DecodeBatch
from graphopt.runtime.request import Request, SamplingParams
from graphopt.step.provider import SpecStepProvider

BS, K = 4, 2


@pytest.fixture(scope="module")
def compiled():
    return graphopt.compile(random_model(0, num_hidden_layers=1), spec=graphopt.SpecConfig(num_speculative_tokens=K),
                            block_size=BS, progress=False)


def _meta(gm):
    """The graph with its weights and every device argument (arange(device=cpu), ...) on meta."""
    gm = copy.deepcopy(gm).to("meta")
    swap = lambda x: torch.device("meta") if isinstance(x, torch.device) else x  # noqa: E731
    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, swap)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()
    return gm


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_fused_step_and_batch_preparation_run_on_meta(compiled, temperature):
    program, meta = compiled.program, torch.device("meta")
    assert "step_greedy" in program and "graphopt.kv_cache_write" in program["step"].code
    provider = SpecStepProvider(_meta(program["step"]), _meta(program["prefill"]), program.model_config, K, BS,
                                device=meta, greedy_step=_meta(program["step_greedy"]))
    kv, mtp = provider.new_caches(9)
    assert kv[0].is_meta and mtp[0].is_meta
    batch = DecodeBatch(4, K, 3, meta)
    requests = [Request(i, p, SamplingParams(temperature=temperature, max_new_tokens=8), i, 16)
                for i, p in enumerate([[1, 2, 3], [4]])]
    for slot, r in enumerate(requests):
        r.slot = slot
    batch.admit(requests)
    batch.set_blocks([(0, 0, 1), (0, 1, 2), (1, 0, 3)])
    out = provider.prefill(batch.prefill_inputs([0, 1], [r.prompt for r in requests], [0, 0], 3, True, kv, mtp))
    batch.join([0, 1], out)
    for _ in range(2):
        inputs = batch.decode_inputs(2, 3, kv, mtp, greedy=temperature == 0)
        out = provider.decode(inputs)
        batch.absorb(2, out)
    assert out.out_tokens.is_meta and out.out_tokens.shape == (2, 1 + K) and batch.tokens.is_meta
    with pytest.raises(Exception):             # the check has teeth: a host read fails on meta
        out.num_emitted.tolist()
