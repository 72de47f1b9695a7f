"""The step contract's dataclasses reject malformed inputs with the field name and what is expected."""

import pytest
import torch

from graphopt.step.contract import SpecPrefillInputs, SpecStepInputs, StepProvider, window
from graphopt.step.reference_provider import ReferenceStepProvider


def _decode_inputs(B=2, k=0, **over):
    f = dict(tokens=torch.zeros(B, 1 + k, dtype=torch.int64), start_pos=torch.zeros(B, dtype=torch.int64),
             block_tables=torch.zeros(B, 3, dtype=torch.int64), temperature=torch.zeros(B),
             top_k=torch.zeros(B, dtype=torch.int64), top_p=torch.ones(B), min_p=torch.zeros(B),
             seed=torch.zeros(B, dtype=torch.int64), eos_token_id=torch.full((B,), -1),
             max_pos=torch.full((B,), 10), active=torch.ones(B, dtype=torch.bool))
    f.update(over)
    return SpecStepInputs(**f)


def test_valid_inputs_pass():
    _decode_inputs().validate()
    _decode_inputs(B=3, k=2).validate()


@pytest.mark.parametrize("field,bad,message", [
    ("start_pos", torch.zeros(3, dtype=torch.int64), r"start_pos: expected shape \(2,\)"),
    ("temperature", torch.zeros(2, dtype=torch.float64), "temperature: expected .* torch.float32"),
    ("active", torch.ones(2, dtype=torch.int64), "active: expected .* torch.bool"),
    ("block_tables", torch.zeros(2, dtype=torch.int64), r"block_tables: expected \[2, M\] int64"),
    ("tokens", torch.zeros(2, dtype=torch.int64), r"tokens: expected \[B, 1\+k\]"),
])
def test_bad_field_is_named(field, bad, message):
    with pytest.raises(ValueError, match=message):
        _decode_inputs(**{field: bad}).validate()


def test_prefill_flag_must_be_a_python_bool():
    B = 1
    inputs = SpecPrefillInputs(
        ids=torch.zeros(B, 4, dtype=torch.int64), lengths=torch.full((B,), 4),
        start_pos=torch.zeros(B, dtype=torch.int64),
        block_tables=torch.ones(B, 1, dtype=torch.int64), temperature=torch.zeros(B),
        top_k=torch.zeros(B, dtype=torch.int64), top_p=torch.ones(B), min_p=torch.zeros(B),
        seed=torch.zeros(B, dtype=torch.int64), eos_token_id=torch.full((B,), -1), max_pos=torch.full((B,), 9),
        is_last_chunk=torch.tensor(True))
    with pytest.raises(ValueError, match="is_last_chunk: expected a python bool"):
        inputs.validate()


def test_window_covers_verify_and_chained_drafts():
    # k + 1 verified positions, then up to k - 1 chained MTP positions after s + num_emitted
    assert [window(k) for k in range(5)] == [1, 3, 5, 7, 9]
    for k in range(2, 5):  # all accepted: the last chained draft writes s + (k + 1) + (k - 2)
        assert (k + 1) + (k - 2) < window(k)


def test_reference_provider_satisfies_the_protocol(model):
    assert isinstance(ReferenceStepProvider.from_model(model), StepProvider)
    assert not isinstance(object(), StepProvider)
