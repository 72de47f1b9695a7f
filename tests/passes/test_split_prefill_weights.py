"""split_prefill_weights (QuantConfig.prefill_scheme): the prefill graph is quantised with its own
scheme and the decode steps with `scheme`, each exactly as a compile with that one scheme would make
it, saved and loaded together; bad input is a clear error before any work. The prefill graph returns token
ids: with two layers w8a8 and w4a8 pick the same ones, so the negative check needs the 3-layer model."""

import copy

import pytest
import torch

import graphopt
from graphopt import api
from graphopt.capture.step import capture_main
from graphopt.models.random import random_model
from graphopt.passes.base import count_ops
from graphopt.passes.split_prefill_weights import PREFILL_MAIN, quant_config_for
from graphopt.quant import CalibrationConfig, QuantConfig, QuantError, quantize_model

RANDOM_CALIBRATION = CalibrationConfig(sources=(("random", 1.0),), num_samples=2, seq_len=16)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]


@pytest.fixture(scope="module")
def captured():
    model = random_model(vocab_size=16)
    return model, capture_main(model, 4)


def _stub_capture(monkeypatch, captured):
    model, main = captured
    monkeypatch.setattr(api, "capture_main", lambda m, bs, **kw: copy.deepcopy(main))
    return model


@pytest.fixture
def model(captured, monkeypatch):
    """The model, with capture replaced by a copy of its graph captured once (capture is the slow part)."""
    return _stub_capture(monkeypatch, captured)


