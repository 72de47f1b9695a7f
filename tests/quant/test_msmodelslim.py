"""msModelSlim (Ascend) layout: export -> import round trips, the per-type formulas, strict-import errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from graphopt.models.random import random_model
from graphopt.quant import PRESETS, QuantConfig, QuantError, load_msmodelslim, quantize_model, save_msmodelslim
from graphopt.quant.msmodelslim import _linear, unpack_int4_rows
from graphopt.quant.qlinear import eager_call, emit_linear
from graphopt.quant.schemes import int_quantize

CONFIGS = {"W8A8_DYNAMIC": QuantConfig("w8a8"), "W8A8": QuantConfig("w8a8_static"),
           "W4A8_DYNAMIC": QuantConfig("w4a8", group_size=16)}    # RTN w4a8: groups of 16, data-free


@pytest.fixture(scope="module")
def model_and_data():
    g = torch.Generator().manual_seed(0)
    return random_model(), torch.randint(0, 97, (4, 16), generator=g), torch.randint(0, 97, (2, 12), generator=g)


@pytest.fixture(scope="module")
def quantised(model_and_data):
    model, data, _ = model_and_data
    return {t: quantize_model(model, c, data, progress=False) for t, c in CONFIGS.items()}


def _files(root):
    desc_file = root / "quant_model_description.json"
    weights = next(root.glob("quant_model_weight*.safetensors"))
    return desc_file, json.loads(desc_file.read_text()), weights, safetensors.torch.load_file(weights)


def _rewrite(root, desc, tensors):
    desc_file, _, weights, _ = _files(root)
    desc_file.write_text(json.dumps(desc))
    safetensors.torch.save_file(tensors, weights)


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", list(CONFIGS))
def test_export_then_import_gives_the_graphopt_logits(tmp_path, model_and_data, quantised, qtype):
    model, _, ids = model_and_data
    q = quantised[qtype]
    save_msmodelslim(q, tmp_path / "out")
    back = load_msmodelslim(tmp_path / "out", dtype=torch.float32)
    hidden = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(ids), q(ids))                                   # bit-exact, not just close
        assert torch.equal(back.mtp_forward(0, ids, hidden)[0], q.mtp_forward(0, ids, hidden)[0])
    assert back.quant_config.scheme == CONFIGS[qtype].scheme and back.quant_config.overrides == ()
    _, desc, _, _ = _files(tmp_path / "out")
    assert desc["model_quant_type"] == qtype and desc["kv_quant_type"] is None
    assert (desc["version"], desc["group_size"]) == (("0", 16) if qtype == "W4A8_DYNAMIC" else ("1.0.0", 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]                 # no temporaries left


def test_mixed_types_round_trip_as_overrides(tmp_path, model_and_data):
    """DeepSeek's Ascend recipe: static attention, dynamic dense MLP, W4A8 routed experts (and here lm_head)."""
    model, data, ids = model_and_data
    config = QuantConfig("w8a8_static", group_size=16, skip=("*.mlp.gate", "*kv_b_proj"),
                         overrides={"*.mlp.experts.*": "w4a8", "*.mlp.*_proj": "w8a8", "*shared_experts*": "w8a8"})
    q = quantize_model(model, config, data, progress=False)
    save_msmodelslim(q, tmp_path)
    _, desc, _, _ = _files(tmp_path)
    assert desc["model_quant_type"] == "W4A8_DYNAMIC"                        # the highest of those used
    assert {desc["model.layers.0.self_attn.o_proj.weight"], desc["model.layers.0.mlp.up_proj.weight"],
            desc["model.layers.1.mlp.experts.0.down_proj.weight"]} == {"W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"}
    assert desc["model.layers.3.shared_head.head.deq_scale"] == "W8A8"         # the MTP layer's head copy
    back = load_msmodelslim(tmp_path, dtype=torch.float32)
    hidden = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(ids), q(ids))
        assert torch.equal(back.mtp_forward(0, ids, hidden)[0], q.mtp_forward(0, ids, hidden)[0])
    overrides = dict(back.quant_config.overrides)
    assert back.quant_config.scheme == "w4a8" and overrides["model.layers.0.self_attn.o_proj"] == "w8a8_static"
    assert overrides["model.layers.0.mlp.up_proj"] == "w8a8" and "model.layers.1.mlp.experts.down_proj" not in overrides


