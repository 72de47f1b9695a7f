"""Quantised checkpoints (save/load bit-exact, int4 packing, corrupt files) and msModelSlim imports."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from graphopt.models.random import random_model
from graphopt.quant import PRESETS, QuantError, load_msmodelslim, load_quantized, quantize_model, save_quantized
from graphopt.quant.formats import pack_int4, unpack_int4
from graphopt.quant.msmodelslim import _linear
from graphopt.quant.qlinear import eager_call, emit_linear
from graphopt.quant.schemes import int_quantize


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


def _hf_name(name: str, L: int) -> str:
    if name.startswith("mtp."):
        depth, rest = name[4:].split(".", 1)
        return f"model.layers.{L + int(depth)}.{rest}"
    return name


def write_msmodelslim_w8a8_dynamic(model, root):
    """An msModelSlim W8A8_DYNAMIC export of `model`, written by hand in the documented layout."""
    L, I = model.config.num_hidden_layers, model.config.moe_intermediate_size
    cfg = PRESETS["w8a8"]
    tensors, desc = {}, {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0,
                         "kv_quant_type": None}

    def put_linear(name, w):
        q, s = int_quantize(w.float(), 127, 1)
        for field, t in (("weight", q), ("weight_scale", s), ("weight_offset", torch.zeros_like(s))):
            tensors[f"{name}.{field}"] = t.contiguous()
            desc[f"{name}.{field}"] = "W8A8_DYNAMIC"

    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        hf = _hf_name(name, L)
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            base = _hf_name(name.rsplit(".", 1)[0], L)
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    put_linear(f"{base}.{e}.gate_proj", t[e, :I])
                    put_linear(f"{base}.{e}.up_proj", t[e, I:])
                else:
                    put_linear(f"{base}.{e}.down_proj", t[e])
        elif name.endswith(".weight") and t.dim() == 2 and cfg.scheme_for(module) is not None \
                and "embed_tokens" not in name:
            put_linear(hf.rsplit(".", 1)[0], t)
        else:
            tensors[hf] = t.clone().contiguous()
            desc[hf] = "FLOAT"
    (root / "config.json").write_text(model.config.to_json_string())
    (root / "quant_model_description_w8a8_dynamic.json").write_text(json.dumps(desc))
    safetensors.torch.save_file(tensors, root / "quant_model_weight_w8a8_dynamic.safetensors")


def test_msmodelslim_w8a8_dynamic_import_matches_graphopt_w8a8(tmp_path, model_and_data):
    model, data, ids = model_and_data
    write_msmodelslim_w8a8_dynamic(model, tmp_path)
    imported = load_msmodelslim(tmp_path, dtype=torch.float32)
    ours = quantize_model(model, "w8a8", data, progress=False)
    hidden = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(imported(ids), ours(ids))
        assert torch.equal(imported.mtp_forward(0, ids, hidden)[0], ours.mtp_forward(0, ids, hidden)[0])


def test_msmodelslim_w8a8_static_follows_the_ascend_formula():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (6, 16), generator=g, dtype=torch.int8)
    in_scale, in_off = torch.tensor([0.05]), torch.tensor([3.0])
    deq = torch.rand(6, generator=g) * 1e-3 + 1e-4
    qbias = torch.randint(-500, 500, (6,), generator=g, dtype=torch.int32)
    deq_bits = torch.from_numpy(deq.numpy().view(np.uint32).astype(np.int64))      # Ascend int64 layout
    q = _linear("o", "W8A8", {"weight": w, "input_scale": in_scale, "input_offset": in_off,
                              "quant_bias": qbias, "deq_scale": deq_bits})
    x = torch.randn(4, 16, generator=g)
    x_q = (torch.round(x / 0.05) + 3).clamp(-128, 127)
    want = deq.double() * (x_q.double() @ w.double().T + qbias.double())
    got = emit_linear(eager_call, x, q, q.tensors, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_msmodelslim_errors_name_the_problem(tmp_path, model_and_data):
    model, _, _ = model_and_data
    with pytest.raises(FileNotFoundError, match="not an msModelSlim export"):
        load_msmodelslim(tmp_path)
    write_msmodelslim_w8a8_dynamic(model, tmp_path)
    desc_file = tmp_path / "quant_model_description_w8a8_dynamic.json"
    desc = json.loads(desc_file.read_text())
    desc_file.write_text(json.dumps({**desc, "model_quant_type": "W4A16"}))
    with pytest.raises(QuantError, match="model_quant_type 'W4A16' is not supported; accepted: W8A8, W8A8_DYNAMIC"):
        load_msmodelslim(tmp_path)
    desc_file.write_text(json.dumps(desc))
    weights = tmp_path / "quant_model_weight_w8a8_dynamic.safetensors"
    weights.write_bytes(b"garbage")
    with pytest.raises(QuantError, match="corrupt msModelSlim weight file"):
        load_msmodelslim(tmp_path)


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
