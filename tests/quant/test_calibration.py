"""Calibration: every expert observed on every token, bounded observers, data mixing and its errors."""

import numpy as np
import pytest
import torch

from graphopt.models.random import random_model
from graphopt.quant.calibration import LayerRunner, attach_observers, calibration_tokens, heldout_tokens
from graphopt.quant.config import CalibrationConfig
from graphopt.quant.observers import Observer, mse_threshold
from graphopt.quant.schemes import QuantError


def test_every_routed_expert_is_observed_on_every_token_and_outputs_stay_routed():
    model = random_model()
    layer = model.model.layers[1]                            # an MoE layer (first_k_dense_replace = 1)
    tokens = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(model, tokens, batch=2, progress=False)
    runner.run(model.model.layers[0], update=True)
    plain = runner.run(layer, update=False)
    gate_up, down = Observer("gu"), Observer("down", per_expert=True)
    handles = attach_observers(layer, {"mlp.experts": ("experts", (gate_up, down))})
    hooked = runner.run(layer, update=False)
    for h in handles:
        h.remove()
    assert torch.equal(plain, hooked)                        # observing changes nothing
    E = model.config.n_routed_experts
    assert down.channel_amax().shape == (E, model.config.moe_intermediate_size)
    assert (down.channel_amax() > 0).all(dim=1).all()        # no expert without data
    assert down.tokens == gate_up.tokens == tokens.numel()   # ... and each saw all 30 tokens
    assert down.rows().shape[:2] == (E, 30)


def test_observer_keeps_a_bounded_uniform_sample_and_exact_amax():
    obs = Observer("x", max_rows=50, bins=64)
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(40, 8, generator=g) * (i + 1) for i in range(5)]
    for c in chunks:
        obs.observe(c)
    assert obs.rows().shape == (50, 8) and obs.tokens == 200
    torch.testing.assert_close(obs.channel_amax(), torch.cat(chunks).abs().amax(0))
    assert obs.hist.sum() == 200 * 8                          # re-binning keeps every count
    assert obs.hist_max == float(torch.cat(chunks).abs().max())


def test_mse_threshold_clips_a_long_tail():
    hist = torch.zeros(1000, dtype=torch.float64)
    hist[:100] = 1000.0                                       # bulk below 10% of the max ...
    hist[-1] = 1.0                                            # ... and one outlier
    t = mse_threshold(hist, 100.0)
    assert t < 100.0


def test_unobserved_matmul_is_a_clear_error():
    with pytest.raises(RuntimeError, match="saw no data"):
        Observer("model.layers.0.mlp.down_proj").channel_amax()


def test_sources_are_mixed_in_ratio(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.pt"
    np.full(1000, 5, dtype="<u2").tofile(a)
    torch.save(torch.full((1000,), 7), b)
    cfg = CalibrationConfig(sources=((f"tokens:{a}", 3.0), (f"tokens:{b}", 1.0)), num_samples=8, seq_len=16)
    out = calibration_tokens(cfg, vocab_size=97)
    assert out.shape == (8, 16)
    assert int((out[:, 0] == 5).sum()) == 6 and int((out[:, 0] == 7).sum()) == 2


def test_default_source_falls_back_to_heldout_minus_the_evaluation_slice(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHOPT_CORPUS", str(tmp_path))      # nothing there, and
    monkeypatch.chdir(tmp_path)                               # no ./.cache/corpus either
    import graphopt.quant.calibration as cal
    monkeypatch.setattr(cal, "_corpus_train_file", lambda: None)
    eval_slice, rest = heldout_tokens()
    got = cal.source_tokens("default")
    assert torch.equal(got, rest) and len(eval_slice) > 0


def test_bad_sources_and_foreign_tokens_are_refused(tmp_path):
    with pytest.raises(QuantError, match="unknown calibration source 'wiki'"):
        calibration_tokens(CalibrationConfig(sources=(("wiki", 1.0),)), 97)
    with pytest.raises(FileNotFoundError, match="not found"):
        calibration_tokens(CalibrationConfig(sources=((f"tokens:{tmp_path}/none.bin", 1.0),)), 97)
    big = tmp_path / "big.pt"
    torch.save(torch.arange(500), big)
    with pytest.raises(QuantError, match=r"token id \d+ >= the model's vocab_size 97"):
        calibration_tokens(CalibrationConfig(sources=((f"tokens:{big}", 1.0),), num_samples=2, seq_len=8), 97)
    with pytest.raises(QuantError, match=r"sources needs \(spec, ratio > 0\)"):
        CalibrationConfig(sources=(("default", 0.0),))


def test_step_inputs_are_contiguous(model):
    # the captured graphs' views were traced on contiguous inputs: a sliced MTP input broke a view on
    # CUDA (C8 + MTP on the H200), so every calibration input must be contiguous
    from graphopt.quant.calibration import step_inputs
    tokens = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    inputs = step_inputs(model, tokens, block_size=4, batch=2)
    assert set(inputs) == {"main", *(f"mtp{d}" for d in range(len(model.mtp)))} and inputs["mtp0"]
    for name, steps in inputs.items():
        for args in steps:
            flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
            assert all(t.is_contiguous() for t in flat), name
