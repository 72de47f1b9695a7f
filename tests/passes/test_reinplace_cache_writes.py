"""reinplace_cache_writes: the cache is written in place (graphopt.kv_cache_write), with the same numbers as
the functional form, and a decode step's allocations no longer grow with the number of cache blocks."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import _pytree as pytree

from graphopt.capture.step import capture_main, capture_mtp
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.passes.base import PassContext, count_ops
from graphopt.passes.fuse_spec_step import build_spec_step, cache_layout, example_inputs
from graphopt.passes.reinplace_cache_writes import ReinplaceCacheWritesPass, find_chains
from graphopt.passes.rewrite_mla_absorbed import RewriteMLAAbsorbedPass
from graphopt.spec import SpecConfig
from graphopt.step.provider import SpecStepProvider, speculative_generate

BS, K = 4, 2
WRITE, INDEX_COPY, COPY = "graphopt.kv_cache_write.default", "aten.index_copy.default", "aten.copy_.default"


@pytest.fixture(scope="module")
def functional():
    """Main (1 MoE layer) and MTP captured and fused for k = 2: the MTP cache is written 2 times a step."""
    model = random_model(0, num_hidden_layers=1, first_k_dense_replace=2)
    main, mtp = capture_main(model, BS).graph_module, capture_mtp(model, 0, BS).graph_module
    for gm in (main, mtp):
        RewriteMLAAbsorbedPass().run(gm, PassContext())
        gm.recompile()
    step, prefill = build_spec_step(main, [mtp], model.config, SpecConfig(num_speculative_tokens=K), BS)
    return model, main, mtp, step, prefill


def _inplace(gm):
    gm = copy.deepcopy(gm)
    result = ReinplaceCacheWritesPass().run(gm, PassContext())
    gm.recompile()
    return gm, result


def test_every_cache_write_becomes_one_in_place_op(functional):
    model, main, mtp, step, prefill = functional
    # (graph, writes, cache inputs): the fused graphs write the main cache once and the MTP cache k times
    for gm, writes, caches in ((main, 1, 1), (mtp, 1, 1), (step, 1 + K, 2), (prefill, 1 + K, 2)):
        before = count_ops(gm)
        assert before[INDEX_COPY] == writes and before[COPY] == caches  # one write-back per cache input
        after, result = _inplace(gm)
        ops = count_ops(after)
        assert ops[WRITE] == writes and INDEX_COPY not in ops and COPY not in ops
        assert result.modified and result.matches == writes and f"{caches} cache input(s)" in result.notes[0]


@pytest.mark.parametrize("graph", ["main", "step", "prefill"])
def test_same_outputs_and_same_caches_as_the_functional_graph(functional, graph):
    model, main, mtp, step, prefill = functional
    gm = {"main": main, "step": step, "prefill": prefill}[graph]
    layout = cache_layout(main)
    inputs = (lambda s: capture_main(model, BS).make_inputs(s)) if graph == "main" else \
        (lambda s: example_inputs(layout, 1, K, model.config.vocab_size, graph == "prefill", seed=s))
    after, _ = _inplace(gm)
    for seed in (0, 1):
        ref_args, got_args = inputs(seed), inputs(seed)
        ref, got = gm(*ref_args), after(*got_args)
        for a, b in zip(pytree.tree_leaves((ref, ref_args)), pytree.tree_leaves((got, got_args))):
            assert torch.equal(a, b)                                     # outputs, then every cache


def test_in_place_step_is_token_identical_to_greedy_decoding(functional):
    model, main, mtp, step, prefill = functional
    provider = SpecStepProvider(_inplace(step)[0], _inplace(prefill)[0], model.config, K, BS)
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 8, 2)]
    assert speculative_generate(provider, ps, 10) == [greedy_generate(model, p, 10) for p in ps]


class _Allocations(TorchDispatchMode):
    """Bytes of every new tensor an op returns (views and in-place results share an input's storage)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _step_bytes(gm, num_blocks: int, layout, vocab: int) -> int:
    args = list(example_inputs(layout, 1, K, vocab, False, seed=3))
    grow = lambda c: torch.cat([c, torch.zeros(num_blocks - c.shape[0], *c.shape[1:], dtype=c.dtype)])  # noqa: E731
    args[-2], args[-1] = [grow(c) for c in args[-2]], [grow(c) for c in args[-1]]
    counter = _Allocations()
    with torch.no_grad(), counter:
        gm(*args)
    return counter.bytes


def test_step_allocations_do_not_grow_with_cache_blocks(functional):
    model, main, mtp, step, prefill = functional
    layout, vocab = cache_layout(main), model.config.vocab_size
    inplace = _inplace(step)[0]
    small, large = (_step_bytes(inplace, n, layout, vocab) for n in (40, 2000))
    assert small == large                                                # bytes allocated per step
    # the functional graph allocates a whole new cache per write (the measure can see it)
    per_cache = 2000 * BS * layout[2] * 4
    assert _step_bytes(step, 2000, layout, vocab) - large >= per_cache * (1 + K)


def test_a_chain_whose_old_cache_is_read_after_the_write_stays_functional():
    class ReadsOldCache(torch.nn.Module):
        def forward(self, cache, slots, entry):
            new = cache.view(-1, cache.shape[-1]).index_copy(0, slots, entry).view(cache.shape)
            old_sum = cache.sum()                 # the cache before the write, read after it
            cache.copy_(new)
            return new[1:] * old_sum

    args = (torch.randn(3, BS, 5), torch.tensor([4, 6]), torch.randn(2, 5))
    gm = torch.export.export(ReadsOldCache(), args).run_decompositions({}).module()
    gm.graph.eliminate_dead_code()
    assert not find_chains(gm)
    after, result = _inplace(gm)
    assert not result.modified and count_ops(after).get(INDEX_COPY) == 1
