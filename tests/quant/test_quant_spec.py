"""Greedy MTP speculative decoding under quantisation emits exactly the tokens of plain greedy decoding
under the same quantisation, whatever the draft's scheme: the main model verifies every draft.

A random model with a vocabulary of 8 ids, so that random drafts are accepted now and then and the test
sees both accepted and rejected drafts (with the default 97 ids none is accepted, and identity would
hold trivially). Calibration names the "random" source: the random model has no tokenizer.
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


@pytest.fixture
def model(captured, monkeypatch):
    model, main, mtp = captured
    monkeypatch.setattr(api, "capture_main", lambda m, bs, **kw: copy.deepcopy(main))
    monkeypatch.setattr(api, "capture_mtp", lambda m, d, bs, **kw: copy.deepcopy(mtp))
    return model


def _quant_nodes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and any(op in str(n.target) for op in QUANT_OPS))


@pytest.mark.parametrize("config, draft_quantised", [
    (PRESETS["w8a8"], True),
    (PRESETS["w4a8"], True),                                      # + grid clipping, calibrated
    (QuantConfig("w8a8", mtp_scheme="bf16"), False),              # the draft kept unquantised
    (QuantConfig("w8a8", mtp_scheme="w4a8"), True),               # the draft quantised harder
], ids=["w8a8", "w4a8", "w8a8-draft-bf16", "w8a8-draft-w4a8"])
def test_speculative_greedy_equals_plain_greedy_under_the_same_quantisation(model, config, draft_quantised):
    config = config.replace(calibration=RANDOM_CALIBRATION)
    plain = graphopt.compile(model, quant=config, block_size=4, progress=False)
    spec = graphopt.compile(model, quant=config, spec="mtp", block_size=4, progress=False)
    # quantised as configured: the main graph always, the draft graph unless it is kept in 16 bit
    assert _quant_nodes(plain.graphs["main"]) > 0 and _quant_nodes(spec.graphs["main"]) > 0
    assert (_quant_nodes(spec.graphs["mtp0"]) > 0) == draft_quantised

    expected = plain.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert spec.generate(PROMPTS, max_new_tokens=16, ignore_eos=True) == expected
    stats = spec.stats
    assert 0 < stats["accepted"] < stats["proposed"]              # both accepted and rejected drafts were verified
    assert [len(o) for o in expected] == [16] * len(PROMPTS)


def test_quantisation_changes_what_greedy_decoding_emits(model):
    # the identity above is between two quantised decodes, not of two float ones: w4a8 moves the output
    w4a8 = PRESETS["w4a8"].replace(calibration=RANDOM_CALIBRATION)
    float_out = graphopt.compile(model, block_size=4, progress=False).generate(PROMPTS, 16, ignore_eos=True)
    w4a8_out = graphopt.compile(model, quant=w4a8, block_size=4, progress=False).generate(PROMPTS, 16, ignore_eos=True)
    assert w4a8_out != float_out
