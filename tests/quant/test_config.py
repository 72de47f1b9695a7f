"""QuantConfig: presets, which linear gets which scheme, (de)serialisation and its errors."""

import pytest

from graphopt.quant.config import (PRESETS, ClippingConfig, FlexSmoothConfig, HadamardConfig, HQQConfig,
                                   QuantConfig, SmoothQuantConfig, resolve)
from graphopt.quant.schemes import QuantError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json_dicts(name):
    cfg = PRESETS[name]
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_default_keeps_gate_head_and_kv_b_proj_in_16_bit():
    cfg = resolve("w8a8")
    assert cfg.scheme_for("model.layers.3.mlp.gate") is None
    assert cfg.scheme_for("lm_head") is None
    assert cfg.scheme_for("model.layers.0.self_attn.kv_b_proj") is None
    assert cfg.scheme_for("model.layers.0.self_attn.q_a_proj").name == "w8a8"
    assert cfg.scheme_for("model.layers.3.mlp.experts.gate_up_proj").name == "w8a8"


def test_overrides_then_mtp_scheme_then_scheme():
    cfg = QuantConfig("w8a8", mtp_scheme="w4a8", overrides={"model.layers.1.*": "w4a16", "mtp.0.eh_proj": "bf16"})
    assert cfg.scheme_for("model.layers.1.mlp.down_proj").name == "w4a16"
    assert cfg.scheme_for("model.layers.2.mlp.down_proj").name == "w8a8"
    assert cfg.scheme_for("mtp.0.self_attn.o_proj").name == "w4a8"
    assert cfg.scheme_for("mtp.0.eh_proj") is None


def test_algorithm_short_strings():
    cfg = QuantConfig.from_dict({"scheme": "w4a8", "algorithms": ["smoothquant:alpha=0.7", "clipping"]})
    assert cfg.algorithms == (SmoothQuantConfig(0.7), ClippingConfig())
    assert cfg.transform == SmoothQuantConfig(0.7) and cfg.weight_method == ClippingConfig()


def test_unknown_config_key_names_the_key_and_the_accepted_ones():
    with pytest.raises(QuantError, match=r"unknown QuantConfig key\(s\) \['shceme'\].*'scheme'"):
        QuantConfig.from_dict({"shceme": "w8a8"})
    with pytest.raises(QuantError, match=r"unknown SmoothQuantConfig key\(s\) \['beta'\]"):
        QuantConfig.from_dict({"algorithms": [{"type": "SmoothQuantConfig", "beta": 0.3}]})
    with pytest.raises(QuantError, match=r"unknown calibration key"):
        QuantConfig.from_dict({"calibration": {"samples": 3}})


def test_bad_values_are_refused_with_what_is_accepted():
    with pytest.raises(QuantError, match="unknown quant preset 'w9a9'; accepted: .*w8a8"):
        resolve("w9a9")
    with pytest.raises(QuantError, match="unknown algorithm 'gptq'; accepted: rtn"):
        QuantConfig.from_dict({"algorithms": ["gptq"]})
    with pytest.raises(QuantError, match="kv_cache 'int4'"):
        QuantConfig(kv_cache="int4")
    with pytest.raises(QuantError, match=r"alpha must be in \[0.0, 1.0\]"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(QuantError, match="at most one transform"):
        QuantConfig(algorithms=(SmoothQuantConfig(), FlexSmoothConfig()))
    with pytest.raises(QuantError, match="HQQ makes asymmetric weight-only grids"):
        QuantConfig("w8a8", algorithms=(HQQConfig(),))
    with pytest.raises(QuantError, match="power of two"):
        HadamardConfig(max_block=96)


def test_smoothquant_scope_is_validated_serialised_and_parsed():
    shared = QuantConfig("w8a8_static", algorithms=(SmoothQuantConfig(0.5, scope="input"),))
    assert shared.to_dict()["algorithms"] == [{"type": "SmoothQuantConfig", "alpha": 0.5, "scope": "input"}]
    assert QuantConfig.from_dict(shared.to_dict()) == shared
    assert SmoothQuantConfig().scope == "linear"                          # the default: the accuracy tables
    old = {"algorithms": [{"type": "SmoothQuantConfig", "alpha": 0.5}]}    # saved before the field existed
    assert QuantConfig.from_dict(old).transform == SmoothQuantConfig(0.5, scope="linear")
    parsed = QuantConfig.from_dict({"algorithms": ["smoothquant:alpha=0.6,scope=input"]})
    assert parsed.transform == SmoothQuantConfig(0.6, scope="input")
    with pytest.raises(QuantError, match="SmoothQuantConfig.scope 'norm' is not supported; accepted: 'linear', "
                                         "'input'"):
        SmoothQuantConfig(scope="norm")
