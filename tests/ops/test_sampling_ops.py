"""graphopt sampling / acceptance ops: filters against a sort-based float64 reference, seeded draws,
and the distribution of speculative sampling (chi-square tests).

Statistical tests: each compares observed token counts with the expected ones by Pearson's
chi-square against the 0.999 quantile (Wilson-Hilferty approximation), so a correct implementation
fails a given test for a given seed with probability ~0.1%. Seeds are fixed, so a run is repeatable.
"""

import math

import pytest
import torch

from graphopt.ops.sampling import STREAM_ACCEPT, STREAM_TOKEN, leading_run, uniform


ops = torch.ops.graphopt


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, float]:
    """Pearson chi-square of counts against probs (categories with p > 0), at a 0.1% false-failure rate."""
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was drawn"
    n = counts.sum().double()
    expected = probs[keep].double() * n
    stat = float(((counts[keep].double() - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    z = 3.0902   # upper 0.1% point of N(0, 1)
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical, stat, critical


def reference_probs(logits, temperature, top_k, top_p, min_p):
    """One row, float64, by sorting: temperature -> top-k -> top-p (renormalised) -> min-p."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).double()
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[: top_k if top_k > 0 else len(order)]] = True
    ranked = torch.where(keep, probs, 0.0)[order]
    ranked = ranked / ranked.sum()
    before = ranked.cumsum(0) - ranked
    keep[order[(before >= top_p) & (top_p < 1)]] = False
    keep &= probs >= min_p * probs.max()
    out = torch.where(keep, probs, 0.0)
    return out / out.sum()


CASES = [  # temperature, top_k, top_p, min_p
    (0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 12, 0.6, 0.0),
    (1.0, 0, 1.0, 0.2), (0.9, 3, 0.95, 0.1), (2.0, 0, 0.3, 0.0), (1.0, 1, 1.0, 0.0), (1.0, 400, 0.9, 0.0),
]


def test_sampling_probs_matches_sorted_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), 300, generator=g) * 2
    t, k, p, m = (torch.tensor(c) for c in zip(*CASES))
    got = ops.sampling_probs(logits, t.float(), k, p.float(), m.float(), 256)
    for row, case in enumerate(CASES):
        ref = reference_probs(logits[row], *case[:1], min(case[1], 256), *case[2:])
        assert torch.equal(got[row] > 0, ref > 0), f"kept set differs for {case}"
        torch.testing.assert_close(got[row].double(), ref, rtol=1e-5, atol=1e-6)
    assert got[0].max() == 1 and got[0].argmax() == logits[0].argmax()          # greedy: one-hot
    assert int((got[8] > 0).sum()) == 1 and int((got[2] > 0).sum()) == 5


def test_full_vocab_top_p_bisection_is_exact_on_a_near_tie():
    # the nucleus boundary sits between two probabilities 1 ulp apart: a float bisection would blur it
    probs = torch.tensor([0.4, 0.3, 0.15000001, 0.15, 0.0], dtype=torch.float64)
    logits = probs.clamp_min(1e-30).log().float()
    got = ops.sampling_probs(logits[None], torch.ones(1), torch.zeros(1, dtype=torch.int64),
                             torch.tensor([0.85]), torch.zeros(1), 256)[0]
    assert (got > 0).tolist() == [True, True, True, False, False]


def test_uniform_is_a_pure_function_of_seed_position_stream():
    seed = torch.tensor([0, 1, 2**40 + 5, -3])
    pos = torch.tensor([7, 7, 7, 7])
    a, b = uniform(seed, pos, STREAM_TOKEN), uniform(seed.clone(), pos.clone(), STREAM_TOKEN)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 4                                             # seeds differ
    assert not torch.equal(a, uniform(seed, pos + 1, STREAM_TOKEN))
    assert not torch.equal(a, uniform(seed, pos, STREAM_ACCEPT))
    many = uniform(torch.arange(50000), torch.zeros(50000, dtype=torch.int64), STREAM_TOKEN)
    assert 0 < float(many.min()) and float(many.max()) < 1
    counts = torch.histc(many, bins=10, min=0, max=1)
    ok, stat, crit = chi2_ok(counts.long(), torch.full((10,), 0.1))
    assert ok, (stat, crit)


def test_sample_from_probs_follows_the_distribution():
    p = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.2, 0.1])
    N = 20000
    tokens = ops.sample_from_probs(p.expand(N, -1).contiguous(), torch.arange(N), torch.full((N,), 11))
    ok, stat, crit = chi2_ok(torch.bincount(tokens, minlength=6), p)
    assert ok, (stat, crit)
    again = ops.sample_from_probs(p.expand(N, -1).contiguous(), torch.arange(N), torch.full((N,), 11))
    assert torch.equal(tokens, again)


def test_greedy_accept_cases():
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7]])
    out, acc = ops.greedy_accept(target, drafts)
    assert acc.tolist() == [3, 1, 0]
    assert out.tolist() == [[5, 6, 7, 8], [5, 6, -1, -1], [5, -1, -1, -1]]     # bonus / correction
    out0, acc0 = ops.greedy_accept(target[:, :1], drafts[:, :0])                # k = 0: plain decoding
    assert out0.tolist() == [[5], [5], [5]] and acc0.tolist() == [0, 0, 0]


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_leading_run_is_the_cumulative_product_count(k):
    gen = torch.Generator().manual_seed(k)
    ok = torch.rand(64, k, generator=gen) < 0.8
    ok[0], ok[-1] = True, False                                   # every draft kept / none kept
    assert leading_run(ok).dtype == torch.int64
    assert torch.equal(leading_run(ok), ok.long().cumprod(dim=1).sum(dim=1))


def test_rejection_accept_with_one_hot_targets_is_greedy():
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [2, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7]])
    probs = torch.nn.functional.one_hot(target, 10).float()
    got = ops.rejection_accept(probs, drafts, None, torch.tensor([3, 4, 5]), torch.tensor([10, 0, 7]))
    want = ops.greedy_accept(target, drafts)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _spec_setup(N, seed=0):
    """Synthetic target p (3 positions) and draft q (2 positions) over 5 tokens; drafts drawn from q."""
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0], [0.3, 0.1, 0.1, 0.2, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.3, 0.3, 0.1, 0.1, 0.2], [0.05, 0.05, 0.6, 0.2, 0.1]])
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(2)], dim=1)
    return p, q, drafts


@pytest.mark.parametrize("greedy_drafts", [False, True])
def test_speculative_sampling_emits_the_target_distribution(greedy_drafts):
    N = 40000
    p, q, drafts = _spec_setup(N)
    if greedy_drafts:   # q one-hot at a fixed token: accept with probability p(x), resample without x
        drafts = torch.tensor([[3, 2]]).expand(N, 2).contiguous()
    out, acc = ops.rejection_accept(p.expand(N, -1, -1).contiguous(), drafts,
                                    None if greedy_drafts else q.expand(N, -1, -1).contiguous(),
                                    torch.arange(N) * 7 + 1, torch.randint(0, 100, (N,), generator=torch.Generator()))
    for j in range(3):   # the token at index j, over the rows that emitted it, follows p_j
        rows = acc >= j
        ok, stat, crit = chi2_ok(torch.bincount(out[rows, j], minlength=5), p[j])
        assert ok, (j, stat, crit)
    x = drafts[0, 0]
    rate = float(p[0, x]) if greedy_drafts else float(torch.minimum(p[0], q[0]).sum())   # P(accept draft 1)
    assert abs(float((acc >= 1).double().mean()) - rate) < 4 * math.sqrt(rate * (1 - rate) / N)


def test_acceptance_draws_do_not_depend_on_batch_composition():
    N = 64
    p, q, drafts = _spec_setup(N, seed=1)
    probs, qs = p.expand(N, -1, -1).contiguous(), q.expand(N, -1, -1).contiguous()
    seed, start = torch.arange(N) + 100, torch.arange(N) % 9
    out, acc = ops.rejection_accept(probs, drafts, qs, seed, start)
    for rows in ([5], [17, 3], list(range(40, 64, 3))):
        o, a = ops.rejection_accept(probs[rows], drafts[rows], qs[rows], seed[rows], start[rows])
        assert torch.equal(o, out[rows]) and torch.equal(a, acc[rows])


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match=r"top_k must be \[N\]"):
        ops.sampling_probs(torch.zeros(3, 7), torch.ones(3), torch.zeros(2, dtype=torch.int64), torch.ones(3),
                           torch.zeros(3), 8)
    with pytest.raises(ValueError, match=r"target must be \[B, 1\+k, \.\.\.\] for draft_tokens \[B, k\]"):
        ops.greedy_accept(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))