@pytest.fixture(scope="module")
def split_w4a8_w8a8(captured):
    """w4a8 decode steps, w8a8 prefill: one compile, read (never changed) by the tests that need it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _compile(_stub_capture(monkeypatch, captured), QuantConfig("w4a8", prefill_scheme="w8a8"))


def _compile(model, quant):
    return graphopt.compile(model, quant=quant, block_size=4, progress=False)


def _ops(gm, name):
    return count_ops(gm).get(f"graphopt.{name}.default", 0)


def _same_outputs(a, b, inputs) -> bool:
    with torch.no_grad():
        x, y = a(*inputs(0)), b(*inputs(0))
    leaves = torch.utils._pytree.tree_leaves
    return all(torch.equal(u, v) for u, v in zip(leaves(x), leaves(y), strict=True))


def test_prefill_and_decode_each_equal_a_one_scheme_compile(model, split_w4a8_w8a8):
    split = split_w4a8_w8a8
    assert list(split.graphs) == ["main", "step", "step_greedy", "prefill"]      # the copy is spliced, then gone
    assert _ops(split.graphs["prefill"], "int8_matmul") > 0 and _ops(split.graphs["prefill"], "w4a8_matmul") == 0
    for name in ("main", "step", "step_greedy"):
        assert _ops(split.graphs[name], "w4a8_matmul") > 0 and _ops(split.graphs[name], "int8_matmul") == 0, name
    w8a8, w4a8 = _compile(model, "w8a8"), _compile(model, QuantConfig("w4a8"))
    inputs = split.program.make_inputs
    assert _same_outputs(split.graphs["prefill"], w8a8.graphs["prefill"], inputs["prefill"])
    assert _same_outputs(split.graphs["step"], w4a8.graphs["step"], inputs["step"])
    assert not _same_outputs(split.graphs["prefill"], w4a8.graphs["prefill"], inputs["prefill"])  # negative
    assert f"{PREFILL_MAIN}/split_prefill_weights" in split.report.notes


def test_calibrated_prefill_scheme_reuses_main_statistics(model):
    config = QuantConfig("w4a8", prefill_scheme="w8a8_static", calibration=RANDOM_CALIBRATION)
    split = _compile(model, config)
    assert _ops(split.graphs["prefill"], "quantize_per_tensor") > 0 and _ops(split.graphs["step"], "quantize_per_tensor") == 0
    assert "observed on main" in split.report.notes[f"{PREFILL_MAIN}/quant_calibrate"]
    static = _compile(model, QuantConfig("w8a8_static", calibration=RANDOM_CALIBRATION))
    inputs = split.program.make_inputs["prefill"]
    assert _same_outputs(split.graphs["prefill"], static.graphs["prefill"], inputs)   # the same static scales


def test_saved_and_loaded_together(split_w4a8_w8a8, tmp_path):
    split = split_w4a8_w8a8
    split.save(tmp_path / "artefact")
    loaded = graphopt.load_compiled(tmp_path / "artefact")
    assert loaded.quant == split.quant and loaded.quant.prefill_scheme == "w8a8"
    assert list(loaded.graphs) == list(split.graphs)
    assert _ops(loaded.graphs["prefill"], "int8_matmul") == _ops(split.graphs["prefill"], "int8_matmul") > 0
    assert _ops(loaded.graphs["step"], "w4a8_matmul") == _ops(split.graphs["step"], "w4a8_matmul") > 0
    for name, inputs in split.program.make_inputs.items():
        assert _same_outputs(split.graphs[name], loaded.graphs[name], inputs), name
    expected = split.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert loaded.generate(PROMPTS, max_new_tokens=8, ignore_eos=True) == expected


def test_config_round_trip_and_which_graph_gets_which_scheme():
    config = QuantConfig("w4a8", prefill_scheme="w8a8", mtp_scheme="bf16")
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert config.separate_prefill and not QuantConfig("w8a8", prefill_scheme="w8a8").separate_prefill
    prefill = quant_config_for(config, PREFILL_MAIN)
    assert (prefill.scheme, prefill.prefill_scheme, prefill.mtp_scheme) == ("w8a8", None, "bf16")
    assert quant_config_for(config, "main") is config and quant_config_for(config, "mtp0") is config
    assert {s.name for s in config.used_schemes()} == {"w4a8", "w8a8", "bf16"}


def test_same_scheme_adds_no_phase(model):
    compiled = _compile(model, QuantConfig("w8a8", prefill_scheme="w8a8"))
    assert not any(r.name == "split_prefill_weights" for r in compiled.report.records)


def test_bad_input_is_a_clear_error_before_any_work(model):
    with pytest.raises(QuantError, match="unknown"):
        QuantConfig("w4a8", prefill_scheme="w9a9")
    with pytest.raises(QuantError, match="prefill_scheme and mixed_precision cannot be combined"):
        QuantConfig("w8a8", prefill_scheme="w4a8", mixed_precision=graphopt.quant.MixedPrecisionConfig())
    with pytest.raises(QuantError, match="quantize_model makes one model.*prefill_config"):
        quantize_model(model, QuantConfig("w4a8", prefill_scheme="w8a8"))
    with pytest.raises(ValueError, match="prefill_scheme needs the \\['split_prefill_weights'\\] pass"):
        graphopt.compile(model, quant=QuantConfig("w4a8", prefill_scheme="w8a8"), progress=False,
                         disable_passes=["split_prefill_weights"])


def test_c8_cache_written_by_prefill_has_the_decode_steps_scales(model):
    # the int8 latent cache prefill writes is what decode reads: both graphs must hold the same scales
    split = _compile(model, QuantConfig("w4a8", prefill_scheme="w8a8", kv_cache="int8", calibration=RANDOM_CALIBRATION))
    scales = lambda gm: {k: v for k, v in gm.state_dict().items() if k.endswith("kv_scale")}   # noqa: E731
    prefill, step = scales(split.graphs["prefill"]), scales(split.graphs["step"])
    assert prefill.keys() == step.keys() and len(prefill) == model.config.num_hidden_layers
    assert all(torch.equal(prefill[k], step[k]) for k in prefill)
    assert _ops(split.graphs["prefill"], "int8_matmul") > 0 and _ops(split.graphs["step"], "int8_matmul") == 0
