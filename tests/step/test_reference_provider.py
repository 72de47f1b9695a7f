"""The eager k = 0 provider: exact against reference decoding, padding rows inert, no host syncs."""

import pytest
import torch

from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.step.contract import SpecPrefillInputs, SpecStepInputs
from graphopt.step.reference_provider import ReferenceStepProvider

BS = 4


def _fields(B, temperature=0.0, eos=-1, max_pos=1000, seed=0):
    return dict(temperature=torch.full((B,), float(temperature)), top_k=torch.zeros(B, dtype=torch.int64),
                top_p=torch.ones(B), min_p=torch.zeros(B), seed=torch.full((B,), seed, dtype=torch.int64),
                eos_token_id=torch.full((B,), eos, dtype=torch.int64), max_pos=torch.full((B,), max_pos))


def _prefill(provider, caches, prompts, tables, starts=None, last=True, **kw):
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    starts = torch.tensor(starts or [0] * B)
    return provider.prefill(SpecPrefillInputs(ids=ids, lengths=torch.tensor([len(p) for p in prompts]),
                                              start_pos=starts, block_tables=tables, is_last_chunk=last,
                                              kv_caches=caches, **_fields(B, **kw)))


def _decode(provider, caches, out, tables, active, **kw):
    return provider.decode(SpecStepInputs(tokens=out.next_tokens, start_pos=out.next_start_pos,
                                          block_tables=tables, active=active, kv_caches=caches,
                                          **_fields(len(active), **kw)))


def test_ragged_batch_with_a_padding_row_matches_reference_decoding(model):
    provider = ReferenceStepProvider.from_model(model, block_size=BS)
    caches, _ = provider.new_caches(16)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41]]
    tables = torch.tensor([[1, 2, 3, 4], [6, 5, 7, 0], [0, 0, 0, 0]])     # row 2: padding
    out = _prefill(provider, caches, prompts, tables[:2])
    assert out.num_emitted.tolist() == [1, 1] and out.next_start_pos.tolist() == [7, 2]
    got = [[t] for t in out.out_tokens[:, 0].tolist()]
    out.next_tokens = torch.cat([out.next_tokens, torch.tensor([[3]])])
    out.next_start_pos = torch.cat([out.next_start_pos, torch.tensor([5])])
    active = torch.tensor([True, True, False])
    before = [c[8:].clone() for c in caches]                              # blocks nobody owns
    for _ in range(7):
        out = _decode(provider, caches, out, tables, active)
        assert out.out_tokens[2, 0] == -1 and out.num_emitted[2] == 0 and out.finished[2]
        assert out.next_start_pos[2] == 5
        for g, t in zip(got, out.out_tokens[:2, 0].tolist()):
            g.append(t)
    assert got == [greedy_generate(model, p, 8, block_size=BS) for p in prompts]
    assert all(torch.equal(b, c[8:]) for b, c in zip(before, caches))  # padding row wrote only the sink


def test_chunked_prefill_gives_the_same_first_token_and_cache(model):
    provider = ReferenceStepProvider.from_model(model, block_size=BS)
    prompt = list(range(3, 14))
    tables = torch.tensor([[1, 2, 3]])
    whole, _ = provider.new_caches(4)
    first = _prefill(provider, whole, [prompt], tables)
    chunked, _ = provider.new_caches(4)
    mid = _prefill(provider, chunked, [prompt[:5]], tables, last=False)
    assert mid.num_emitted.tolist() == [0] and mid.next_start_pos.tolist() == [5] and mid.out_tokens[0, 0] == -1
    second = _prefill(provider, chunked, [prompt[5:]], tables, starts=[5])
    assert torch.equal(second.out_tokens, first.out_tokens) and second.next_start_pos.tolist() == [11]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a[1:], b[1:], rtol=1e-5, atol=1e-6)


def test_finished_on_max_pos_and_on_eos(model):
    provider = ReferenceStepProvider.from_model(model, block_size=BS)
    caches, _ = provider.new_caches(8)
    prompt = [5, 6, 7]
    expected = greedy_generate(model, prompt, 4, block_size=BS)
    tables = torch.tensor([[1, 2]])
    out = _prefill(provider, caches, [prompt], tables, max_pos=3)          # max_new_tokens = 1
    assert out.finished.tolist() == [True] and out.out_tokens.tolist() == [[expected[0]]]
    out = _prefill(provider, caches, [prompt], tables, max_pos=6)
    assert not out.finished[0]
    out = _decode(provider, caches, out, tables, torch.tensor([True]), eos=expected[1], max_pos=6)
    assert out.finished.tolist() == [True] and out.out_tokens.tolist() == [[expected[1]]]


def test_sampling_is_fixed_by_seed_and_position(model):
    provider = ReferenceStepProvider.from_model(model, block_size=BS)
    tables = torch.tensor([[1, 2], [3, 4]])
    runs = []
    for seed in (11, 11, 12):
        caches, _ = provider.new_caches(6)
        out = _prefill(provider, caches, [[5, 6, 7], [5, 6, 7]], tables, temperature=1.5, seed=seed)
        toks = [out.out_tokens[:, 0].tolist()]
        for _ in range(5):
            out = _decode(provider, caches, out, tables, torch.tensor([True, True]), temperature=1.5, seed=seed)
            toks.append(out.out_tokens[:, 0].tolist())
        runs.append(toks)
    assert runs[0] == runs[1] != runs[2]
    assert all(a == b for a, b in runs[0])             # two rows, same seed and prompt: same tokens


def test_step_preparation_never_reads_a_device_value_on_the_host():
    """The whole step runs on the meta device, where any .item() / .tolist() / bool(tensor) would raise."""
    provider = ReferenceStepProvider.from_model(random_model().to("meta"), block_size=BS)
    caches, _ = provider.new_caches(8)
    assert caches[0].is_meta
    meta = lambda t: t.to("meta")  # noqa: E731
    B = 2
    fields = {k: meta(v) for k, v in _fields(B, temperature=0.7).items()}
    tables = meta(torch.ones(B, 2, dtype=torch.int64))
    out = provider.prefill(SpecPrefillInputs(ids=meta(torch.zeros(B, 3, dtype=torch.int64)),
                                             lengths=meta(torch.tensor([3, 1])), start_pos=meta(torch.tensor([0, 0])),
                                             block_tables=tables, kv_caches=caches, **fields))
    out = provider.decode(SpecStepInputs(tokens=out.next_tokens, start_pos=out.next_start_pos, block_tables=tables,
                                         active=meta(torch.tensor([True, False])), kv_caches=caches, **fields))
    assert out.out_tokens.is_meta and out.out_tokens.shape == (B, 1) and out.finished.shape == (B,)
    with pytest.raises(Exception):             # the check has teeth: a host read fails on meta
        out.num_emitted.tolist()


def test_speculative_steps_are_not_this_providers_job(model):
    with pytest.raises(ValueError, match="plain decoding only.*SpecStepProvider"):
        ReferenceStepProvider.from_model(model, num_speculative_tokens=2)
