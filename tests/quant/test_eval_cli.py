"""Accuracy measures (quant.eval) and the `graphopt calibrate` / `graphopt eval` entry points."""

import json

import numpy as np
import pytest
import torch

from graphopt.models import checkpoint
from graphopt.models.evaluate import perplexity
from graphopt.models.random import random_model
from graphopt.quant import load_quantized, quantize_model
from graphopt.cli import main as cli_main
from graphopt.quant.eval import compare, windows_from


def test_a_model_against_itself_and_against_a_quantised_copy():
    model = random_model()
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(0))
    windows = windows_from(ids, 25)
    q = quantize_model(model, "w4a16", windows[:4], progress=False)
    stats = compare(model, {"same": model, "w4a16": q}, windows, batch=3)
    same, w4 = stats["same"], stats["w4a16"]
    assert abs(same.kl) < 1e-6 and same.top1 == 1.0 and same.ppl == same.base_ppl
    assert same.mtp_accept == same.base_mtp_accept and 0 <= same.mtp_accept <= 1
    assert w4.kl > 1e-6 and w4.top1 < 1.0 and w4.ppl != w4.base_ppl
    assert same.base_ppl == pytest.approx(perplexity(model, ids, window=25), rel=1e-5)   # same definition
    assert same.tokens == 8 * 24


def test_calibrate_then_eval_from_the_command_line(tmp_path, capsys):
    model = random_model()
    ckpt, out = tmp_path / "ckpt", tmp_path / "q"
    checkpoint.save(model, ckpt)
    from graphopt.models.tokenizer import load_tokenizer
    (ckpt / "tokenizer.json").write_text(load_tokenizer().backend.to_str(pretty=True))  # not how .save() writes
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 97, 4000).astype("<u2").tofile(tokens)
    assert calibrate_main(["--model", str(ckpt), "--quant", "w8a8", "--algorithm", "smoothquant:alpha=0.6",
                           "--data", f"tokens:{tokens}@1", "--samples", "4", "--seq-len", "16",
                           "--dtype", "float32", "--quiet", "--out", str(out)]) == 0
    assert "quantised" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()   # copied beside
    q = load_quantized(out)
    assert q.quant_config.algorithms[0].alpha == 0.6 and q.quant_config.calibration.num_samples == 4
    assert eval_main(["--model", str(ckpt), "--quantized", str(out), "--eval-data", f"tokens:{tokens}",
                      "--windows", "4", "--eval-seq-len", "32", "--dtype", "float32", "--quiet", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tokens"] == 4 * 31 and 0 < stats["kl"] < 0.01
    assert stats["windows"] == 4 and stats["level"] == 0.95
    for name in ("kl", "top1", "ppl_change", "mtp_accept"):                 # 95% bootstrap over the 4 windows
        low, high = stats["ci"][name]
        assert low <= stats[name] <= high
    assert eval_main(["--model", str(ckpt), "--quantized", str(out), "--eval-data", f"tokens:{tokens}",
                      "--windows", "4", "--eval-seq-len", "32", "--dtype", "float32", "--quiet"]) == 0
    header, base, row, note = capsys.readouterr().out.splitlines()
    assert header.split()[1:3] == ["KL(16-bit", "||"] and header.index("KL") < header.index("ppl")
    assert row.split()[1] == f"{stats['kl']:.5f}" and f"[{stats['ci']['kl'][0]:.5f}, {stats['ci']['kl'][1]:.5f}]" in row
    assert "95% bootstrap interval over the 4 evaluation windows" in note
    assert _rc(calibrate_main, ["--quant", "w8a8"]) == 2          # --out is required


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--samples", "0", "--out", "x"], "argument --samples: must be >= 1, got 0"),
    (["calibrate", "--quant", "w9a9", "--out", "x"], "unknown quant preset 'w9a9'"),
    (["calibrate", "--algorithm", "nosuch", "--out", "x"], "nosuch"),
    (["eval", "--windows", "0"], "argument --windows: must be >= 1, got 0"),
    (["eval", "--quantized", "."], "not a `graphopt calibrate` output"),
])
def test_bad_options_fail_in_one_line_before_any_model_is_loaded(argv, message, capsys, monkeypatch):
    import graphopt.quant.cli as qcli
    from graphopt.cli import main

    monkeypatch.setattr(qcli, "_load", lambda *a: pytest.fail("loaded a model despite bad options"))
    try:
        rc = main(argv)
    except SystemExit as e:                                      # argparse's own checks
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def calibrate_main(argv):
    return cli_main(["calibrate", *argv])


