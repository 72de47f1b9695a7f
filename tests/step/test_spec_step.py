"""The eager speculative step (SpecStep / SpecPrefill over the model's own forward): the semantic
reference of the fused graph. Greedy speculation must be token-identical to plain greedy decoding."""

from pathlib import Path

import pytest
import torch

from graphopt.step.provider import SpecStats, SpecStepProvider, speculative_generate
from graphopt.step.spec_step import SpecStep
from graphopt.models.generate import greedy_generate
from graphopt.models.random import random_model
from graphopt.step.contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs


BS = 4   # small blocks: sequences cross many block boundaries


@pytest.fixture(scope="module")
def model():
    return random_model(0)


@pytest.fixture(scope="module")
def small_vocab():
    """4 tokens (a seed whose MTP often agrees): multi-token acceptance and bonus tokens happen."""
    return random_model(3, vocab_size=4)


def prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def rows(B, **over):
    r = dict(temperature=torch.zeros(B), top_k=torch.zeros(B, dtype=torch.int64), top_p=torch.ones(B),
             min_p=torch.zeros(B), seed=torch.arange(B), eos_token_id=torch.full((B,), -1),
             max_pos=torch.full((B,), 200))
    r.update(over)
    return r


def prefill_one(provider, prompt, per_row=20, **over):
    kv, mtp = provider.new_caches(1 + per_row)
    tables = (1 + torch.arange(per_row))[None]
    L = torch.tensor([len(prompt)])
    out = provider.prefill(SpecPrefillInputs(torch.tensor([prompt]), L, torch.zeros_like(L), tables, **rows(1, **over),
                                             kv_caches=kv, mtp_caches=mtp))
    return out, kv, mtp, tables


def decode(provider, out, tables, kv, mtp, tokens=None, active=None, **over):
    B = out.next_tokens.shape[0]
    return provider.decode(SpecStepInputs(out.next_tokens if tokens is None else tokens, out.next_start_pos, tables,
                                          **rows(B, **over), active=torch.ones(B, dtype=torch.bool) if active is None
                                          else active, kv_caches=kv, mtp_caches=mtp))


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_greedy_speculation_is_token_identical_to_greedy_decoding(model, k, sampling):
    ps = prompts(97, [1, 4, 9, 17], seed=k)
    want = [greedy_generate(model, p, 12) for p in ps]
    provider = SpecStepProvider.from_model(model, k, BS, sampling=sampling)
    assert speculative_generate(provider, ps, 12) == want


@pytest.mark.parametrize("k", [1, 3])
def test_identical_with_frequent_acceptance(small_vocab, k):
    ps = prompts(4, [2, 6, 11], seed=1)
    want = [greedy_generate(small_vocab, p, 24) for p in ps]
    provider = SpecStepProvider.from_model(small_vocab, k, BS, sampling=False)
    assert speculative_generate(provider, ps, 24) == want
    stats = provider.stats.summary()
    assert stats["mean_accepted_length"] > 1.5 and stats["accepted_histogram"][k] > 0   # bonus tokens happened


TINY = Path(__file__).parents[2] / "graphopt" / "models" / "tiny" / "model.safetensors"


@pytest.mark.skipif(not TINY.exists(), reason="the embedded trained model is not in graphopt/models/tiny/")
def test_identical_on_the_trained_tiny_model():
    from graphopt.models import load, load_tokenizer
    from graphopt.models.evaluate import HELDOUT_TEXT, heldout_prompts

    tiny = load(dtype=torch.float32).eval()
    ps = heldout_prompts(load_tokenizer().encode(HELDOUT_TEXT.read_text(encoding="utf-8")), 4, 48)
    want = [greedy_generate(tiny, p, 16) for p in ps]
    for k in (1, 2, 3):
        provider = SpecStepProvider.from_model(tiny, k, 16, sampling=False)
        assert speculative_generate(provider, ps, 16) == want
        assert provider.stats.summary()["acceptance_rate"] > 0.2          # a trained MTP head: drafts land


