"""Import msModelSlim (Ascend) W8A8 / W8A8_DYNAMIC / W4A8_DYNAMIC exports, strictly.

An export is a directory with config.json, one `quant_model_description*.json` and
`quant_model_weight*.safetensors`, tensor names in the HF DeepSeek layout (per-expert experts, MTP as
layer num_hidden_layers + i). The description maps every tensor name to its type ("FLOAT": not
quantised; all tensors of one linear share a type) besides the top keys model_quant_type, version,
group_size, kv_quant_type (DESCRIPTION_KEYS). Per linear X:

    W8A8_DYNAMIC  X.weight int8 [out, K], X.weight_scale [out, 1], X.weight_offset [out, 1] (zeros)
                  -> graphopt w8a8: int8 per-channel weights, per-token dynamic int8 activations.
    W8A8          X.weight int8, X.input_scale [1], X.input_offset [1], X.quant_bias int32 [out],
                  X.deq_scale [out] (float32, or int64 carrying the float32 bits in its low half as
                  Ascend kernels take it): y = deq_scale * (x_q @ w^T + quant_bias) with
                  x_q = clamp(round(x / input_scale) + input_offset, -128, 127)
                  -> graphopt w8a8_static with scale = deq_scale / input_scale, bias = quant_bias *
                  deq_scale and input_zero = input_offset: the same formula, regrouped. An optional
                  X.weight_scale [out, 1] that agrees with deq_scale / input_scale is taken as the scale
                  (save_msmodelslim writes it, so its exports re-import bit-exactly).
    W4A8_DYNAMIC  X.weight int8 [out, K], one int4 value (-8..7) a byte; X.weight_scale [out, 1],
                  X.weight_offset [out, 1] (zeros); per group (group_size > 0) also
                  X.weight_scale_second [out, K / group_size], X.weight_offset_second (zeros);
                  w = weight_scale * weight_scale_second * q. Version "1.0.0" exports pack routed
                  experts two int4 a byte along the output dim ([out / 2, K], row 2j in the low
                  nibble, two's complement; recognised by shape) and add X.scale_bias, a kernel-side
                  correction computed from the weights, accepted and not used.
                  -> graphopt w4a8 (progressive): scale = weight_scale, group_scale = int8 of
                  weight_scale_second (ones per channel), which must hold integers 1..127.
Routed experts are stacked into graphopt's [E, out, K] layout (gate rows then up rows); gate and up
share one type, down may differ. Unknown or missing tensors, undescribed or absent ones, and types
outside TENSOR_TYPES are errors that name the first few (and say how many). A non-null kv/fa/reduce
quant type is ignored with a warning (C8 scales there are for non-MLA K/V caches).
save_msmodelslim (msmodelslim_export.py) writes this layout.
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
from graphopt.ops.packing import pack_int4

from .config import QuantConfig
from .model_quant import quantized_names
from .qlinear import QuantExperts, QuantizedLinear, QuantLinear
from .schemes import QuantError

__all__ = ["load_msmodelslim", "ACCEPTED_TYPES", "TENSOR_TYPES", "DESCRIPTION_KEYS", "SCHEME_OF", "hf_name"]

ACCEPTED_TYPES = ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC")
TENSOR_TYPES = ("FLOAT", *ACCEPTED_TYPES)
SCHEME_OF = {"W8A8_DYNAMIC": "w8a8", "W8A8": "w8a8_static", "W4A8_DYNAMIC": "w4a8"}
VERSIONS = ("0", "1.0.0")
DESCRIPTION_KEYS = ("model_quant_type", "version", "group_size", "kv_quant_type", "kv_cache_type",
                    "fa_quant_type", "reduce_quant_type", "metadata", "optional")
FIELDS = {  # the tensors a quantised linear may carry, per type
    "W8A8_DYNAMIC": ("weight", "weight_scale", "weight_offset"),
    "W8A8": ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale", "weight_scale", "weight_offset"),
    "W4A8_DYNAMIC": ("weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second",
                     "scale_bias"),
}
_SUFFIXES = tuple(sorted({f for fs in FIELDS.values() for f in fs} | {"bias"}))
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_MTP_COPIES = ("embed_tokens.", "shared_head.head.")   # HF MTP layers repeat the shared embedding / head


def load_msmodelslim(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> DeepseekV3ForCausalLM:
    root = Path(path)
    desc_file, desc = _description(root)
    config = DeepseekV3Config.from_json(root / "config.json")
    raw = _read_weights(root)
    _check_described(desc_file, desc, raw)
    modules = _group_by_module(raw, desc, config)
    _check_fields(root, modules, config.num_hidden_layers)
    group_size = desc.get("group_size") or 0
    float_sd, linears, experts = {}, {}, defaultdict(dict)
    for name, (qtype, fields) in modules.items():
        m = _EXPERT.match(name)
        if m:
            experts[m[1]][(int(m[2]), m[3])] = (qtype, fields)
        elif qtype == "FLOAT":
            float_sd.update({f"{name}.{f}" if name else f: t for f, t in fields.items()})
        else:
            linears[name] = _linear(name, qtype, fields, group_size)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    for name, q in linears.items():
        _install(model, name, q)
    for path_, parts in experts.items():
        _install_experts(model, path_, parts, float_sd, config.n_routed_experts, group_size)
    for mtp in model.mtp:                  # the MTP head is the main one (shared), quantised or not
        mtp.shared_head.head = model.lm_head
    float_sd = {k: (v.float() if k.endswith(("mlp.gate.weight", "e_score_correction_bias")) else v.to(dtype))
                for k, v in float_sd.items()}
    try:
        result = model.load_state_dict(float_sd, strict=False, assign=True)
    except RuntimeError as e:
        raise QuantError(f"{root}: tensors do not fit the model in config.json: {e}") from None
    L = config.num_hidden_layers
    if result.unexpected_keys:
        raise QuantError(f"{root}: unknown tensors, not in the model of config.json: "
                         f"{few(hf_name(n, L) for n in result.unexpected_keys)}")
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta
               and not n.endswith("rotary_emb.inv_freq")]
    if missing:
        raise QuantError(f"{root}: the export lacks tensors the model needs: {few(hf_name(n, L) for n in missing)}")
    model.model.rotary_emb.reset_parameters("cpu")
    model.quant_config = _quant_config(desc, model)
    return model.eval()


def few(names, shown: int = 5) -> str:
    """'a, b, c, ... (12 in all)': error messages name the first few of a long list."""
    names = sorted(names)
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head}, ... ({len(names)} in all)"


def hf_name(name: str, num_hidden_layers: int) -> str:
    """graphopt tensor / module name -> HF DeepSeek name (MTP module d is layer num_hidden_layers + d)."""
    m = re.match(r"mtp\.(\d+)\.(.*)$", name)
    return f"model.layers.{num_hidden_layers + int(m[1])}.{m[2]}" if m else name


# -- the description and the weight files -------------------------------------------------------
def _description(root: Path) -> tuple[Path, dict]:
    files = sorted(root.glob("quant_model_description*.json"))
    if not files:
        raise FileNotFoundError(f"no quant_model_description*.json in {root}: not an msModelSlim export")
    if len(files) > 1:
        raise QuantError(f"{root}: several descriptions ({', '.join(f.name for f in files)}); keep one")
    f = files[0]
    try:
        desc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise QuantError(f"corrupt {f}: not valid JSON ({e})") from None
    if not isinstance(desc, dict):
        raise QuantError(f"{f}: expected a JSON object of tensor name -> type, got {type(desc).__name__}")
    qtype = desc.get("model_quant_type")
    if qtype not in ACCEPTED_TYPES:
        raise QuantError(f"{f}: model_quant_type {qtype!r} is not supported; accepted: {', '.join(ACCEPTED_TYPES)}")
    if "version" in desc and desc["version"] not in VERSIONS:
        raise QuantError(f"{f}: version {desc['version']!r} is not supported; accepted: {', '.join(VERSIONS)}")
    gs = desc.get("group_size", 0)
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs < 0):
        raise QuantError(f"{f}: group_size must be an integer >= 0 (0: per channel), got {gs!r}")
    for key in ("kv_quant_type", "kv_cache_type", "fa_quant_type", "reduce_quant_type"):
        if desc.get(key):
            warnings.warn(f"{f}: {key} {desc[key]!r} ignored; attention and the KV cache stay 16-bit (use "
                          "graphopt's C8, kv_cache='int8', for the MLA latent cache)")
    return f, desc


def _read_weights(root: Path) -> dict[str, Tensor]:
    files = sorted(root.glob("quant_model_weight*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no quant_model_weight*.safetensors in {root}")
    out = {}
    for f in files:
        try:
            part = safetensors.torch.load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise QuantError(f"corrupt msModelSlim weight file {f}: {e}") from None
        twice = set(part) & set(out)
        if twice:
            raise QuantError(f"{f}: tensors also in another weight file: {few(twice)}")
        out.update(part)
    return out


def _check_described(f: Path, desc: dict, raw: dict[str, Tensor]) -> None:
    """Every tensor described, every described tensor present, every type accepted."""
    described = {k: v for k, v in desc.items() if k not in DESCRIPTION_KEYS}
    if set(raw) - set(described):
        raise QuantError(f"{f}: tensors in the weight files but not described: {few(set(raw) - set(described))}")
    if set(described) - set(raw):
        raise QuantError(f"{f}: described tensors the weight files lack: {few(set(described) - set(raw))}")
    bad = [f"{k} ({v!r})" for k, v in described.items() if v not in TENSOR_TYPES]
    if bad:
        raise QuantError(f"{f}: types not accepted ({', '.join(TENSOR_TYPES)}): {few(bad)}")
    if desc["model_quant_type"] not in described.values():
        raise QuantError(f"{f}: model_quant_type is {desc['model_quant_type']} but no tensor has that type")


def _group_by_module(raw: dict[str, Tensor], desc: dict, config: DeepseekV3Config) -> dict[str, tuple]:
    """{graphopt module path: (type, {field: tensor})}; the MTP layers' copies of embedding and head dropped."""
    L = config.num_hidden_layers
    out: dict[str, tuple[set, dict]] = defaultdict(lambda: (set(), {}))
    for hf, t in raw.items():
        layer = re.match(r"model\.layers\.(\d+)\.(.*)$", hf)
        name = hf
        if layer and int(layer[1]) >= L:
            if layer[2].startswith(_MTP_COPIES):
                continue
            name = f"mtp.{int(layer[1]) - L}.{layer[2]}"
        field = next((s for s in _SUFFIXES if name.endswith("." + s)), None)
        if field:
            module = name[: -len(field) - 1]
        else:                                               # a buffer such as e_score_correction_bias
            module, _, field = name.rpartition(".")
        out[module][0].add(desc[hf])
        out[module][1][field] = t
    mixed = [f"{hf_name(m, L)} ({', '.join(sorted(types))})" for m, (types, _) in out.items() if len(types) > 1]
    if mixed:
        raise QuantError(f"the tensors of one linear must share a type in the description: {few(mixed)}")
    return {m: (types.pop(), fields) for m, (types, fields) in out.items()}


