"""Which tokenizer `graphopt calibrate` / `graphopt eval --model DIR` tokenise text with (quant/cli.py).

--tokenizer, else DIR/tokenizer.json, else the embedded tokenizer only for the embedded model's config;
a model with none and text to tokenise fails before its weights are loaded. Token ids need no tokenizer.
"""

import json
import shutil

import numpy as np
import pytest

import graphopt.quant.cli as qcli
from graphopt.cli import main
from graphopt.models import checkpoint
from graphopt.models.checkpoint import DEFAULT_MODEL_DIR
from graphopt.models.random import random_model
from external_tokenizer import EXTERNAL_EOS, write_external_tokenizer
from graphopt.models.tokenizer import load_tokenizer

EMBEDDED_TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.json"
FAST = ["--samples", "2", "--seq-len", "16", "--dtype", "float32", "--quiet"]
FAST_EVAL = [*FAST, "--windows", "2", "--eval-seq-len", "16", "--json"]


@pytest.fixture
def foreign_ckpt(tmp_path):
    """A checkpoint whose config is not the embedded model's (vocab 8192 like it, so the embedded
    tokenizer's ids would pass the vocabulary check), with no tokenizer.json."""
    ckpt = tmp_path / "ckpt"
    checkpoint.save(random_model(vocab_size=8192), ckpt)
    assert not (ckpt / "tokenizer.json").exists()
    return ckpt


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 97, 2000).astype("<u2").tofile(path)
    return path