def test_identical_with_two_mtp_layers():
    """A checkpoint with two MTP layers: draft 2 comes from the second layer, draft 3 chains it again."""
    two = random_model(5, vocab_size=4, num_nextn_predict_layers=2)
    ps = prompts(4, [3, 7], seed=4)
    provider = SpecStepProvider.from_model(two, 3, BS, sampling=False)
    assert len(provider.new_caches(3)[1]) == 2                                   # one latent cache per MTP layer
    assert speculative_generate(provider, ps, 16) == [greedy_generate(two, p, 16) for p in ps]


def test_oracle_drafts_are_all_accepted(model):
    """Drafts are an input of the step: give it the true greedy continuation and every step emits k+1."""
    k, prompt = 3, prompts(97, [5])[0]
    truth = prompt + greedy_generate(model, prompt, 30)
    provider = SpecStepProvider.from_model(model, k, BS, sampling=False)
    out, kv, mtp, tables = prefill_one(provider, prompt)
    emitted = out.out_tokens[0, :1].tolist()
    for step in range(6):
        s = int(out.next_start_pos[0])
        drafts = truth[s + 1: s + 1 + k] if step % 2 == 0 else truth[s + 1: s + 2] + [(truth[s + 2] + 1) % 97] * 2
        out = decode(provider, out, tables, kv, mtp, tokens=torch.tensor([[truth[s]] + drafts]))
        n = int(out.num_emitted[0])
        assert n == (k + 1 if step % 2 == 0 else 2)
        emitted += out.out_tokens[0, :n].tolist()
        assert out.out_tokens[0, n:].tolist() == [-1] * (k + 1 - n)
    assert emitted == truth[len(prompt): len(prompt) + len(emitted)]
    summary = provider.stats.summary()
    assert summary["steps"] == 6 and summary["per_position_acceptance"] == [1.0, 0.5, 0.5]
    assert summary["mean_accepted_length"] == pytest.approx(3.0) and summary["accepted_histogram"] == [0, 3, 0, 3]


def reference_drafts(model, seq, k):
    """k greedy drafts after `seq`, computed without any cache: main model over the sequence, the MTP over
    (h_t, token t+1), then the MTP chained on its own hidden state at the next position."""
    ids = torch.tensor([seq])
    _, h = model(ids, return_hidden=True)
    n = len(seq)
    hidden, toks, drafts = h[:, : n - 1], ids[:, 1:], []
    for j in range(k):
        logits, mh = model.mtp_forward(0, toks, hidden)
        drafts.append(int(logits[0, -1].argmax()))
        hidden = torch.cat([hidden if j else h[:, : n - 1], mh[:, -1:]], dim=1)
        toks = torch.cat([toks, torch.tensor([[drafts[-1]]])], dim=1)
    return drafts


def test_drafts_match_a_cache_free_mtp_reference(small_vocab):
    k, prompt = 3, [1, 2, 3, 0, 3, 2]
    provider = SpecStepProvider.from_model(small_vocab, k, BS, sampling=False)
    with torch.no_grad():
        out, kv, mtp, tables = prefill_one(provider, prompt)
        seq = prompt + out.out_tokens[0, :1].tolist()
        assert out.next_tokens[0].tolist() == seq[-1:] + reference_drafts(small_vocab, seq, k)
        for _ in range(5):
            out = decode(provider, out, tables, kv, mtp)
            seq += out.out_tokens[0, : int(out.num_emitted[0])].tolist()
            assert out.next_tokens[0].tolist() == seq[-1:] + reference_drafts(small_vocab, seq, k)


@pytest.mark.parametrize("k", [0, 2])
def test_eos_and_max_new_tokens_cut_the_output(model, k):
    ps = prompts(97, [3, 8], seed=5)
    free = [greedy_generate(model, p, 16) for p in ps]
    eos = free[0][6]
    want = [greedy_generate(model, p, 16, eos_token_id=eos) for p in ps]
    provider = SpecStepProvider.from_model(model, k, BS, sampling=False)
    assert speculative_generate(provider, ps, 16, eos_token_id=eos) == want
    assert [len(x) for x in speculative_generate(provider, ps, 1)] == [1, 1]      # finished at prefill
    assert speculative_generate(provider, ps, 5) == [f[:5] for f in free]