def test_export_layout_is_hf_deepseek(tmp_path, quantised):
    q = quantised["W4A8_DYNAMIC"]
    save_msmodelslim(q, tmp_path)
    _, desc, weights, t = _files(tmp_path)
    assert weights.name == "quant_model_weight_w4a8_dynamic.safetensors"
    assert set(desc) - {"model_quant_type", "version", "group_size", "kv_quant_type"} == set(t)   # all described
    e3 = "model.layers.1.mlp.experts.3.gate_proj"                                # per-expert, HF names
    assert t[f"{e3}.weight"].shape == (32, 64) and t[f"{e3}.weight"].dtype == torch.int8
    assert int(t[f"{e3}.weight"].abs().max()) <= 8
    assert t[f"{e3}.weight_scale_second"].shape == (32, 4) and desc[f"{e3}.weight_scale_second"] == "W4A8_DYNAMIC"
    group_scale = q.model.layers[1].mlp.experts.gate_up.group_scale                # [E, 2I, groups] int8
    assert torch.equal(t[f"{e3}.weight_scale_second"], group_scale[3, :32].float())
    assert not t[f"{e3}.weight_offset"].any()
    assert desc["model.layers.3.eh_proj.weight"] == "W4A8_DYNAMIC"               # MTP module 0 is layer L + 0
    for copy, original in (("model.layers.3.embed_tokens.weight", "model.embed_tokens.weight"),
                           ("model.layers.3.shared_head.head.weight", "lm_head.weight")):
        assert desc[copy] == "FLOAT" and torch.equal(t[copy], t[original])
    assert desc["model.layers.1.mlp.gate.e_score_correction_bias"] == "FLOAT"
    assert desc["model.layers.0.self_attn.kv_b_proj.weight"] == "FLOAT"          # graphopt's default skip
    assert not any(k.startswith("mtp.") or "gate_up" in k for k in t)


