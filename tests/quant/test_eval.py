"""Bootstrap intervals over evaluation windows (quant.eval.bootstrap_interval) and the per-window sums behind them."""

import math

import pytest
import torch

from graphopt.models.random import random_model
from graphopt.quant import quantize_model
from graphopt.quant.eval import MEASURES, PrefillDecode, bootstrap_interval, compare, shared_span_windows, windows_from

mean = lambda s: s["x"] / s["n"]   # noqa: E731


def _columns(x) -> dict:
    x = torch.as_tensor(x, dtype=torch.float64)
    return {"x": x, "n": torch.ones_like(x)}


def test_interval_matches_a_hand_computation():
    # windows x = [0, 1, 1, 1]: a resample's mean is K/4 with K ~ Binomial(4, 3/4).
    # P(K = 0) = 1/256 < 2.5% < P(K <= 1) = 13/256, so the 2.5% quantile is 1/4;
    # P(K = 4) = 81/256 > 2.5%, so the 97.5% quantile is 1.
    assert bootstrap_interval(mean, _columns([0, 1, 1, 1]), resamples=4000) == (0.25, 1.0)
    # x = [0, 0, 1]: P(K = 0) = 8/27 and P(K = 3) = 1/27 both exceed 2.5%: the interval is [0, 1]
    assert bootstrap_interval(mean, _columns([0, 0, 1]), resamples=4000) == (0.0, 1.0)


def test_interval_of_a_mean_matches_the_normal_approximation_and_narrows_with_more_windows():
    gen = torch.Generator().manual_seed(0)
    widths = {}
    for n in (25, 400):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 2 + 5
        low, high = bootstrap_interval(mean, _columns(x), resamples=4000, seed=1)
        half = 1.96 * float(x.std(unbiased=False)) / math.sqrt(n)          # bootstrap sd of a mean: s / sqrt(n)
        assert low < float(x.mean()) < high
        assert (high - low) / 2 == pytest.approx(half, rel=0.1)
        widths[n] = high - low
    assert 3 < widths[25] / widths[400] < 5.5                               # ~ sqrt(400 / 25) = 4


def test_ratio_measures_resample_whole_windows_with_their_weights():
    # one window of 3 tokens all hits, one of 1 token no hit: resamples give 0, 3/4 or 1 only
    cols = {"x": torch.tensor([3.0, 0.0]), "n": torch.tensor([3.0, 1.0])}
    low, high = bootstrap_interval(mean, cols, resamples=2000)
    assert (low, high) == (0.0, 1.0)
    assert bootstrap_interval(mean, cols, resamples=2000, level=0.4) == (0.75, 0.75)   # P(3/4) = 1/2


def test_interval_is_seeded_and_checks_its_arguments():
    cols = _columns(torch.arange(10.0))
    assert bootstrap_interval(mean, cols, seed=3) == bootstrap_interval(mean, cols, seed=3)
    assert bootstrap_interval(mean, cols, seed=3) != bootstrap_interval(mean, cols, seed=4)
    with pytest.raises(ValueError, match="0 < level < 1"):
        bootstrap_interval(mean, cols, level=1.0)


@pytest.fixture(scope="module")
def evaluated():
    model = random_model()
    ids = torch.randint(0, 97, (24 * 40,), generator=torch.Generator().manual_seed(0))
    windows = windows_from(ids, 24)                                         # 40 windows
    q = quantize_model(model, "w4a8", windows[:4], progress=False)
    few = compare(model, {"same": model, "w4a8": q}, windows[:10], batch=8)
    many = compare(model, {"w4a8": q}, windows, batch=8)
    return few, many


def test_compare_keeps_per_window_sums_that_add_up_to_the_point_estimates(evaluated):
    few, many = evaluated
    s = many["w4a8"]
    assert s.windows == 40 and s.tokens == 40 * 23 and len(s.per_window["kl"]) == 40
    total = {k: v.sum() for k, v in s.per_window.items()}
    assert float(MEASURES["kl"](total)) == pytest.approx(s.kl, rel=1e-12)
    assert float(MEASURES["ppl_change"](total)) == pytest.approx(s.ppl_change, rel=1e-9)
    assert float(MEASURES["mtp_accept_change"](total)) == pytest.approx(s.mtp_accept - s.base_mtp_accept, abs=1e-12)


