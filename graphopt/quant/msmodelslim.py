"""Import msModelSlim (Ascend) W8A8 / W8A8_DYNAMIC exports, so Ascend users can bring their weights.

The export is a directory with config.json, `quant_model_description*.json` and
`quant_model_weight*.safetensors`, tensor names in the HF DeepSeek layout (per-expert experts,
MTP as layer num_hidden_layers + i). The description maps every tensor name to its type ("FLOAT":
not quantised) besides the top keys model_quant_type, version, group_size, kv_quant_type.

    W8A8_DYNAMIC  X.weight int8 [out, K], X.weight_scale [out, 1], X.weight_offset [out, 1] (zeros)
                  -> graphopt w8a8: int8 per-channel weights, per-token dynamic int8 activations.
    W8A8          X.weight int8, X.input_scale [1], X.input_offset [1], X.quant_bias int32 [out],
                  X.deq_scale [out] (float32, or int64 carrying the float32 bits in its low half as
                  Ascend kernels take it): y = deq_scale * (x_q @ w^T + quant_bias) with
                  x_q = clamp(round(x / input_scale) + input_offset, -128, 127)
                  -> graphopt w8a8_static with scale = deq_scale / input_scale, bias = quant_bias *
                  deq_scale and input_zero = input_offset: the same formula, regrouped.
Routed experts are stacked into graphopt's [E, out, K] layout (gate rows then up rows); they must be
W8A8_DYNAMIC (as msModelSlim's DeepSeek recipes export them). A C8 KV description is ignored with a
warning (its scales are for non-MLA K/V caches).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from graphopt.models.config import DeepseekV3Config
from graphopt.models.deepseek import DeepseekV3ForCausalLM

from .config import QuantConfig
from .qlinear import QuantExperts, QuantizedLinear, QuantLinear
from .schemes import QuantError

__all__ = ["load_msmodelslim", "ACCEPTED_TYPES"]

ACCEPTED_TYPES = ("W8A8", "W8A8_DYNAMIC")
_FIELDS = ("weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale",
           "weight", "bias")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def load_msmodelslim(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> DeepseekV3ForCausalLM:
    root = Path(path)
    desc = _description(root)
    config = DeepseekV3Config.from_json(root / "config.json")
    modules = _group_by_module(_read_weights(root), config)
    float_sd, linears, experts = {}, {}, defaultdict(dict)
    for name, fields in modules.items():
        hf_weight = fields.pop("_hf_name")
        qtype = desc.get(hf_weight, "FLOAT")
        if qtype not in ("FLOAT", *ACCEPTED_TYPES):
            raise QuantError(f"{hf_weight}: type {qtype!r} is not supported; accepted: FLOAT, "
                             f"{', '.join(ACCEPTED_TYPES)}")
        m = _EXPERT.match(name)
        if m:
            experts[m[1]][(int(m[2]), m[3])] = (qtype, fields)
        elif qtype == "FLOAT":
            for f, t in fields.items():
                float_sd[f"{name}.{f}"] = t
        else:
            linears[name] = _linear(name, qtype, fields)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    for name, q in linears.items():
        _set(model, name, QuantLinear(q))
    for path_, parts in experts.items():
        _install_experts(model, path_, parts, float_sd, config.n_routed_experts)
    float_sd = {k: (v.float() if k.endswith(("mlp.gate.weight", "e_score_correction_bias")) else v.to(dtype))
                for k, v in float_sd.items()}
    try:
        model.load_state_dict(float_sd, strict=False, assign=True)
    except RuntimeError as e:
        raise QuantError(f"{root}: tensors do not fit the model in config.json: {e}") from None
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
               and not n.endswith("rotary_emb.inv_freq")]
    if missing:
        raise QuantError(f"{root}: the export lacks tensors the model needs: {missing[:8]}")
    model.model.rotary_emb.reset_parameters("cpu")
    scheme = "w8a8" if desc["model_quant_type"] == "W8A8_DYNAMIC" else "w8a8_static"
    model.quant_config = QuantConfig(scheme, skip=())
    return model.eval()


def _description(root: Path) -> dict:
    files = sorted(root.glob("quant_model_description*.json"))
    if not files:
        raise FileNotFoundError(f"no quant_model_description*.json in {root}: not an msModelSlim export")
    try:
        desc = json.loads(files[0].read_text())
    except json.JSONDecodeError as e:
        raise QuantError(f"corrupt {files[0]}: not valid JSON ({e})") from None
    qtype = desc.get("model_quant_type")
    if qtype not in ACCEPTED_TYPES:
        raise QuantError(f"{files[0]}: model_quant_type {qtype!r} is not supported; accepted: "
                         f"{', '.join(ACCEPTED_TYPES)}")
    if desc.get("kv_quant_type"):
        warnings.warn(f"{files[0]}: kv_quant_type {desc['kv_quant_type']!r} ignored; the KV cache stays "
                      "16-bit (use graphopt's C8, kv_cache='int8', for the MLA latent cache)")
    return desc


def _read_weights(root: Path) -> dict[str, Tensor]:
    files = sorted(root.glob("quant_model_weight*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no quant_model_weight*.safetensors in {root}")
    out = {}
    for f in files:
        try:
            out.update(safetensors.torch.load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise QuantError(f"corrupt msModelSlim weight file {f}: {e}") from None
    return out


def _group_by_module(raw: dict[str, Tensor], config: DeepseekV3Config) -> dict[str, dict]:
    """{graphopt module path: {field: tensor, "_hf_name": the HF name of its weight}}."""
    L = config.num_hidden_layers
    out: dict[str, dict] = defaultdict(dict)
    for hf, t in raw.items():
        layer = re.match(r"model\.layers\.(\d+)\.(.*)$", hf)
        name = hf
        if layer and int(layer[1]) >= L:
            rest = layer[2]
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the main model's embedding / head (shared modules here)
            name = f"mtp.{int(layer[1]) - L}.{rest}"
        field = next((f for f in _FIELDS if name.endswith("." + f)), None)
        if field is None:  # a buffer such as e_score_correction_bias
            module, field = name.rsplit(".", 1)
        else:
            module = name[: -len(field) - 1]
        out[module][field] = t
        if field == "weight":
            out[module]["_hf_name"] = hf                # the description types a module by its weight
        else:
            out[module].setdefault("_hf_name", hf)
    return out


def _deq_scale(t: Tensor) -> Tensor:
    if t.dtype == torch.int64:  # Ascend layout: float32 bits in the low 32 bits
        return torch.from_numpy(t.numpy().astype(np.uint32).view(np.float32).copy())
    return t.float()


def _linear(name: str, qtype: str, f: dict[str, Tensor]) -> QuantizedLinear:
    w = f["weight"]
    if w.dtype != torch.int8:
        raise QuantError(f"{name}.weight: {qtype} weights must be int8, got {w.dtype}")
    out = w.shape[-2]
    if qtype == "W8A8_DYNAMIC":
        if "weight_offset" in f and bool(f["weight_offset"].ne(0).any()):
            raise QuantError(f"{name}.weight_offset is not zero: asymmetric int8 weights are not supported")
        return QuantizedLinear("w8a8", {"weight": w, "scale": f["weight_scale"].float().reshape(out, 1)})
    need = [k for k in ("input_scale", "input_offset", "quant_bias", "deq_scale") if k not in f]
    if need:
        raise QuantError(f"{name}: W8A8 (static) tensors {need} are missing")
    deq, in_scale = _deq_scale(f["deq_scale"]).reshape(out), f["input_scale"].float().reshape(())
    tensors = {"weight": w, "scale": (deq / in_scale).reshape(out, 1), "input_scale": in_scale,
               "bias": f["quant_bias"].float() * deq}
    return QuantizedLinear("w8a8_static", tensors, input_zero=int(round(float(f["input_offset"].reshape(-1)[0]))))


def _install_experts(model, path: str, parts: dict, float_sd: dict, n_experts: int) -> None:
    kinds = {q for q, _ in parts.values()}
    if len(parts) != 3 * n_experts:
        raise QuantError(f"{path}: expected gate/up/down for {n_experts} experts, found {len(parts)} tensors")
    if kinds == {"FLOAT"}:
        g = lambda e, p: parts[(e, p)][1]["weight"]
        float_sd[f"{path}.gate_up_proj"] = torch.stack([torch.cat([g(e, "gate_proj"), g(e, "up_proj")]) for e in range(n_experts)])
        float_sd[f"{path}.down_proj"] = torch.stack([g(e, "down_proj") for e in range(n_experts)])
        return
    if kinds != {"W8A8_DYNAMIC"}:
        raise QuantError(f"{path}: routed experts must be all W8A8_DYNAMIC or all FLOAT, got {sorted(kinds)}")
    q = {k: _linear(f"{path}.{k[0]}.{k[1]}", "W8A8_DYNAMIC", f) for k, (_, f) in parts.items()}

    def stacked(projs: tuple[str, ...]) -> QuantizedLinear:
        cat = lambda e, key: torch.cat([q[(e, p)].tensors[key] for p in projs])
        return QuantizedLinear("w8a8", {key: torch.stack([cat(e, key) for e in range(n_experts)])
                                        for key in ("weight", "scale")})

    _set(model, path, QuantExperts(model.get_submodule(path), stacked(("gate_proj", "up_proj")),
                                   stacked(("down_proj",))))


def _set(model, path: str, module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)
