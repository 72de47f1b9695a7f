"""Quantised checkpoints (save/load bit-exact, int4 packing, corrupt files); msModelSlim: test_msmodelslim.py."""

import json

import pytest
import safetensors.torch
import torch

from graphopt.models.random import random_model
from graphopt.quant import PRESETS, QuantError, load_quantized, quantize_model, save_quantized
from graphopt.quant.formats import pack_int4, unpack_int4


@pytest.fixture(scope="module")
def model_and_data():
    g = torch.Generator().manual_seed(0)
    return random_model(), torch.randint(0, 97, (4, 16), generator=g), torch.randint(0, 97, (2, 12), generator=g)


@pytest.mark.parametrize("preset", ["w8a8_c8", "w4a8", "w4a16", "fp8_block", "w8a8_static"])
def test_save_load_round_trip_is_bit_exact(tmp_path, model_and_data, preset):
    model, data, ids = model_and_data
    q = quantize_model(model, PRESETS[preset].replace(group_size=16), data, progress=False)
    save_quantized(q, tmp_path)
    back = load_quantized(tmp_path)
    want, got = q.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k].view(torch.uint8) if want[k].dtype ==
                                                             torch.float8_e4m3fn else want[k], got[k].view(
            torch.uint8) if got[k].dtype == torch.float8_e4m3fn else got[k]), k
    with torch.no_grad():
        assert torch.equal(q(ids), back(ids))
    assert back.quant_config == q.quant_config
    assert not list(tmp_path.glob(".*"))                      # no temporary files left behind


def test_int4_is_packed_two_per_byte(tmp_path, model_and_data):
    model, data, _ = model_and_data
    q = quantize_model(model, PRESETS["w4a16"].replace(group_size=16), data, progress=False)
    save_quantized(q, tmp_path)
    desc = json.loads((tmp_path / "quant_model.json").read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    assert desc["packed_int4"][name] == "uint8"
    on_disk = safetensors.torch.load_file(tmp_path / "model.safetensors")[name]
    assert on_disk.shape[-1] * 2 == q.state_dict()[name].shape[-1]
    for signed in (True, False):
        v = torch.randint(-7 if signed else 0, 8 if signed else 16, (3, 10),
                          dtype=torch.int8 if signed else torch.uint8)
        assert torch.equal(unpack_int4(pack_int4(v), signed), v)


def test_corrupt_or_missing_files_are_clear_errors(tmp_path, model_and_data):
    model, data, _ = model_and_data
    with pytest.raises(QuantError, match="quantise it first"):
        save_quantized(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a graphopt quantised checkpoint"):
        load_quantized(tmp_path)
    save_quantized(quantize_model(model, "w8a16", data, progress=False), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(QuantError, match="corrupt or unreadable quantised weights"):
        load_quantized(tmp_path)
    (tmp_path / "quant_model.json").write_text("{not json")
    with pytest.raises(QuantError, match="not valid JSON"):
        load_quantized(tmp_path)


def test_save_is_one_atomic_directory_with_the_umask_mode_and_the_tokenizer(tmp_path, model_and_data):
    import os

    from graphopt.models.tokenizer import load_tokenizer

    model, calib, _ = model_and_data
    q = quantize_model(model, "w8a8", calib, progress=False)
    tok_file = tmp_path / "tokenizer.json"
    load_tokenizer().save(tok_file)
    old = os.umask(0o022)
    try:
        save_quantized(q, tmp_path / "q", tokenizer=tok_file)
        save_quantized(q, tmp_path / "q", tokenizer=tok_file)            # replacing our own directory
    finally:
        os.umask(old)
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "q").iterdir()}
    assert files == dict.fromkeys(["config.json", "model.safetensors", "quant_model.json", "tokenizer.json"], 0o644)
    assert (tmp_path / "q" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "tokenizer.json"]     # no temporaries left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a quantised checkpoint"):
        save_quantized(q, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