def _fails_before_loading(argv, monkeypatch, capsys) -> str:
    monkeypatch.setattr(qcli, "_load", lambda *a: pytest.fail("loaded the weights before finding no tokenizer"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "no tokenizer.json and its config (vocab_size 8192) is not the embedded model's" in err
    assert "accepted: --tokenizer PATH (a tokenizer.json), a tokenizer.json in" in err
    return err


@pytest.mark.parametrize("argv, needs, ids", [
    (["calibrate", "--quant", "w8a8_smooth"], "no tokenizer for calibration source 'default':", "--data tokens:PATH"),
    (["calibrate", "--quant", "w8a8_smooth", "--data", "text:x.py"], "calibration source 'text:x.py'", "--data"),
    (["eval", "--quant", "w4a16"], "no tokenizer for the held-out evaluation text:", "(--eval-data tokens:PATH)"),
    (["eval", "--quant", "w8a8_smooth", "--data", "heldout"],
     "the held-out evaluation text and calibration source 'heldout'", "--eval-data tokens:PATH or --data tokens:PATH"),
])
def test_a_foreign_checkpoint_without_a_tokenizer_fails_before_loading(foreign_ckpt, tmp_path, argv, needs, ids,
                                                                      monkeypatch, capsys):
    out = tmp_path / "q"
    extra = ["--out", str(out)] if argv[0] == "calibrate" else []
    err = _fails_before_loading([*argv, "--model", str(foreign_ckpt), *extra, *FAST], monkeypatch, capsys)
    assert needs in err and ids in err, err
    assert not out.exists()


def test_the_eval_text_is_checked_even_when_calibration_data_are_ids(foreign_ckpt, tokens, monkeypatch, capsys):
    argv = ["eval", "--model", str(foreign_ckpt), "--quant", "w8a8_smooth", "--data", f"tokens:{tokens}",
            "--eval-data", "text:notes.txt", *FAST]
    err = _fails_before_loading(argv, monkeypatch, capsys)
    assert "no tokenizer for --eval-data 'text:notes.txt':" in err and "calibration" not in err


def test_token_ids_need_no_tokenizer(foreign_ckpt, tokens, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["calibrate", "--model", str(foreign_ckpt), "--quant", "w8a8_smooth", "--data", f"tokens:{tokens}",
                 "--out", str(out), *FAST]) == 0
    assert not (out / "tokenizer.json").exists()                 # none is invented
    capsys.readouterr()
    assert main(["eval", "--model", str(foreign_ckpt), "--quantized", str(out), "--eval-data", f"tokens:{tokens}",
                 *FAST_EVAL]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 2 * 15
    assert main(["calibrate", "--model", str(foreign_ckpt), "--quant", "w8a8", "--out", str(tmp_path / "q2"),
                 *FAST]) == 0                                    # dynamic w8a8 reads no data at all


def test_the_tokenizer_option_tokenises_calibration_and_eval_text(foreign_ckpt, tmp_path, monkeypatch, capsys):
    seen = {}
    real_quantize, real_heldout = qcli.quantize_model, qcli.heldout_tokens

    def quantize(*args, tokenizer, **kwargs):
        seen["calibration"] = tokenizer
        return real_quantize(*args, tokenizer=tokenizer, **kwargs)

    def heldout(tokenizer):
        seen["eval"] = tokenizer
        return real_heldout(tokenizer)
    monkeypatch.setattr(qcli, "quantize_model", quantize)
    monkeypatch.setattr(qcli, "heldout_tokens", heldout)
    given = tmp_path / "tok" / "tokenizer.json"
    given.parent.mkdir()
    shutil.copyfile(EMBEDDED_TOKENIZER, given)
    assert main(["eval", "--model", str(foreign_ckpt), "--tokenizer", str(given), "--quant", "w8a8_smooth",
                 "--data", "heldout", *FAST_EVAL]) == 0
    assert seen["calibration"] is seen["eval"] and seen["eval"].vocab_size == 8192
    out = tmp_path / "q"
    assert main(["calibrate", "--model", str(foreign_ckpt), "--tokenizer", str(given), "--quant", "w8a8_smooth",
                 "--data", "heldout", "--out", str(out), *FAST]) == 0
    assert (out / "tokenizer.json").read_bytes() == given.read_bytes()   # written beside the weights


def test_a_missing_tokenizer_file_is_an_option_error(foreign_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(foreign_ckpt), "--tokenizer", str(tmp_path / "none.json"),
              "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "argument --tokenizer: " in capsys.readouterr().err


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), reason="embedded model not built")
def test_the_embedded_model_needs_no_tokenizer_file(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "tiny"                                     # its config and weights, no tokenizer.json
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(DEFAULT_MODEL_DIR / name, copy / name)
    seen = []
    real = qcli.heldout_tokens
    monkeypatch.setattr(qcli, "heldout_tokens", lambda tokenizer: seen.append(tokenizer) or real(tokenizer))
    for model in (["--model", str(copy)], []):                   # the copy, and no --model at all
        assert main(["eval", *model, "--quant", "w4a16", *FAST_EVAL]) == 0
        assert json.loads(capsys.readouterr().out)["tokens"] == 2 * 15
    embedded = load_tokenizer().backend.to_str()
    assert [t.backend.to_str() for t in seen] == [embedded] * 2


def test_a_real_checkpoints_tokenizer_calibrates_and_eval_finds_it_in_the_quantized_dir(tmp_path, monkeypatch,
                                                                                         capsys):
    # a checkpoint with a DeepSeek-style tokenizer.json (its own special ids, tokenizer_config.json beside)
    ckpt = tmp_path / "ckpt"
    given = write_external_tokenizer(tmp_path / "tok")
    checkpoint.save(random_model(vocab_size=400), ckpt)
    seen = []
    real = qcli.heldout_tokens
    monkeypatch.setattr(qcli, "heldout_tokens", lambda tokenizer: seen.append(tokenizer) or real(tokenizer))
    out = tmp_path / "q"          # calibration text in its 400 ids (the embedded 8192 would fail the vocab check)
    assert main(["calibrate", "--model", str(ckpt), "--tokenizer", str(given), "--quant", "w8a8_smooth",
                 "--data", "heldout", "--out", str(out), *FAST]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"]["content"] == EXTERNAL_EOS
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "--quantized", str(out), *FAST_EVAL]) == 0   # no --tokenizer
    assert json.loads(capsys.readouterr().out)["tokens"] == 2 * 15
    [tokenizer] = seen                                            # the held-out text's tokenizer
    assert not tokenizer.is_graphopt_layout and tokenizer.eos_token_id == 1 and tokenizer.vocab_size == 400
