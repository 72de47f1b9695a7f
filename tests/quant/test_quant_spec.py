"""Greedy MTP speculative decoding under quantisation emits exactly the tokens of plain greedy decoding
under the same quantisation, whatever the draft's scheme: the main model verifies every draft.

A random model with a vocabulary of 8 ids, so that random drafts are accepted now and then and the test
sees both accepted and rejected drafts (with the default 97 ids none is accepted, and identity would
hold trivially; with two layers none of w8a8's drafts is). Calibration names the "random" source: the
random model has no tokenizer. A plain compile depends only on the main graph's scheme (mtp_scheme is the
draft's), so each main scheme is compiled plainly once, and its greedy tokens are the reference of every
spec compile with that main scheme (and of the float-vs-w4a8 check).
"""

import copy

import pytest
import torch

import graphopt
from graphopt import api
from graphopt.capture.step import capture_main, capture_mtp
from graphopt.models.random import random_model
from graphopt.quant import PRESETS, CalibrationConfig, QuantConfig

RANDOM_CALIBRATION = CalibrationConfig(sources=(("random", 1.0),), num_samples=4, seq_len=16)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [3, 2, 7, 6, 5], [0, 1]]   # id 0 is eos: ignored, all rows run to 16
QUANT_OPS = ("quantize_per_token", "quantize_per_tensor", "quantize_fp8", "dequantize_weight")


@pytest.fixture(scope="module")
def captured():
    """One model, its graphs captured once; each compile gets fresh copies (capture is the slow part)."""
    model = random_model(vocab_size=8)
    return model, capture_main(model, 4), capture_mtp(model, 0, 4)


@pytest.fixture(scope="module")
def plain_cache():
    return {}


@pytest.fixture
def model(captured, monkeypatch):
    model, main, mtp = captured
    monkeypatch.setattr(api, "capture_main", lambda m, bs, **kw: copy.deepcopy(main))
    monkeypatch.setattr(api, "capture_mtp", lambda m, d, bs, **kw: copy.deepcopy(mtp))
    return model


def _plain(model, cache, config):
    """(compiled, greedy tokens) of a plain (non-speculative) compile under `config`'s main scheme."""
    key = None if config is None else config.replace(mtp_scheme=None)
    if key not in cache:
        compiled = graphopt.compile(model, quant=key, block_size=4, progress=False)
        cache[key] = compiled, compiled.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    return cache[key]


def _quant_nodes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and any(op in str(n.target) for op in QUANT_OPS))


@pytest.mark.parametrize("config, draft_quantised", [
    (PRESETS["w8a8"], True),
    (PRESETS["w4a8"], True),                                      # + grid clipping, calibrated
    (QuantConfig("w8a8", mtp_scheme="bf16"), False),              # the draft kept unquantised
    (QuantConfig("w8a8", mtp_scheme="w4a8"), True),               # the draft quantised harder
], ids=["w8a8", "w4a8", "w8a8-draft-bf16", "w8a8-draft-w4a8"])
def test_speculative_greedy_equals_plain_greedy_under_the_same_quantisation(model, plain_cache, config,
                                                                            draft_quantised):
    config = config.replace(calibration=RANDOM_CALIBRATION)
    plain, expected = _plain(model, plain_cache, config)
    spec = graphopt.compile(model, quant=config, spec="mtp", block_size=4, progress=False)
    # quantised as configured: the main graph always, the draft graph unless it is kept in 16 bit
    assert _quant_nodes(plain.graphs["main"]) > 0 and _quant_nodes(spec.graphs["main"]) > 0
    assert (_quant_nodes(spec.graphs["mtp0"]) > 0) == draft_quantised

    assert spec.generate(PROMPTS, max_new_tokens=16, ignore_eos=True) == expected
    stats = spec.stats
    assert 0 < stats["accepted"] < stats["proposed"]              # both accepted and rejected drafts were verified
    assert [len(o) for o in expected] == [16] * len(PROMPTS)


def test_quantisation_changes_what_greedy_decoding_emits(model, plain_cache):
    # the identity above is between two quantised decodes, not of two float ones: w4a8 moves the output
    w4a8 = PRESETS["w4a8"].replace(calibration=RANDOM_CALIBRATION)
    assert _plain(model, plain_cache, w4a8)[1] != _plain(model, plain_cache, None)[1]