def _check_fields(root: Path, modules: dict, L: int) -> None:
    unknown = [f"{hf_name(m, L)}.{f}" for m, (q, fields) in modules.items() if q != "FLOAT"
               for f in fields if f not in FIELDS[q]]
    if unknown:
        raise QuantError(f"{root}: unknown tensors for their linear's type: {few(unknown)}")


# -- one linear ----------------------------------------------------------------------------------
def _deq_scale(t: Tensor) -> Tensor:
    if t.dtype == torch.int64:  # Ascend layout: float32 bits in the low 32 bits
        return torch.from_numpy(t.numpy().astype(np.uint32).view(np.float32).copy())
    return t.float()


def _need(name: str, qtype: str, f: dict, keys: tuple[str, ...]) -> None:
    lacking = [k for k in keys if k not in f]
    if lacking:
        raise QuantError(f"{name}: {qtype} tensors {', '.join(f'{name}.{k}' for k in lacking)} are missing")


def _zero(name: str, f: dict, key: str) -> None:
    if key in f and bool(f[key].ne(0).any()):
        raise QuantError(f"{name}.{key} is not zero: asymmetric weights are not supported")


def _linear(name: str, qtype: str, f: dict[str, Tensor], group_size: int = 0) -> QuantizedLinear:
    _need(name, qtype, f, ("weight",) if qtype == "W8A8" else ("weight", "weight_scale"))
    w = f["weight"]
    if w.dtype != torch.int8:
        raise QuantError(f"{name}.weight: {qtype} weights must be int8, got {w.dtype}")
    if qtype == "W4A8_DYNAMIC":
        return _w4a8(name, f, group_size)
    out = w.shape[-2]
    _zero(name, f, "weight_offset")
    if qtype == "W8A8_DYNAMIC":
        return QuantizedLinear("w8a8", {"weight": w, "scale": f["weight_scale"].float().reshape(out, 1)})
    _need(name, qtype, f, ("input_scale", "input_offset", "quant_bias", "deq_scale"))
    deq, in_scale = _deq_scale(f["deq_scale"]).reshape(out), f["input_scale"].float().reshape(())
    scale = (deq / in_scale).reshape(out, 1)
    if "weight_scale" in f:
        ws = f["weight_scale"].float().reshape(out, 1)
        if not torch.allclose(ws * in_scale, deq.reshape(out, 1), rtol=1e-6, atol=0):
            raise QuantError(f"{name}: weight_scale * input_scale disagrees with deq_scale")
        scale = ws
    tensors = {"weight": w, "scale": scale, "input_scale": in_scale}
    qbias = f["quant_bias"].reshape(out)
    if bool(qbias.ne(0).any()):
        tensors["bias"] = qbias.float() * deq
    return QuantizedLinear("w8a8_static", tensors, input_zero=int(round(float(f["input_offset"].reshape(-1)[0]))))


