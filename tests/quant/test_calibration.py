"""Calibration: experts observed on their routed tokens, bounded observers, the model's own tokenizer,
data mixing and its errors."""

import json

import numpy as np
import pytest
import torch

from graphopt.models.random import random_model
from graphopt.models.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from graphopt.quant.calibration import (LayerRunner, attach_observers, calibration_data, calibration_tokens,
                                        heldout_tokens, model_tokenizer)
from graphopt.quant.config import CalibrationConfig, QuantConfig
from graphopt.quant.observers import Observer, mse_threshold
from graphopt.quant.schemes import QuantError


def _moe_layer_run(model, tokens, min_routed, gate_up=None):
    """Observe layer 1's experts on `tokens` and recompute, from the model itself, what each expert's
    down_proj input is and which tokens the router sent to it. gate_up: its observer (default a plain one)."""
    layer = model.model.layers[1]                            # an MoE layer (first_k_dense_replace = 1)
    runner = LayerRunner(model, tokens, batch=2, progress=False)
    runner.run(model.model.layers[0], update=True)
    plain = runner.run(layer, update=False)
    gate_up, down = gate_up or Observer("gu"), Observer("down", per_expert=True, min_routed=min_routed)
    seen = []
    handles = attach_observers(layer, {"mlp.experts": ("experts", (gate_up, down))})
    handles.append(layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))))
    hooked = runner.run(layer, update=False)
    for h in handles:
        h.remove()
    assert torch.equal(plain, hooked)                        # observing changes nothing
    x = torch.cat(seen)                                      # [N, H] the MoE input of every token
    _, ids = layer.mlp.gate(x)
    E = model.config.n_routed_experts
    routed = torch.zeros(x.shape[0], E, dtype=torch.bool).scatter_(1, ids, True).T       # [E, N]
    g, u = torch.matmul(x, layer.mlp.experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    return gate_up, down, x, torch.nn.functional.silu(g) * u, routed                      # h: [E, N, I]


def test_each_expert_is_observed_on_the_tokens_routed_to_it():
    model = random_model()
    tokens = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    gate_up, down, x, h, routed = _moe_layer_run(model, tokens, min_routed=1)
    counts = routed.sum(1)
    assert down.expert_tokens.tolist() == counts.tolist() and down.tokens == gate_up.tokens == 30
    assert 0 < int(counts.min()) and int(counts.max()) < 30   # a real routing: nobody gets every token
    for e in range(h.shape[0]):
        torch.testing.assert_close(down.channel_amax()[e], h[e][routed[e]].abs().amax(0))
        own = h[e][routed[e]]                                 # every sampled row is one of e's routed rows
        assert all(bool((own == r).all(-1).any()) for r in down.rows()[e])
        assert not torch.allclose(down.channel_amax()[e], h[e].abs().amax(0))   # dense would differ
    # gate_up's input is the token itself, shared by the experts: every token, once
    torch.testing.assert_close(gate_up.channel_amax(), x.abs().amax(0))


def test_experts_routed_fewer_than_the_threshold_fall_back_to_every_token():
    model = random_model()
    tokens = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    threshold = 8                                             # 30 tokens x top-2 over 8 experts: 7.5 each
    _, down, _, h, routed = _moe_layer_run(model, tokens, min_routed=threshold)
    counts = routed.sum(1)
    expected = [e for e in range(len(counts)) if counts[e] < threshold]
    assert down.dense_experts() == expected and 0 < len(expected) < len(counts)
    for e in range(h.shape[0]):
        rows = h[e] if e in expected else h[e][routed[e]]
        torch.testing.assert_close(down.channel_amax()[e], rows.abs().amax(0))


def test_routed_samples_stay_exact_when_the_reservoir_is_full():
    # more tokens than max_rows: a routed expert's sample holds only its rows; a fallback expert's is a
    # uniform sample of every token (the top-u rows), never only its own few
    g = torch.Generator().manual_seed(1)
    obs = Observer("down", max_rows=20, per_expert=True, min_routed=5)
    x = torch.randn(2, 100, 4, generator=g)
    routed = torch.zeros(2, 100, dtype=torch.bool)
    routed[0, ::2] = True                                     # expert 0: 50 tokens, expert 1: 3
    routed[1, :3] = True
    for sl in (slice(0, 40), slice(40, 100)):
        obs.observe_routed(x[:, sl], routed[:, sl])
    assert obs.dense_experts() == [1] and obs.rows().shape == (2, 20, 4)
    member = lambda r, pool: bool((pool == r).all(-1).any())
    assert all(member(r, x[0, ::2]) for r in obs.rows()[0])
    assert sum(member(r, x[1, 3:]) for r in obs.rows()[1]) >= 10    # mostly tokens not routed to 1
    torch.testing.assert_close(obs.channel_amax()[1], x[1].abs().amax(0))
    with pytest.raises(ValueError, match="min_routed must be in"):
        Observer("down", max_rows=4, per_expert=True, min_routed=5)


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
    got = cal.source_tokens("default", load_tokenizer())
    assert torch.equal(got, rest) and len(eval_slice) > 0


@pytest.fixture(scope="module")
def other_tokenizer():
    """A real byte-level BPE tokenizer that is not the embedded one (another model's)."""
    lines = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n"] * 20
    return Tokenizer(train_tokenizer(lines, vocab_size=300))


def test_text_is_tokenised_with_the_models_tokenizer_and_the_corpus_only_with_the_embedded_one(
        monkeypatch, tmp_path, other_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    np.full(1000, 5, dtype="<u2").tofile(corpus / "train.bin")           # ids of the embedded tokenizer
    monkeypatch.setenv("GRAPHOPT_CORPUS", str(corpus))
    cfg = CalibrationConfig(num_samples=2, seq_len=16)
    embedded = calibration_data(cfg, 8192, load_tokenizer())
    assert bool((embedded.tokens == 5).all()) and "train.bin" in embedded.origin
    assert "the embedded graphopt tokenizer" in embedded.origin
    other = calibration_data(cfg, 300, other_tokenizer)                  # never the embedded ids
    rest = heldout_tokens(other_tokenizer)[1]
    assert not bool((other.tokens == 5).all()) and int(other.tokens.max()) < 300
    assert any(_is_window_of(w, rest) for w in other.tokens) and "held-out text" in other.origin
    text = tmp_path / "code.txt"
    text.write_text("def g(y):\n    return y * 2\n" * 30)
    got = calibration_data(CalibrationConfig(sources=((f"text:{text}", 1.0),), num_samples=3, seq_len=8),
                           300, other_tokenizer)
    ids = torch.tensor(other_tokenizer.encode(text.read_text()))
    assert all(_is_window_of(w, ids) for w in got.tokens) and f"text:{text}" in got.origin


def _is_window_of(window, ids) -> bool:
    return any(torch.equal(ids[s: s + len(window)], window) for s in range(len(ids) - len(window) + 1))


def test_the_embedded_tokenizer_goes_only_with_the_embedded_model(other_tokenizer):
    from graphopt.models import load
    embedded = load()
    assert model_tokenizer(embedded.config).vocab_size == embedded.config.vocab_size
    assert model_tokenizer(random_model().config) is None
    assert model_tokenizer(random_model().config, other_tokenizer) is other_tokenizer


def test_text_sources_without_a_tokenizer_say_what_to_pass(tmp_path):
    for spec in ("default", "heldout", f"text:{tmp_path}/not_read.txt"):  # refused before anything is read
        with pytest.raises(QuantError, match=r"needs the model's tokenizer.*tokenizer=.*token ids.*'random'"):
            calibration_data(CalibrationConfig(sources=((spec, 1.0),)), 97)


def test_token_ids_and_random_need_no_tokenizer(tmp_path):
    ids = torch.arange(40) % 97
    given = calibration_data(CalibrationConfig(tokens=ids.view(4, 10)), 97)
    assert torch.equal(given.tokens, ids.view(4, 10)) and "token ids" in given.origin
    stream = calibration_data(CalibrationConfig(tokens=ids.tolist(), num_samples=3, seq_len=8), 97)
    assert stream.tokens.shape == (3, 8) and all(_is_window_of(w, ids) for w in stream.tokens)
    rnd = calibration_data(CalibrationConfig(sources=(("random", 1.0),), num_samples=3, seq_len=8), 97)
    assert rnd.tokens.shape == (3, 8) and int(rnd.tokens.max()) < 97 and "random ids" in rnd.origin
    cfg = QuantConfig("w8a8_static", calibration=CalibrationConfig(tokens=ids.view(4, 10), min_expert_tokens=4))
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert torch.equal(back.calibration.tokens, cfg.calibration.tokens) and back.calibration.min_expert_tokens == 4


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


def test_empty_or_malformed_calibration_data_is_a_clear_error(tmp_path, other_tokenizer):
    def refused(match, cfg, tokenizer=None):
        with pytest.raises(QuantError, match=match):
            calibration_data(cfg, 97, tokenizer)

    empty_bin, empty_pt, floats, empty_txt = (tmp_path / n for n in ("e.bin", "e.pt", "f.pt", "e.txt"))
    empty_bin.write_bytes(b"")
    torch.save(torch.zeros(0, dtype=torch.long), empty_pt)
    torch.save(torch.rand(100), floats)
    empty_txt.write_text("")
    src = lambda spec: CalibrationConfig(sources=((spec, 1.0),), num_samples=2, seq_len=8)
    refused(r"token file .*e\.bin is empty", src(f"tokens:{empty_bin}"))
    refused(r"token file .*e\.pt is empty", src(f"tokens:{empty_pt}"))
    refused(r"must hold integer token ids, got dtype torch.float32", src(f"tokens:{floats}"))
    refused(r"'text:.*e\.txt' is empty \(0 tokens after tokenization\)", src(f"text:{empty_txt}"), other_tokenizer)
    no_tensor, odd_suffix, not_a_tensor = (tmp_path / n for n in ("n.safetensors", "ids.npy", "d.pt"))
    from safetensors.torch import save_file
    save_file({}, str(no_tensor))
    odd_suffix.write_bytes(b"\x00\x01")
    torch.save({"ids": [1, 2, 3]}, not_a_tensor)
    refused(r"n\.safetensors holds no tensor; accepted: one integer tensor", src(f"tokens:{no_tensor}"))
    refused(r"ids\.npy: accepted suffixes are \.bin \(uint16\), \.pt, \.safetensors", src(f"tokens:{odd_suffix}"))
    refused(r"d\.pt must hold one integer tensor of token ids, got dict", src(f"tokens:{not_a_tensor}"))
    refused(r"has 20 tokens, fewer than seq_len \+ 1 = 33", CalibrationConfig(tokens=torch.arange(20), seq_len=32))
    refused(r"token id 97 >= the model's vocab_size 97", CalibrationConfig(tokens=torch.arange(98).view(2, 49)))
    with pytest.raises(QuantError, match=r"token id -1 < 0"):
        CalibrationConfig(tokens=[[1, 2], [-1, 3]])
    with pytest.raises(QuantError, match=r"must be 1-D \[tokens\] or 2-D \[windows, tokens\], got shape \(1, 2, 3\)"):
        CalibrationConfig(tokens=torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(QuantError, match=r"CalibrationConfig.tokens is empty"):
        CalibrationConfig(tokens=[])
    with pytest.raises(QuantError, match=r"rows of one length"):
        CalibrationConfig(tokens=[[1, 2], [3]])
    with pytest.raises(QuantError, match=r"min_expert_tokens \(600\) must be <= max_rows \(512\)"):
        CalibrationConfig(min_expert_tokens=600)


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


def test_experts_gate_up_keeps_each_experts_routed_rows_for_the_weight_searches():
    # the shared statistics stay every token's (one smoothing vector / static scale for the fused op);
    # routed_rows holds expert e's own rows, which clipping judges e's gate_up weight on
    model = random_model()
    tokens = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    tracked = Observer("gu", max_rows=64).track_routed_rows()
    tracked.routed_rows.min_routed = 1
    gate_up, _, x, _, routed = _moe_layer_run(model, tokens, min_routed=1, gate_up=tracked)
    rr = gate_up.routed_rows
    assert rr.expert_tokens.tolist() == routed.sum(1).tolist() and rr.tokens == gate_up.tokens == 30
    torch.testing.assert_close(gate_up.channel_amax(), x.abs().amax(0))          # shared: unchanged
    rows = rr.rows()
    assert rows.shape[:2] == (routed.shape[0], 30) and rows.shape[-1] == x.shape[-1]
    for e in range(routed.shape[0]):
        own = x[routed[e]]
        assert all(bool((own == r).all(-1).any()) for r in rows[e])              # only e's routed tokens
        torch.testing.assert_close(rr.channel_amax()[e], own.abs().amax(0))
    from graphopt.quant.algorithms.base import Target
    from graphopt.quant.config import QuantConfig
    from graphopt.quant.schemes import SCHEMES
    w = model.model.layers[1].mlp.experts.gate_up_proj.detach().float()
    target = Target("gate_up", w, None, SCHEMES["w4a8"], QuantConfig("w4a8"), gate_up)
    assert target.search_rows().shape == (routed.shape[0], 30, x.shape[-1])      # per expert
    assert target.rows().shape == (30, x.shape[-1])                                # shared


def test_routed_rows_match_the_dense_routed_observer_when_the_reservoir_overflows():
    # observe_routed_rows forms no [E, N, K] tensor, yet keeps what observe_routed would over the expanded input
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 4, generator=g)
    routed = torch.rand(3, 100, generator=g) < torch.tensor([[0.5], [0.2], [0.03]])
    lean = Observer("gu", max_rows=16).track_routed_rows().routed_rows
    dense = Observer("gu (routed rows)", max_rows=16, per_expert=True, seed=1, min_routed=lean.min_routed)
    for sl in (slice(0, 30), slice(30, 100)):
        lean.observe_routed_rows(x[sl], routed[:, sl])
        dense.observe_routed(x[sl].expand(3, -1, -1), routed[:, sl])
    assert lean.dense_experts() == dense.dense_experts() == [2]
    torch.testing.assert_close(lean.rows(), dense.rows())
    torch.testing.assert_close(lean.channel_amax(), dense.channel_amax())
    with pytest.raises(ValueError, match="per expert already"):
        dense.track_routed_rows()
    with pytest.raises(ValueError, match="not per expert"):
        Observer("shared").observe_routed_rows(x, routed)