def test_intervals_contain_the_point_estimate_and_narrow_with_more_windows(evaluated):
    few, many = evaluated
    for stats in (few["w4a8"], many["w4a8"]):
        point = {"kl": stats.kl, "top1": stats.top1, "ppl_change": stats.ppl_change, "mtp_accept": stats.mtp_accept,
                 "mtp_accept_change": stats.mtp_accept - stats.base_mtp_accept}
        assert set(stats.ci) == set(point)
        for name, value in point.items():
            low, high = stats.ci[name]
            assert low <= value <= high, (name, low, value, high)
        assert stats.ci["kl"][0] > 0                                         # quantisation error is not noise
    width = lambda s, m: s.ci[m][1] - s.ci[m][0]                             # noqa: E731
    assert width(many["w4a8"], "kl") < width(few["w4a8"], "kl")
    assert width(many["w4a8"], "top1") < width(few["w4a8"], "top1")


def test_a_model_against_itself_has_zero_width_paired_intervals(evaluated):
    same = evaluated[0]["same"]
    assert same.ci["ppl_change"] == (0.0, 0.0) and same.ci["top1"] == (1.0, 1.0)
    assert same.ci["mtp_accept_change"] == (0.0, 0.0)
    assert abs(same.ci["kl"][0]) < 1e-9 and abs(same.ci["kl"][1]) < 1e-9
    assert same.as_dict()["ci"]["top1"] == [1.0, 1.0] and "per_window" not in same.as_dict()


def test_compare_without_resamples_gives_no_intervals():
    model = random_model()
    windows = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    assert compare(model, {"same": model}, windows, resamples=0)["same"].ci == {}


def test_shared_span_windows_finds_windows_cut_from_the_stream_only():
    stream = torch.randint(0, 97, (500,), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    windows = torch.cat([other, stream[100:140][None]])
    assert shared_span_windows(windows, stream, span=32) == 1
    assert shared_span_windows(other, stream, span=32) == 0
    half = torch.cat([stream[200:220], other[0, :20]])[None]                 # 20 shared tokens < span
    assert shared_span_windows(half, stream, span=32) == 0 and shared_span_windows(half, stream, span=16) == 1


def test_prefill_decode_over_one_model_equals_its_full_forward():
    # the cache path (prefill the prefix, decode the rest over its cache) computes what one causal forward does
    model = random_model().double()
    ids = torch.randint(0, 97, (3, 37), generator=torch.Generator().manual_seed(0))
    split = PrefillDecode(model, model, prefix=20, block_size=4)
    logits, hidden = split(ids, return_hidden=True)
    full, full_hidden = model(ids, return_hidden=True)
    torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hidden, full_hidden, rtol=1e-9, atol=1e-9)
    same = compare(model, {"split": split}, ids, score_from=20, resamples=0)["split"]
    assert same.tokens == 3 * 16 and same.top1 == 1.0 and abs(same.kl) < 1e-12


def test_prefill_decode_prefills_with_one_weight_set_and_decodes_with_the_other():
    model = random_model()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    w8a8, w4a8 = (quantize_model(model, s, ids, progress=False) for s in ("w8a8", "w4a8"))
    logits = PrefillDecode(w8a8, w4a8, prefix=18)(ids)
    torch.testing.assert_close(logits[:, :18], w8a8(ids)[:, :18])            # the prefix: the prefill weights
    decoded = logits[:, 18:]
    assert not torch.allclose(decoded, w8a8(ids)[:, 18:], atol=1e-4)        # the rest: neither model alone,
    assert not torch.allclose(decoded, w4a8(ids)[:, 18:], atol=1e-4)        # w4a8 over a cache w8a8 wrote
    decode_only = PrefillDecode(w4a8, w4a8, prefix=18)(ids)[:, 18:]
    torch.testing.assert_close(decode_only, w4a8(ids)[:, 18:], rtol=1e-4, atol=1e-4)


def test_prefill_decode_and_score_from_check_their_arguments():
    model = random_model()
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix must be >= 1"):
        PrefillDecode(model, model, prefix=0)
    with pytest.raises(ValueError, match="nothing to decode after 8"):
        PrefillDecode(model, model, prefix=8)(ids)
    with pytest.raises(ValueError, match=r"score_from must be in \[0, 6\]"):
        compare(model, {"same": model}, ids, score_from=7)
