"""Quantised checkpoints: save and load a model produced by quantize_model, bit-exact.

A directory, written atomically as a whole (graphopt.models.fileio.replace_dir_atomically: a
temporary sibling, then a rename; readers see the old directory or the whole new one). An existing
directory is replaced only when empty or a quantised checkpoint itself. `quant_model.json` is
written last inside it, so its presence vouches for the rest:

    config.json          the model's HF config (graphopt.models.config)
    model.safetensors    every tensor of the quantised model under its module path:
                           model.layers.0.self_attn.q_a_proj.weight        int8  [out, K]
                           model.layers.0.self_attn.q_a_proj.scale         fp32  [out, 1]
                           model.layers.0.self_attn.q_a_proj.smooth_inv    fp32  [K]
                           model.layers.1.mlp.experts.gate_up.weight       int8  [E, 2I, H]
                           model.layers.0.self_attn.kv_a_layernorm.kv_scale fp32 [R]    (C8)
                           ... and the 16-bit tensors that stayed float.
                         int4 weights (w4a8, w4a16, nf4 codes) are packed two per byte along K
                         (uint8, low nibble first, value + 8 for signed int4; graphopt/ops/packing.py),
                         int2 weights (w2a16) four per byte (low bits first), so the file is the size
                         the scheme promises; hif8 codes are uint8 already. They are packed in
                         memory too, so they are written and loaded as they are. Codebook schemes save their
                         table (`....codebook`, fp32 [16] or [256]) with each linear.
    quant_model.json     {"format": "graphopt-quant", "version": 1, "quant_config": QuantConfig.to_dict(),
                          "modules": {path: {"kind": "linear" | "experts" | "kv", scheme, rotate_block,
                          act_block, input_zero, meta (searched alpha/beta, clip ratios...), shape}},
                          "packed_int4": {tensor name: unpacked dtype}, "packed_int2": {tensor name:
                          unpacked dtype} (absent in files without int2), "aliases": {name: same
                          tensor's saved name}}
    tokenizer.json       the tokenizer the ids belong to, when save_quantized is given one

Loading rebuilds the reference model on the meta device, swaps in the quantised modules the JSON
lists and assigns every tensor (strict: a missing or unexpected tensor is an error that names it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from graphopt.models.config import DeepseekV3Config
from graphopt.models.fileio import replace_dir_atomically
from graphopt.models.deepseek import DeepseekV3ForCausalLM

from .config import QuantConfig
from .qlinear import QuantExperts, QuantizedLinear, QuantLatentNorm, QuantLinear
from .schemes import SCHEMES, QuantError

__all__ = ["save_quantized", "load_quantized", "FORMAT", "DESCRIPTION_FILE"]

FORMAT, VERSION = "graphopt-quant", 1
DESCRIPTION_FILE, WEIGHTS_FILE = "quant_model.json", "model.safetensors"


def save_quantized(model: DeepseekV3ForCausalLM, path: str | os.PathLike, tokenizer: Any = None) -> None:
    """Write `model` (from quantize_model / load_quantized) to the directory `path`, atomically.

    `tokenizer`: a tokenizer.json path or an object with .save(path), copied beside the weights.
    """
    if not hasattr(model, "quant_config"):
        raise QuantError("save_quantized needs a model from quantize_model / load_quantized "
                         "(it has no quant_config); quantise it first")
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]                  # MTP's shared embedding / head
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    modules = _describe(model)
    packed = _packed_weights(modules, tensors)    # packed in memory already: written as they are
    description = {"format": FORMAT, "version": VERSION, "quant_config": model.quant_config.to_dict(),
                   "modules": modules, "packed_int4": packed[4], "aliases": aliases}
    if packed[2]:
        description["packed_int2"] = packed[2]

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(model.config.to_json_string())
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE))
        if tokenizer is not None:
            from graphopt.models.tokenizer import save_tokenizer_into   # on use: `tokenizers` is not needed for the weights
            save_tokenizer_into(tokenizer, tmp)
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(description, indent=1) + "\n")  # last: vouches for the rest

    replace_dir_atomically(path, write, is_ours=lambda d: (d / DESCRIPTION_FILE).is_file(),
                           what=f"quantised checkpoint (no {DESCRIPTION_FILE})")


def _describe(model: nn.Module) -> dict:
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            out[path] = {"kind": "linear", **mod.q.spec()}
        elif isinstance(mod, QuantExperts):
            out[path] = {"kind": "experts", **{part: (getattr(mod, part).q.spec() if getattr(mod, part) else None)
                                               for part in ("gate_up", "down")}}
        elif isinstance(mod, QuantLatentNorm):
            out[path] = {"kind": "kv"}
    return out


def _packed_weights(modules: dict, tensors: dict[str, Tensor]) -> dict[int, dict[str, str]]:
    """{4: {name: values' dtype}, 2: {...}}: the saved names of the weights packed in memory, int4 and
    NF4 codes (4 bits) and int2 (2 bits), with the dtype their unpacked values have: "int8" (signed
    int4, stored + 8) or "uint8" (codes: HQQ's with a zero point, NF4, int2)."""
    out: dict[int, dict[str, str]] = {4: {}, 2: {}}
    for path, d in modules.items():
        specs = [(path, d)] if d["kind"] == "linear" else \
            [(f"{path}.{p}", d[p]) for p in ("gate_up", "down") if d["kind"] == "experts" and d[p]]
        for p, spec in specs:
            scheme = SCHEMES[spec["scheme"]]
            if scheme.per_byte > 1:
                signed = scheme.weight == "int4" and f"{p}.zero" not in tensors
                out[scheme.weight_bits][f"{p}.weight"] = "int8" if signed else "uint8"
    return out


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> DeepseekV3ForCausalLM:
    root = Path(path)
    desc = _read_description(root)
    config = DeepseekV3Config.from_json(root / "config.json")
    try:
        tensors = safetensors.torch.load_file(str(root / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise QuantError(f"corrupt or unreadable quantised weights {root / WEIGHTS_FILE}: {e}") from None
    packed = _packed_weights(desc["modules"], tensors)  # stay packed: the form the ops take
    for bits, key in ((4, "packed_int4"), (2, "packed_int2")):
        for n in packed[bits]:
            if n not in desc.get(key, {}):
                raise QuantError(f"{root / WEIGHTS_FILE}: {bits}-bit weight {n} is not listed as packed in "
                                 f"{DESCRIPTION_FILE} ({key})")
        for n in desc.get(key, {}):
            if n not in tensors:
                raise QuantError(f"{root / WEIGHTS_FILE}: packed int{bits} tensor {n} is missing")
    for alias, original in desc["aliases"].items():
        tensors[alias] = tensors[original]
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    for mpath, d in desc["modules"].items():
        _install(model, mpath, d, tensors)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise QuantError(f"{root / WEIGHTS_FILE} does not match its description {DESCRIPTION_FILE}: {e}") from None
    model.model.rotary_emb.reset_parameters(device)
    model.quant_config = QuantConfig.from_dict(desc["quant_config"])
    return model.eval()


def _read_description(root: Path) -> dict:
    f = root / DESCRIPTION_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: not a graphopt quantised checkpoint (or an interrupted save)")
    try:
        desc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise QuantError(f"corrupt {f}: not valid JSON ({e})") from None
    if desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise QuantError(f"{f}: format {desc.get('format')!r} version {desc.get('version')!r}; "
                         f"this graphopt reads {FORMAT!r} version {VERSION}")
    for key in ("quant_config", "modules", "packed_int4", "aliases"):
        if key not in desc:
            raise QuantError(f"{f}: missing key {key!r}")
    return desc


def _qlinear(prefix: str, spec: dict, tensors: dict[str, Tensor]) -> QuantizedLinear:
    own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")
           and "." not in k[len(prefix) + 1:]}
    if "weight" not in own or "scale" not in own:
        raise QuantError(f"quantised module {prefix}: tensors {prefix}.weight / .scale are missing")
    return QuantizedLinear(spec["scheme"], own, spec["rotate_block"], spec["act_block"], spec["input_zero"],
                           spec.get("meta", {}))


def _install(model: nn.Module, path: str, d: dict, tensors: dict[str, Tensor]) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, leaf)
    if d["kind"] == "linear":
        new = QuantLinear(_qlinear(path, d, tensors))
    elif d["kind"] == "experts":
        parts = [_qlinear(f"{path}.{p}", d[p], tensors) if d[p] else None for p in ("gate_up", "down")]
        new = QuantExperts(old, *parts)
    elif d["kind"] == "kv":
        new = QuantLatentNorm(old, tensors[f"{path}.kv_scale"])
    else:
        raise QuantError(f"{DESCRIPTION_FILE}: module {path} has unknown kind {d['kind']!r}")
    setattr(parent, leaf, new)