def unpack_int4_rows(p: Tensor) -> Tensor:
    """[out / 2, K] int8, two int4 a byte along the output dim (row 2j low nibble) -> int8 [out, K]."""
    u = p.to(torch.int16) & 0xFF
    lo, hi = u & 0xF, u >> 4
    q = torch.stack([lo, hi], dim=1).flatten(0, 1)                                # [out, K]
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def _w4a8(name: str, f: dict[str, Tensor], group_size: int) -> QuantizedLinear:
    scale = f["weight_scale"].float()
    out, w = scale.shape[0], f["weight"]
    if w.shape[0] * 2 == out:                                # version 1.0.0 routed experts: packed
        w = unpack_int4_rows(w)
    if w.shape[0] != out:
        raise QuantError(f"{name}.weight has {w.shape[0]} rows, weight_scale {out}")
    if int(w.min()) < -8 or int(w.max()) > 7:
        raise QuantError(f"{name}.weight: W4A8_DYNAMIC weights must be int4 values (-8..7)")
    _zero(name, f, "weight_offset")
    _zero(name, f, "weight_offset_second")
    k = w.shape[-1]
    second = f.get("weight_scale_second")
    if second is None:
        if group_size:
            raise QuantError(f"{name}: group_size is {group_size} but {name}.weight_scale_second is missing")
        group_scale = torch.ones(out, 1, dtype=torch.int8)
    else:
        groups = second.shape[-1]
        if not group_size or k % groups or not (k // groups == group_size or (groups == 1 and group_size >= k)):
            raise QuantError(f"{name}.weight_scale_second has {groups} groups over K={k}, which does not "
                             f"match group_size {group_size}")
        s = second.float().reshape(out, groups)
        if not bool((s == s.round()).all()) or float(s.min()) < 1 or float(s.max()) > 127:
            raise QuantError(f"{name}.weight_scale_second: graphopt's w4a8 widens int4 to int8 by integer "
                             "group scales 1..127 (progressive, QServe-style); these are not")
        group_scale = s.to(torch.int8)
        if int((w.unflatten(-1, (groups, -1)).abs().amax(-1).to(torch.int32) * group_scale).max()) > 127:
            raise QuantError(f"{name}: int4 value * group scale exceeds the int8 range")
    if k % 2:
        raise QuantError(f"{name}.weight: graphopt keeps int4 weights two per byte along K, which must be even "
                         f"(K={k})")
    return QuantizedLinear("w4a8", {"weight": pack_int4(w), "scale": scale.reshape(out, 1),
                                    "group_scale": group_scale})


def _module(model, path: str, what: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise QuantError(f"unknown {what} {hf_name(path, model.config.num_hidden_layers)}: not in the model "
                         "of config.json") from None


def _install(model, path: str, q: QuantizedLinear) -> None:
    want = tuple(_module(model, path, "quantised linear").weight.shape)
    got = tuple(q.shape)
    if got != want:
        raise QuantError(f"{path}.weight: shape {list(got)} does not fit the model in config.json ({list(want)})")
    _set(model, path, QuantLinear(q))


# -- routed experts ------------------------------------------------------------------------------
def _install_experts(model, path: str, parts: dict, float_sd: dict, n_experts: int, group_size: int) -> None:
    want = {(e, p) for e in range(n_experts) for p in ("gate_proj", "up_proj", "down_proj")}
    if set(parts) != want:
        raise QuantError(f"{path}: expected gate/up/down for {n_experts} experts; missing: "
                         f"{few(f'{path}.{e}.{p}' for e, p in want - set(parts))}; unknown: "
                         f"{few(f'{path}.{e}.{p}' for e, p in set(parts) - want) or 'none'}")
    stacked = []
    for name, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        kinds = {parts[(e, p)][0] for e in range(n_experts) for p in projs}
        if len(kinds) > 1:
            raise QuantError(f"{path}: the {'/'.join(projs)} of all experts must share one type, got {sorted(kinds)}")
        if kinds == {"FLOAT"}:
            w = lambda e, p: parts[(e, p)][1]["weight"]
            float_sd[f"{path}.{name}"] = torch.stack([torch.cat([w(e, p) for p in projs]) for e in range(n_experts)])
            stacked.append(None)
            continue
        qtype = kinds.pop()
        q = {(e, p): _linear(f"{path}.{e}.{p}", qtype, parts[(e, p)][1], group_size)
             for e in range(n_experts) for p in projs}
        stacked.append(_stack(path, [[q[(e, p)] for p in projs] for e in range(n_experts)]))
    experts = _module(model, path, "routed experts")
    for part, q, want_shape in zip(("gate_up", "down"), stacked, (experts.gate_up_proj.shape, experts.down_proj.shape)):
        if q is not None and tuple(q.shape) != tuple(want_shape):
            raise QuantError(f"{path}: stacked {part} shape {list(q.shape)} does not fit "
                             f"the model in config.json ({list(want_shape)})")
    _set(model, path, QuantExperts(experts, *stacked))


def _stack(path: str, per_expert: list[list[QuantizedLinear]]) -> QuantizedLinear:
    """[expert][proj] linears -> one [E, out, K] linear (projections concatenated along out)."""
    first = per_expert[0][0]
    if any(q.input_zero != first.input_zero for qs in per_expert for q in qs):
        raise QuantError(f"{path}: stacked static experts need one input_offset")
    if any("bias" in q.tensors for qs in per_expert for q in qs):
        raise QuantError(f"{path}: a non-zero quant_bias is not supported for routed experts")
    keys = [k for k in ("weight", "scale", "group_scale") if k in first.tensors]
    tensors = {k: torch.stack([torch.cat([q.tensors[k] for q in qs]) for qs in per_expert]) for k in keys}
    if "input_scale" in first.tensors:                      # static: one activation scale per expert input
        scales = []
        for qs in per_expert:
            if any(not torch.equal(q.tensors["input_scale"], qs[0].tensors["input_scale"]) for q in qs):
                raise QuantError(f"{path}: gate_proj and up_proj read the same input; their input_scale must match")
            scales.append(qs[0].tensors["input_scale"])
        s = torch.stack(scales)
        tensors["input_scale"] = s[0] if bool((s == s[0]).all()) else s.view(-1, 1, 1)
    return QuantizedLinear(first.scheme, tensors, input_zero=first.input_zero)


def _set(model, path: str, module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _quant_config(desc: dict, model) -> QuantConfig:
    """The main scheme from model_quant_type; matmuls of another type as overrides."""
    scheme = SCHEME_OF[desc["model_quant_type"]]
    overrides = {name: s for name, s in quantized_names(model).items() if s != scheme}
    ks = [m.q.shape[-1] for m in model.modules() if isinstance(m, QuantLinear) and m.q.scheme == "w4a8"]
    group_size = desc.get("group_size") or max(ks, default=128)      # per channel: one group per row
    return QuantConfig(scheme, skip=(), overrides=overrides, group_size=group_size)
