"""Quantised checkpoints (save/load bit-exact, int4 packing, corrupt files); msModelSlim: test_msmodelslim.py."""

import json

import pytest
import safetensors.torch
import torch

from graphopt.models.random import random_model
from graphopt.quant import PRESETS, QuantError, load_quantized, quantize_model, save_quantized
from graphopt.ops.packing import pack_int2, pack_int4, unpack_int2, unpack_int4


@pytest.fixture(scope="module")
def model_and_data():
    g = torch.Generator().manual_seed(0)
    return random_model(), torch.randint(0, 97, (4, 16), generator=g), torch.randint(0, 97, (2, 12), generator=g)


@pytest.mark.parametrize("preset", ["w8a8_c8", "w4a8", "w4a16", "fp8_block", "w8a8_static", "hif8", "w2a16", "nf4"])
def test_save_load_round_trip_is_bit_exact(tmp_path, model_and_data, preset):
    model, data, ids = model_and_data
    q = quantize_model(model, PRESETS[preset].replace(group_size=16), data, progress=False)
    save_quantized(q, tmp_path)
    back = load_quantized(tmp_path)
    want, got = q.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(_bits(want[k]), _bits(got[k])), k
    with torch.no_grad():
        assert torch.equal(q(ids), back(ids))
    assert back.quant_config == q.quant_config
    assert not list(tmp_path.glob(".*"))                      # no temporary files left behind


def _bits(t):
    """The bytes of a tensor: fp8 has no ==, and hif8's codebook holds its NaN code's value."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.is_floating_point() else t


@pytest.mark.parametrize("preset, signed", [("w4a16", "uint8"), ("w4a8", "int8")])
def test_int4_is_packed_two_per_byte_in_memory_and_on_disk(tmp_path, model_and_data, preset, signed):
    model, data, _ = model_and_data
    q = quantize_model(model, PRESETS[preset].replace(group_size=16), data, progress=False)
    name = "model.layers.0.self_attn.o_proj.weight"
    k = model.state_dict()[name].shape[-1]
    in_memory = q.state_dict()[name]
    assert in_memory.dtype == torch.uint8 and in_memory.shape[-1] * 2 == k      # packed in memory
    experts = q.state_dict()["model.layers.1.mlp.experts.gate_up.weight"]
    assert experts.shape[-1] * 2 == model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].shape[-1]
    save_quantized(q, tmp_path)
    desc = json.loads((tmp_path / "quant_model.json").read_text())
    assert desc["packed_int4"][name] == signed                  # the values' dtype: HQQ codes or signed int4
    assert desc["modules"]["model.layers.0.self_attn.o_proj"]["shape"][-1] == k   # the logical shape
    on_disk = safetensors.torch.load_file(tmp_path / "model.safetensors")[name]
    assert torch.equal(on_disk, in_memory)                      # the file holds the memory's bytes
    assert torch.equal(load_quantized(tmp_path).state_dict()[name], in_memory)


def test_an_int4_weight_the_file_does_not_list_as_packed_is_refused(tmp_path, model_and_data):
    model, data, _ = model_and_data
    save_quantized(quantize_model(model, PRESETS["w4a8"].replace(group_size=16), data, progress=False), tmp_path)
    f = tmp_path / "quant_model.json"
    desc = json.loads(f.read_text())
    del desc["packed_int4"]["model.layers.0.self_attn.o_proj.weight"]
    f.write_text(json.dumps(desc))
    with pytest.raises(QuantError, match="4-bit weight model.layers.0.self_attn.o_proj.weight is not listed as packed"):
        load_quantized(tmp_path)


def test_int4_pack_helpers_round_trip():
    for signed in (True, False):
        v = torch.randint(-7 if signed else 0, 8 if signed else 16, (3, 10),
                          dtype=torch.int8 if signed else torch.uint8)
        assert torch.equal(unpack_int4(pack_int4(v), signed), v)


def test_int2_is_packed_four_per_byte_nf4_two_and_hif8_codes_stay_bytes(tmp_path, model_and_data):
    model, data, _ = model_and_data
    name = "model.layers.0.self_attn.o_proj.weight"
    sizes = {}
    for preset, per_byte in (("w2a16", 4), ("nf4", 2), ("hif8", 1)):
        q = quantize_model(model, PRESETS[preset].replace(group_size=16), data, progress=False)
        save_quantized(q, tmp_path / preset)
        desc = json.loads((tmp_path / preset / "quant_model.json").read_text())
        on_disk = safetensors.torch.load_file(tmp_path / preset / "model.safetensors")
        assert on_disk[name].dtype == torch.uint8
        assert on_disk[name].shape[-1] * per_byte == model.state_dict()[name].shape[-1]
        assert torch.equal(on_disk[name], q.state_dict()[name])            # packed in memory as on disk
        assert (name in desc.get("packed_int2", {})) == (preset == "w2a16")
        assert (name in desc["packed_int4"]) == (preset == "nf4")
        codebook = on_disk.get(name.replace(".weight", ".codebook"))
        assert (0 if codebook is None else codebook.numel()) == {"w2a16": 0, "nf4": 16, "hif8": 256}[preset]
        sizes[preset] = (tmp_path / preset / "model.safetensors").stat().st_size
    assert sizes["w2a16"] < sizes["nf4"] < sizes["hif8"]
    v = torch.randint(0, 4, (3, 12), dtype=torch.uint8)
    assert torch.equal(unpack_int2(pack_int2(v)), v)
    assert pack_int2(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)).item() == 1 | 2 << 2 | 3 << 4   # low bits first


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