def test_inactive_rows_emit_nothing_and_write_only_the_sink(model):
    provider = SpecStepProvider.from_model(model, 2, BS, sampling=False)
    out, kv, mtp, tables = prefill_one(provider, [5, 6, 7])
    before = [c.clone() for c in kv + mtp]
    step = decode(provider, out, tables, kv, mtp, active=torch.tensor([False]))
    assert step.num_emitted.tolist() == [0] and step.finished.tolist() == [True]
    assert step.out_tokens.tolist() == [[-1, -1, -1]] and torch.equal(step.next_start_pos, out.next_start_pos)
    for old, new in zip(before, kv + mtp):
        assert torch.equal(old[1:], new[1:])                                      # block 0 is the sink


def test_sampled_tokens_do_not_depend_on_batch_composition(model):
    ps = prompts(97, [2, 7, 4], seed=9)
    provider = SpecStepProvider.from_model(model, 2, BS)
    together = speculative_generate(provider, ps, 10, temperature=0.9, seed=40)
    alone = [speculative_generate(provider, [p], 10, temperature=0.9, seed=40 + b)[0] for b, p in enumerate(ps)]
    assert together == alone
    assert together != [greedy_generate(model, p, 10) for p in ps]               # it did sample


def test_chunked_prefill_equals_one_prefill(model):
    k, prompt = 2, prompts(97, [11], seed=2)[0]
    provider = SpecStepProvider.from_model(model, k, BS, sampling=False)
    one, *_ = prefill_one(provider, prompt)
    kv, mtp = provider.new_caches(21)
    tables = (1 + torch.arange(20))[None]
    for start, stop, last in ((0, 6, False), (6, 11, True)):
        chunk = prompt[start:stop]
        L = torch.tensor([len(chunk)])
        out = provider.prefill(SpecPrefillInputs(torch.tensor([chunk]), L, torch.tensor([start]), tables, **rows(1),
                                                 is_last_chunk=last, kv_caches=kv, mtp_caches=mtp))
        if not last:
            assert out.num_emitted.tolist() == [0] and out.next_start_pos.tolist() == [6]
    assert out.out_tokens.tolist() == one.out_tokens.tolist() and out.next_start_pos.tolist() == [11]
    assert out.next_tokens.tolist() == one.next_tokens.tolist()                 # same drafts
    emitted = out.out_tokens[0, :1].tolist()
    while len(emitted) < 8:
        out = decode(provider, out, tables, kv, mtp)
        emitted += out.out_tokens[0, : int(out.num_emitted[0])].tolist()
    assert emitted[:8] == greedy_generate(model, prompt, 8)


def test_stats_from_step_outputs():
    stats = SpecStats()
    out = lambda n, fin: SpecStepOutputs(torch.full((len(n), 3), -1), torch.tensor(n), torch.zeros(len(n), 3),
                                         torch.zeros(len(n)), torch.tensor(fin))
    stats.update(out([3, 1, 0, 2], [False, False, True, True]))    # row 2 inactive, row 3 finished: not counted
    stats.update(out([2, 3, 1, 1], [False, False, False, False]))
    s = stats.summary()
    assert s["steps"] == 6 and s["tokens_emitted"] == 13
    assert s["acceptance_rate"] == pytest.approx(5 / 12) and s["mean_accepted_length"] == pytest.approx(1 + 5 / 6)
    assert s["per_position_acceptance"] == pytest.approx([3 / 6, 2 / 6]) and s["accepted_histogram"] == [3, 1, 2]
    with pytest.raises(ValueError, match="k = 1 step added to statistics of k = 2"):
        stats.update(SpecStepOutputs(torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2), torch.zeros(1),
                                     torch.zeros(1, dtype=torch.bool)))


def test_bad_configuration_is_rejected(model):
    with pytest.raises(ValueError, match="needs at least one MTP module"):
        SpecStep(torch.nn.Identity(), [], 2, BS)
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 0"):
        SpecStep.from_model(model, -1, BS)
    provider = SpecStepProvider.from_model(model, 2, BS)
    out, kv, mtp, tables = prefill_one(provider, [1, 2])
    with pytest.raises(ValueError, match=r"verifies 1 \+ k = 3 tokens per row, got 2"):
        decode(provider, out, tables, kv, mtp, tokens=out.next_tokens[:, :2])
