"""graphopt.models.evaluate: perplexity, teacher-forced MTP accuracy, greedy MTP acceptance."""

import math

import numpy as np
import pytest
import torch

from graphopt.models.evaluate import (_draft_chains, heldout_prompts, mtp_acceptance, mtp_top1_accuracy,
                                      multi_token_logits, perplexity)
from graphopt.models.random import random_model


def _constant_model(token=None):
    """Every head (main and MTP) outputs the same logits everywhere: uniform, or one-hot on `token`."""
    model = random_model(seed=3)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        if token is not None:
            head.bias[token] = 1.0
    model.lm_head = model.mtp[0].shared_head.head = head
    return model


def test_perplexity_of_uniform_logits_is_vocab_size():
    model = _constant_model()
    ids = torch.randint(0, model.config.vocab_size, (150,))
    for window, batch in [(32, 2), (64, 8), (150, 1)]:  # with and without a short tail window
        assert perplexity(model, ids, window, batch) == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_perplexity_scores_each_window_on_its_own():
    model = random_model(seed=1)
    ids = torch.randint(0, 97, (64,))
    by_hand = []
    with torch.no_grad():
        for w in ids.view(2, 32):  # two windows of 32: 31 scored tokens each, no context across
            logp = model(w[None])[0, :-1].log_softmax(-1)
            by_hand.append(-logp.gather(1, w[1:, None]).squeeze(1))
    expected = math.exp(torch.cat(by_hand).mean().item())
    assert perplexity(model, ids.numpy().astype(np.uint16), window=32) == pytest.approx(expected, rel=1e-5)


def test_multi_token_logits_are_causal_and_shifted():
    # depth d at position t sees tokens <= t+d and is scored against token t+1+d
    model = random_model(seed=2)
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        heads = multi_token_logits(model, ids, depths=2)
        for d, (logits, targets) in enumerate(heads):
            assert torch.equal(targets, ids[:, 1 + d:])
            assert logits.shape[1] == targets.shape[1]
            t = 7
            later = ids.clone()
            later[0, t + d + 1] = (later[0, t + d + 1] + 1) % 97   # the target itself: must not be seen
            newest = ids.clone()
            newest[0, t + d] = (newest[0, t + d] + 1) % 97         # the newest visible token: must be seen
            assert torch.equal(multi_token_logits(model, later, 2)[d][0][0, t], logits[0, t])
            assert not torch.allclose(multi_token_logits(model, newest, 2)[d][0][0, t], logits[0, t])


def test_top1_accuracy_of_a_constant_model():
    model = _constant_model(token=5)
    ids = torch.tensor([5, 5, 6, 5] * 16)
    acc = mtp_top1_accuracy(model, ids, window=16, depths=2)
    assert set(acc) == {"main", "mtp_1", "mtp_2"}
    for value in acc.values():
        assert value == pytest.approx(0.75, abs=0.1)


def _chain_without_cache(model, seq, t, k):
    """Reference: the MTP input sequence of decode position t, grown one draft at a time, no cache."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        _, hidden = model(ids, return_hidden=True)
        next_ids, states = ids[0, 1:t + 2].tolist(), hidden[0, :t + 1]
        drafts = []
        for _ in range(k):
            logits, g = model.mtp_forward(0, torch.tensor([next_ids]), states[None])
            drafts.append(int(logits[0, -1].argmax()))
            next_ids.append(drafts[-1])
            states = torch.cat([states, g[0, -1:]])
    return drafts


def test_draft_chain_matches_uncached_reference():
    model = random_model(seed=4)
    seq = torch.randint(0, 97, (40,)).tolist()
    first, k = 9, 3
    drafts = _draft_chains(model, seq, first, k, block_size=8)
    assert drafts.shape == (40 - 1 - k - first, k)
    for r in [0, 5, drafts.shape[0] - 1]:
        assert drafts[r].tolist() == _chain_without_cache(model, seq, first + r, k)


def test_acceptance_invariants():
    model = random_model(seed=5)
    prompts = heldout_prompts(torch.randint(3, 97, (500,)), n=3, length=12)
    out = mtp_acceptance(model, prompts, k_max=3, new_tokens=16)
    rates = out["rates"]
    assert out["positions"] == 3 * (16 - 3)
    assert all(0.0 <= r <= 1.0 for r in rates)
    assert rates[0] >= rates[1] >= rates[2]
    by_k = {row["k"]: row for row in out["by_k"]}
    assert by_k[1]["mean_accepted"] == pytest.approx(rates[0])
    assert by_k[3]["tokens_per_step"] == pytest.approx(1 + sum(rates))
    for row in by_k.values():
        assert 1.0 <= row["simulated_tokens_per_step"] <= 1 + row["k"]


def test_acceptance_is_total_when_every_head_says_the_same():
    model = _constant_model(token=7)  # greedy output is 7 7 7 ..., and so is every draft
    out = mtp_acceptance(model, [[1, 2, 3, 4]], k_max=2, new_tokens=10)
    assert out["rates"] == [1.0, 1.0]
    assert out["by_k"][1]["simulated_tokens_per_step"] == pytest.approx(3.0)


def test_heldout_prompts_are_deterministic_and_in_range():
    ids = np.arange(1000, dtype=np.uint16)
    prompts = heldout_prompts(ids, n=4, length=10)
    assert prompts == heldout_prompts(ids, n=4, length=10)
    assert [p[0] for p in prompts] == [0, 247, 495, 742] and all(len(p) == 10 for p in prompts)
    with pytest.raises(ValueError, match="shorter than one prompt"):
        heldout_prompts(ids[:5], n=1, length=10)


# -- progress (issue 15): a bar on stderr after 2 s of scoring or acceptance, only when asked --------
def _bars_shown_at_once(monkeypatch, module) -> list[dict]:
    """`module`'s tqdm bars drawn at once into buffers; one record per bar: its kwargs and its output."""
    import io

    made, real = [], module.tqdm

    def make(*args, **kwargs):
        made.append({"kwargs": kwargs, "out": io.StringIO()})
        return real(*args, **{**kwargs, "delay": 0, "leave": True, "mininterval": 0, "file": made[-1]["out"]})
    monkeypatch.setattr(module, "tqdm", make)
    return made


def test_scoring_and_acceptance_show_progress_only_when_asked(monkeypatch):
    from graphopt.models import evaluate

    bars = _bars_shown_at_once(monkeypatch, evaluate)
    model = random_model(seed=3)
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(1))
    shown = perplexity(model, ids, window=32, batch_size=2, progress=True)     # 4 windows + a tail of 22
    assert shown == pytest.approx(perplexity(model, ids, window=32, batch_size=2))
    assert [b["kwargs"]["delay"] for b in bars] == [2.0, 2.0]                   # real runs: after 2 s only
    assert "score windows: 100%" in bars[0]["out"].getvalue() and "5/5 [" in bars[0]["out"].getvalue()
    assert "2/5 [" in bars[0]["out"].getvalue()                                # moves batch by batch
    assert bars[1]["out"].getvalue() == ""                                       # progress=False: silent
    mtp_acceptance(model, [[1, 2, 3], [4, 5, 6]], k_max=1, new_tokens=4, progress=True)
    assert "MTP acceptance: 100%" in bars[2]["out"].getvalue() and "2/2 [" in bars[2]["out"].getvalue()
