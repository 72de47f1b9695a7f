"""Every quantisation preset compiles with no tensor created off the model's device.

A GPU run of the same bug class is `benchmarks/quant_sweep.py` (and tests/test_gpu.py). Here, without a
GPU, the quant passes run with the *default* device set to `meta` while the model lives on the CPU:
a tensor created without an explicit device (a scale, a clipping grid, a Hadamard matrix, an observer
histogram) lands on `meta`, and the first op that mixes it with a CPU weight or activation raises, as
`cuda:0` and `cpu` do on a GPU. Observer statistics follow the observed activations' device, so they
are covered too. What this cannot see: a tensor moved to the CPU explicitly (`.cpu()`) on purpose.
"""

import copy

import pytest
import torch

import graphopt
from graphopt import api
from graphopt.capture.step import capture_main, capture_mtp
from graphopt.models.random import random_model
from graphopt.passes.quant_calibrate import QuantCalibratePass
from graphopt.passes.quant_insert import QuantInsertPass
from graphopt.quant import PRESETS, CalibrationConfig


@pytest.fixture(scope="module")
def captured():
    """One model, its graphs captured once; each compile gets fresh copies (capture is the slow part)."""
    model = random_model()
    return model, capture_main(model, 4), capture_mtp(model, 0, 4)


@pytest.fixture
def model(captured, monkeypatch):
    model, main, mtp = captured
    monkeypatch.setattr(api, "capture_main", lambda m, bs, **kw: copy.deepcopy(main))
    monkeypatch.setattr(api, "capture_mtp", lambda m, d, bs, **kw: copy.deepcopy(mtp))
    return model


@pytest.fixture
def default_device_meta(monkeypatch):
    """Run the quantisation passes with torch's default device set to meta."""
    for cls in (QuantCalibratePass, QuantInsertPass):
        run = cls.run

        def guarded(self, gm, ctx, _run=run):
            with torch.device("meta"):
                return _run(self, gm, ctx)
        monkeypatch.setattr(cls, "run", guarded)


def test_the_guard_catches_an_implicit_device(default_device_meta):
    # the check itself: a tensor made without device= under the guard cannot meet a CPU tensor
    with torch.device("meta"):
        scale = torch.ones(4)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ones(4) * scale + torch.zeros(4).sum().item()


def _random_calibration(preset: str):
    """The preset calibrated on random ids (named: the random model has no tokenizer), a few short steps."""
    return PRESETS[preset].replace(calibration=CalibrationConfig(sources=(("random", 1.0),), num_samples=4, seq_len=16))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_compiles_and_generates_with_no_tensor_off_device(preset, model, default_device_meta):
    # the step fusion runs after quantisation and creates no quantised tensor: off, for time
    compiled = graphopt.compile(model, quant=_random_calibration(preset), block_size=4, progress=False,
                                disable_passes=["fuse_spec_step"])
    out = compiled.generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    for gm in compiled.graphs.values():
        for name, t in gm.named_buffers():
            assert t.device.type == "cpu", f"{preset}: buffer {name} on {t.device}"


@pytest.mark.parametrize("preset", ["w8a8_c8"])   # C8 failed only with MTP on the H200
def test_preset_with_mtp_compiles_with_no_tensor_off_device(preset, model, default_device_meta):
    plain = graphopt.compile(model, quant=_random_calibration(preset), block_size=4, progress=False)
    spec = graphopt.compile(model, quant=_random_calibration(preset), spec="mtp", block_size=4, progress=False)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    assert spec.generate(prompts, max_new_tokens=6) == plain.generate(prompts, max_new_tokens=6)