def eval_main(argv):
    return cli_main(["eval", *argv])


def _rc(fn, argv):
    try:
        return fn(argv)
    except SystemExit as e:                                      # argparse's own checks
        return e.code


# -- progress (issue 15): calibration and evaluation bars, shown after 2 s of work --------------------
def _bars_shown_at_once(monkeypatch, module) -> list[dict]:
    """`module`'s tqdm bars drawn at once into buffers; one record per bar: its kwargs and its output."""
    import io

    made, real = [], module.tqdm

    def make(*args, **kwargs):
        made.append({"kwargs": kwargs, "out": io.StringIO()})
        return real(*args, **{**kwargs, "delay": 0, "leave": True, "mininterval": 0, "file": made[-1]["out"]})
    monkeypatch.setattr(module, "tqdm", make)
    return made


def test_evaluation_progress_counts_window_forwards_so_one_batch_still_moves(monkeypatch):
    from graphopt.quant import eval as quant_eval

    bars = _bars_shown_at_once(monkeypatch, quant_eval)
    model = random_model()
    windows = windows_from(torch.randint(0, 97, (75,), generator=torch.Generator().manual_seed(0)), 25)
    compare(model, {"same": model}, windows, batch=4, progress=True)          # 3 windows: one batch
    out = bars[0]["out"].getvalue()
    assert bars[0]["kwargs"]["delay"] == 2.0 and bars[0]["kwargs"]["unit"] == "window"
    assert "evaluate (base + 1)" in out and "3/6 [" in out and "6/6 [" in out   # base, then the model
    compare(model, {"same": model}, windows, batch=4)
    assert bars[1]["out"].getvalue() == ""                                      # progress=False: silent


def test_calibration_progress_waits_two_seconds_and_counts_every_layer_batch(monkeypatch):
    from graphopt.quant import calibration

    bars = _bars_shown_at_once(monkeypatch, calibration)
    model = random_model()
    tokens = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    runner = calibration.LayerRunner(model, tokens, batch=2)                    # progress on by default
    runner.run(model.model.layers[0], update=True)
    runner.close()
    steps = (len(model.model.layers) + len(model.mtp)) * 2 * 2                   # observe + advance, 2 batches
    assert bars[-1]["kwargs"]["delay"] == 2.0 and f"2/{steps} [" in bars[-1]["out"].getvalue()


def test_calibration_free_quantisation_progress_waits_two_seconds_and_counts_every_layer(monkeypatch):
    # RTN / HQQ with dynamic activations skip LayerRunner (and its bar): this one counts their layers
    from graphopt.quant import model_quant

    bars = _bars_shown_at_once(monkeypatch, model_quant)
    model = random_model()
    layers = len(model.model.layers) + len(model.mtp)
    quantize_model(model, "w4a16")                                              # progress on by default
    [bar] = bars
    assert bar["kwargs"]["delay"] == 2.0 and bar["kwargs"]["unit"] == "layer"
    assert "quantise w4a16" in bar["out"].getvalue() and f"{layers}/{layers} [" in bar["out"].getvalue()
    quantize_model(model, "w8a16", progress=False)
    assert bars[1]["out"].getvalue() == ""                                      # progress=False: silent
    quantize_model(model, "w8a8_static", torch.randint(0, 97, (2, 8)), progress=False)
    assert len(bars) == 2                                                       # calibrated: LayerRunner's bar only
