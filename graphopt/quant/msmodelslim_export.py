"""Export a graphopt-quantised model in msModelSlim's layout, so Ascend runtimes (MindIE, vLLM Ascend) read it.

    qmodel = quantize_model(model, "w8a8")           # or QuantConfig("w8a8_static") / "w4a8"
    save_msmodelslim(qmodel, "ascend_export/")       # load_msmodelslim("ascend_export/") reads it back

One directory, written atomically (graphopt.models.fileio.replace_dir_atomically: a temporary sibling,
then a rename; modes from the umask), the description last:

    config.json                        the model's HF config
    quant_model_weight_<type>.safetensors   HF DeepSeek names: per-expert experts
                                            (model.layers.1.mlp.experts.0.gate_proj.weight ...), MTP
                                            module d as model.layers.<num_hidden_layers + d> with its
                                            copies of embed_tokens and shared_head.head
    quant_model_description.json       {tensor name: type} plus model_quant_type, version, group_size,
                                       kv_quant_type (null)

Per graphopt scheme (the layouts msmodelslim.py documents):
    w8a8         -> W8A8_DYNAMIC  weight, weight_scale [out, 1] fp32, weight_offset zeros
    w8a8_static  -> W8A8          weight, input_scale [1] fp32, input_offset [1], deq_scale [out] fp32
                                  (= scale * input_scale), quant_bias int32 zeros, and weight_scale /
                                  weight_offset, so the import recovers graphopt's scale bit-exactly
    w4a8         -> W4A8_DYNAMIC  per group: weight int8 [out, K] (one int4 a byte), weight_scale [out, 1],
                                  weight_scale_second [out, K / group_size] (graphopt's integer group
                                  scales), zero offsets; version "0" (the unpacked pre-1.0.0 layout)
Not representable, so refused with an error naming the module: smoothing / rotation (a per-channel input
factor: msModelSlim folds it into the norm weights instead), a linear bias, other schemes (w8a16, w4a16,
fp8), and graphopt's MLA latent C8 cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from graphopt.models.deepseek import DeepseekV3ForCausalLM
from graphopt.models.fileio import replace_dir_atomically
from graphopt.ops.packing import unpack_int4

from .msmodelslim import ACCEPTED_TYPES, SCHEME_OF, hf_name
from .qlinear import QuantExperts, QuantizedLinear, QuantLatentNorm, QuantLinear
from .schemes import QuantError

__all__ = ["save_msmodelslim"]

TYPE_OF = {scheme: qtype for qtype, scheme in SCHEME_OF.items()}
DESCRIPTION_FILE = "quant_model_description.json"


def save_msmodelslim(model: DeepseekV3ForCausalLM, directory: str | os.PathLike) -> None:
    """Write `model` (from quantize_model; schemes w8a8, w8a8_static, w4a8) to `directory`, atomically."""
    if not hasattr(model, "quant_config"):
        raise QuantError("save_msmodelslim needs a model from quantize_model (it has no quant_config); "
                         "quantise it first")
    L = model.config.num_hidden_layers
    tensors: dict[str, Tensor] = {}
    desc: dict[str, str] = {}
    done = set()                                      # module paths written by the quantised walk
    for path, mod in model.named_modules():
        if isinstance(mod, QuantLatentNorm):
            raise QuantError(f"{path}: graphopt's C8 latent KV cache has no msModelSlim layout; "
                             "quantise without kv_cache='int8'")
        if isinstance(mod, QuantLinear):
            _put_linear(tensors, desc, hf_name(path, L), mod.q, mod.tensors(), path)
            done.add(path)
        elif isinstance(mod, QuantExperts):
            _put_experts(tensors, desc, hf_name(path, L), mod, path)
            done.add(path)
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] in done or any(name.startswith(p + ".") for p in done):
            continue
        if name.startswith("mtp.") and name.split(".", 2)[2].startswith(("embed_tokens.", "shared_head.head.")):
            continue                                  # shared with the main model: copied below
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            _put_float_experts(tensors, desc, hf_name(name.rpartition(".")[0], L), name.rpartition(".")[2], t)
            continue
        _put(tensors, desc, hf_name(name, L), t, "FLOAT")
    for d in range(len(model.mtp)):                   # HF MTP layers repeat the embedding and the head
        for src, dst in (("model.embed_tokens.", "embed_tokens."), ("lm_head.", "shared_head.head.")):
            for name in [n for n in desc if n.startswith(src)]:
                _put(tensors, desc, f"model.layers.{L + d}.{dst}{name[len(src):]}", tensors[name], desc[name])
    used = {t for t in desc.values() if t != "FLOAT"}
    if not used:
        raise QuantError("save_msmodelslim: the model has no quantised matmul")
    top = max(used, key=ACCEPTED_TYPES.index)         # priority (assumed): W8A8 < W8A8_DYNAMIC < W4A8_DYNAMIC
    w4 = "W4A8_DYNAMIC" in used
    description = {"model_quant_type": top, "version": "0" if w4 else "1.0.0",
                   "group_size": model.quant_config.group_size if w4 else 0, "kv_quant_type": None, **desc}

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(model.config.to_json_string())
        safetensors.torch.save_file(tensors, str(tmp / f"quant_model_weight_{top.lower()}.safetensors"))
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(description, indent=1) + "\n")  # last: vouches for the rest

    replace_dir_atomically(directory, write, is_ours=lambda d: any(d.glob("quant_model_description*.json")),
                           what="msModelSlim export")


def _put(tensors: dict, desc: dict, name: str, t: Tensor, qtype: str) -> None:
    tensors[name] = t.detach().cpu().contiguous().clone()    # clone: safetensors refuses shared storage
    desc[name] = qtype


def _put_linear(tensors: dict, desc: dict, hf: str, q: QuantizedLinear, t: dict[str, Tensor], path: str) -> None:
    """One [out, K] linear (t: its tensors, weight [out, K]) under the HF module name `hf`."""
    qtype = TYPE_OF.get(q.scheme)
    if qtype is None:
        raise QuantError(f"{path}: scheme {q.scheme!r} has no msModelSlim counterpart; exportable: "
                         f"{', '.join(TYPE_OF)}")
    if "smooth_inv" in t or q.rotate_block:
        raise QuantError(f"{path}: smoothing / rotation scales the input per channel, which msModelSlim's "
                         "layout cannot hold; quantise without SmoothQuant, FlexSmooth or Hadamard")
    if "bias" in t:
        raise QuantError(f"{path}: a linear bias is not exported (DeepSeek linears have none)")
    w, scale = t["weight"], t["scale"].float()
    if q.packed:                                   # msModelSlim's pre-1.0.0 layout: one int4 a byte
        w = unpack_int4(w, signed=True)
    out = w.shape[-2]
    zeros = torch.zeros(out, 1, dtype=torch.float32)
    fields = {"weight": w, "weight_scale": scale.reshape(out, 1), "weight_offset": zeros}
    if qtype == "W8A8":
        in_scale = t["input_scale"].float().reshape(1)
        fields.update(input_scale=in_scale, input_offset=torch.tensor([float(q.input_zero)]),
                      deq_scale=(scale.reshape(out) * in_scale), quant_bias=torch.zeros(out, dtype=torch.int32))
    elif qtype == "W4A8_DYNAMIC":
        second = t["group_scale"].float().reshape(out, -1)
        fields.update(weight_scale_second=second, weight_offset_second=torch.zeros_like(second))
    for field, tensor in fields.items():
        _put(tensors, desc, f"{hf}.{field}", tensor, qtype)


def _put_experts(tensors: dict, desc: dict, hf: str, mod: QuantExperts, path: str) -> None:
    """Stacked [E, out, K] gate_up / down -> per-expert gate_proj, up_proj, down_proj."""
    for part in ("gate_up", "down"):
        holder = getattr(mod, part)
        if holder is None:
            _put_float_experts(tensors, desc, hf, f"{part}_proj", getattr(mod, f"{part}_proj"))
            continue
        stacked = holder.tensors()
        for e in range(mod.num_experts):
            q, t = holder.q.expert(e, stacked)
            if part == "down":
                _put_linear(tensors, desc, f"{hf}.{e}.down_proj", q, t, path)
                continue
            rows = t["weight"].shape[-2] // 2                  # gate rows, then up rows
            for proj, sl in (("gate_proj", slice(0, rows)), ("up_proj", slice(rows, None))):
                half = {k: (v[sl] if k in ("weight", "scale", "group_scale") else v) for k, v in t.items()}
                _put_linear(tensors, desc, f"{hf}.{e}.{proj}", q, half, path)


def _put_float_experts(tensors: dict, desc: dict, hf: str, part: str, w: Tensor) -> None:
    for e in range(w.shape[0]):
        if part == "down_proj":
            _put(tensors, desc, f"{hf}.{e}.down_proj.weight", w[e], "FLOAT")
        else:
            gate, up = w[e].chunk(2, dim=0)
            _put(tensors, desc, f"{hf}.{e}.gate_proj.weight", gate, "FLOAT")
            _put(tensors, desc, f"{hf}.{e}.up_proj.weight", up, "FLOAT")
