"""Device sampling: draws fixed by (seed, position), filters honoured, frequencies follow the distribution."""

import pytest
import torch

from graphopt.runtime.sampling import filtered_probs, sample, uniform


def _row(n, **kw):
    """Per-row parameter tensors for n rows (defaults: sampling on, every filter off)."""
    p = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    p.update(kw)
    return (torch.full((n,), float(p["temperature"])), torch.full((n,), p["top_k"], dtype=torch.int64),
            torch.full((n,), float(p["top_p"])), torch.full((n,), float(p["min_p"])))


def test_uniform_is_a_function_of_seed_position_and_stream():
    seed = torch.tensor([7, 7, 8, -3, 2**62])
    pos = torch.tensor([10, 10, 10, 10, 10])
    u = uniform(seed, pos)
    assert u[0] == u[1] and u[0] != u[2] and u[3] != u[0]
    assert torch.equal(u, uniform(seed.clone(), pos.clone()))           # no hidden state
    assert not torch.equal(u, uniform(seed, pos, stream=1))
    assert not torch.equal(u, uniform(seed, pos + 1))
    # a row's draw does not depend on the other rows of the batch
    assert uniform(seed[2:3], pos[2:3])[0] == u[2]


def test_uniform_is_uniform_and_decorrelated():
    pos = torch.arange(20000)
    u = uniform(torch.tensor(123), pos)
    assert u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float((hist - 2000).abs().max()) < 200                       # ~4.5 sigma
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(lag)) < 0.03
    seeds = uniform(torch.arange(20000), torch.tensor(5))                # across seeds too
    assert abs(float(seeds.mean()) - 0.5) < 0.01


def test_greedy_rows_take_the_argmax_whatever_the_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    t, k, p, m = _row(4, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2)
    got = sample(logits, t, k, p, m, torch.arange(4), torch.zeros(4, dtype=torch.int64))
    assert torch.equal(got, logits.argmax(-1))


def test_sampled_frequencies_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    n = 8000
    t, k, p, m = _row(n, temperature=1.0)
    draws = sample(logits.expand(n, -1), t, k, p, m, torch.full((n,), 42), torch.arange(n))
    freq = torch.bincount(draws, minlength=5).float() / n
    expected = logits[0].softmax(-1)
    assert float((freq - expected).abs().max()) < 0.02
    assert int((draws == 4).sum()) == 0


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    n = 4000
    hot = sample(logits.expand(n, -1), *_row(n, temperature=2.0), torch.full((n,), 1), torch.arange(n))
    cold = sample(logits.expand(n, -1), *_row(n, temperature=0.25), torch.full((n,), 1), torch.arange(n))
    assert (cold == 0).float().mean() > 0.9 > (hot == 0).float().mean() > 0.3


@pytest.mark.parametrize("name,value,allowed", [
    ("top_k", 2, {0, 1}),
    ("top_p", 0.6, {0, 1}),          # probs ~ .47 .29 .17 .07: .47 < .6 so the second is needed
    ("min_p", 0.5, {0, 1}),          # .29 >= .5 * .47, .17 is not
])
def test_filters_remove_tokens(name, value, allowed):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.9]])
    n = 3000
    draws = sample(logits.expand(n, -1), *_row(n, **{name: value}), torch.full((n,), 9), torch.arange(n))
    assert set(draws.tolist()) == allowed


def test_filters_compose_per_row():
    """Each row uses its own parameters: row 0 top-k 1 (always the best), row 1 unfiltered."""
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3]] * 2)
    probs, ids = filtered_probs(logits, torch.ones(2), torch.tensor([1, 0]), torch.ones(2), torch.zeros(2))
    assert torch.equal(ids[0], torch.tensor([3, 2, 1, 0]))
    assert torch.allclose(probs[0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(probs[1], logits[1].sort(descending=True).values.softmax(-1))
    assert torch.allclose(probs.sum(-1), torch.ones(2))


def test_same_seed_and_position_same_token_in_any_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=gen)
    seeds, pos = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([9, 9, 4, 4, 100, 0])
    batched = sample(logits, *_row(6, temperature=0.8, top_p=0.9), seeds, pos)
    for i in range(6):
        alone = sample(logits[i:i + 1], *_row(1, temperature=0.8, top_p=0.9), seeds[i:i + 1], pos[i:i + 1])
        assert alone[0] == batched[i]