def test_export_is_atomic_with_the_umask_mode_and_refuses_other_folders(tmp_path, quantised):
    q = quantised["W8A8_DYNAMIC"]
    old = os.umask(0o027)
    try:
        save_msmodelslim(q, tmp_path / "a")
        save_msmodelslim(q, tmp_path / "a")                                     # replacing our own export
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert modes == dict.fromkeys(["config.json", "quant_model_description.json",
                                   "quant_model_weight_w8a8_dynamic.safetensors"], 0o640)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a msModelSlim export"):
        save_msmodelslim(q, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_export_refuses_what_the_layout_cannot_hold(tmp_path, model_and_data):
    model, data, _ = model_and_data
    with pytest.raises(QuantError, match="quantise it first"):
        save_msmodelslim(model, tmp_path)
    for config, match in ((QuantConfig("w8a16"), "scheme 'w8a16' has no msModelSlim counterpart"),
                          (PRESETS["w8a8_smooth"], "smoothed with different factors.*scope='input'"),
                          (PRESETS["c8"], "C8 latent KV cache")):
        with pytest.raises(QuantError, match=match):
            save_msmodelslim(quantize_model(model, config, data, progress=False), tmp_path)
    assert not list(tmp_path.iterdir())


# -- the formulas, on hand-written tensors -------------------------------------------------------
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
    (root / "quant_model_description.json").write_text(json.dumps(desc))
    safetensors.torch.save_file(tensors, root / "quant_model_weight_w8a8_dynamic.safetensors")


def test_handwritten_w8a8_dynamic_import_matches_graphopt_w8a8(tmp_path, model_and_data, quantised):
    model, _, ids = model_and_data
    write_msmodelslim_w8a8_dynamic(model, tmp_path)
    imported = load_msmodelslim(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(imported(ids), quantised["W8A8_DYNAMIC"](ids))


def test_w8a8_static_follows_the_ascend_formula():
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


def test_w4a8_packed_per_channel_follows_the_ascend_formula():
    """Version 1.0.0 routed experts: two int4 a byte along the output dim, row 2j in the low nibble."""
    g = torch.Generator().manual_seed(2)
    q4 = torch.randint(-8, 8, (6, 32), generator=g, dtype=torch.int8)
    u = (q4.to(torch.int16) & 0xF).to(torch.uint8)
    packed = (u[0::2] | (u[1::2] << 4)).view(torch.int8)                          # [3, 32]
    assert torch.equal(unpack_int4_rows(packed), q4)
    scale = torch.rand(6, 1, generator=g) * 0.01 + 1e-3
    q = _linear("e", "W4A8_DYNAMIC", {"weight": packed, "weight_scale": scale, "weight_offset": torch.zeros(6, 1),
                                      "scale_bias": torch.zeros(6, 1)}, group_size=0)
    x = torch.randn(4, 32, generator=g)
    x_s = x.abs().amax(-1, keepdim=True) / 127
    want = (torch.round(x / x_s).double() @ q4.double().T) * x_s.double() * scale.double().T
    torch.testing.assert_close(emit_linear(eager_call, x, q, q.tensors, torch.float32).double(), want,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(QuantError, match="integer group scales 1..127"):
        _linear("e", "W4A8_DYNAMIC", {"weight": q4, "weight_scale": scale, "weight_scale_second":
                                      torch.full((6, 2), 0.5)}, group_size=16)


# -- strict import -------------------------------------------------------------------------------
def test_unknown_tensors_are_errors_that_name_them(tmp_path, quantised):
    save_msmodelslim(quantised["W8A8_DYNAMIC"], tmp_path)
    _, desc, _, t = _files(tmp_path)
    extra = {f"model.layers.0.mlp.extra{i}.weight": torch.zeros(2) for i in range(7)}
    _rewrite(tmp_path, {**desc, **dict.fromkeys(extra, "FLOAT")}, {**t, **extra})
    with pytest.raises(QuantError, match=r"unknown tensors, not in the model of config.json: "
                                         r"model.layers.0.mlp.extra0.weight, .*\.\.\. \(7 in all\)"):
        load_msmodelslim(tmp_path)
    o = "model.layers.0.self_attn.o_proj"
    _rewrite(tmp_path, {**desc, f"{o}.smooth": "W8A8_DYNAMIC"}, {**t, f"{o}.smooth": torch.ones(4)})
    with pytest.raises(QuantError, match=f"unknown tensors for their linear's type: {o}.smooth"):
        load_msmodelslim(tmp_path)
    ghost = {k.replace("o_proj", "p_proj"): v.clone() for k, v in t.items() if k.startswith(o + ".")}
    _rewrite(tmp_path, {**desc, **dict.fromkeys(ghost, "W8A8_DYNAMIC")}, {**t, **ghost})
    with pytest.raises(QuantError, match="unknown quantised linear model.layers.0.self_attn.p_proj: not in the model"):
        load_msmodelslim(tmp_path)


def test_missing_tensors_are_errors_that_name_them(tmp_path, quantised):
    save_msmodelslim(quantised["W8A8_DYNAMIC"], tmp_path)
    _, desc, _, t = _files(tmp_path)

    def without(*names):
        _rewrite(tmp_path, {k: v for k, v in desc.items() if k not in names},
                 {k: v for k, v in t.items() if k not in names})

    without("model.norm.weight")
    with pytest.raises(QuantError, match="lacks tensors the model needs: model.norm.weight"):
        load_msmodelslim(tmp_path)
    without(*[k for k in t if k.startswith("model.layers.1.mlp.experts.3.up_proj.")])
    with pytest.raises(QuantError, match="missing: model.layers.1.mlp.experts.3.up_proj"):
        load_msmodelslim(tmp_path)
    without("model.layers.0.self_attn.o_proj.weight_scale")
    with pytest.raises(QuantError, match="W8A8_DYNAMIC tensors model.layers.0.self_attn.o_proj.weight_scale are "
                                         "missing"):
        load_msmodelslim(tmp_path)


def test_a_bad_description_is_a_clear_error(tmp_path, quantised):
    with pytest.raises(FileNotFoundError, match="not an msModelSlim export"):
        load_msmodelslim(tmp_path)
    save_msmodelslim(quantised["W4A8_DYNAMIC"], tmp_path)
    desc_file, desc, weights, t = _files(tmp_path)
    w = "model.layers.0.self_attn.o_proj.weight"
    for bad, match in (
            ({**desc, "model_quant_type": "W4A16"}, "model_quant_type 'W4A16' is not supported; accepted: "
                                                    "W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC"),
            ({**desc, "model_quant_type": "W8A8"}, "model_quant_type is W8A8 but no tensor has that type"),
            ({**desc, "version": "2.0"}, "version '2.0' is not supported"),
            ({**desc, "group_size": -1}, "group_size must be an integer >= 0"),
            ({**desc, "group_size": 32}, "does not match group_size 32"),
            ({**desc, w: "W4A16"}, rf"types not accepted .*: {w} \('W4A16'\)"),
            ({**desc, w: "FLOAT"}, f"must share a type in the description: {w[:-7]} "),
            ({k: v for k, v in desc.items() if k != w}, f"in the weight files but not described: {w}"),
            ({**desc, "model.layers.0.mlp.ghost.weight": "FLOAT"}, "described tensors the weight files lack: "
                                                                   "model.layers.0.mlp.ghost.weight"),
            ([1, 2], "expected a JSON object")):
        desc_file.write_text(json.dumps(bad))
        with pytest.raises(QuantError, match=match):
            load_msmodelslim(tmp_path)
    desc_file.write_text("{not json")
    with pytest.raises(QuantError, match="not valid JSON"):
        load_msmodelslim(tmp_path)
    desc_file.write_text(json.dumps(desc))
    weights.write_bytes(b"garbage")
    with pytest.raises(QuantError, match="corrupt msModelSlim weight file"):
        load_msmodelslim(tmp_path)


def test_roundtrip_example_runs(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "msmodelslim_roundtrip.py"
    proc = subprocess.run([sys.executable, str(example), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for qtype in CONFIGS:
        assert re.search(rf"^{qtype}: \d+ quantised weights in .*; imported logits equal graphopt's: True$",
                         proc.stdout, re.M), proc.stdout
        assert (tmp_path / qtype.lower() / "quant_model_description.json").is_file()
    assert re.search(r"^W8A8 \+ SmoothQuant: folded into the norms in .*; the export changes the logits by \S+ "
                     r"\(relative\), quantisation by \S+; top-1 agreement \S+$", proc.stdout, re.M), proc.stdout
