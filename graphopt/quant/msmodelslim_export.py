"""Export a graphopt-quantised model in msModelSlim's layout, so Ascend runtimes (MindIE, vLLM Ascend) read it.

    qmodel = quantize_model(model, "w8a8")           # or QuantConfig("w8a8_static") / "w4a8"
    qmodel = quantize_model(model, QuantConfig("w8a8_static", algorithms=(SmoothQuantConfig(scope="input"),)))
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
Smoothing (SmoothQuant, FlexSmooth: smooth_inv = 1 / s, the linear computes quantise(x * smooth_inv) @
(W * s)^T) has no field in the layout; as msModelSlim's anti-outlier step does, it is folded into what
produces x, exactly in real arithmetic (not bit for bit: float rounding moves, see the tests):
    input_layernorm.weight            * the one factor of q_a_proj (q_proj) and kv_a_proj_with_mqa
    q_a_layernorm / kv_a_layernorm    * the factor of q_b_proj / kv_b_proj
    post_attention_layernorm.weight   * the one factor of gate_proj / up_proj (dense), or of the experts'
                                        gate_up and the shared experts (MoE); the float router's weight
                                        columns * s, so it reads the same function
    kv_b_proj's v rows (per head: qk_nope rows, then v rows)   * o_proj's factor (float rows, or a
                                        quantised kv_b_proj's per-row scale)
    up_proj rows (dense, shared experts; per routed expert the up rows of gate_up)   * down_proj's factor
                                        (down reads silu(gate) * up); a quantised up: its per-row scale
    enorm / hnorm.weight              * the first / second half of eh_proj's factor
    model.norm and every shared_head.norm   * lm_head's factor (when lm_head is quantised and smoothed)
The linears reading one norm's output must share one factor: SmoothQuantConfig(alpha, scope="input")
computes it so; per-linear factors (the default scope "linear", FlexSmooth's per-linear search) that
differ are refused, naming the norm and that option, as is a quantised reader left unsmoothed beside a
smoothed one. Also refused, naming the module: Hadamard rotation (it mixes channels, which no norm weight
can absorb), a linear bias, other schemes (w8a16, w4a16, fp8) and graphopt's MLA latent C8 cache.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from graphopt.models.deepseek import DeepseekV3ForCausalLM
from graphopt.models.fileio import replace_dir_atomically
from graphopt.ops.packing import unpack_int4

from .config import FlexSmoothConfig, SmoothQuantConfig
from .model_quant import norm_readers
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
    _check_exportable(model)
    fold = _fold_smoothing(model)
    L = model.config.num_hidden_layers
    tensors: dict[str, Tensor] = {}
    desc: dict[str, str] = {}
    done = set()                                      # module paths written by the quantised walk
    for path, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            _put_linear(tensors, desc, hf_name(path, L), mod.q, fold.tensors(path), path)
            done.add(path)
        elif isinstance(mod, QuantExperts):
            _put_experts(tensors, desc, hf_name(path, L), mod, path, fold)
            done.add(path)
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] in done or any(name.startswith(p + ".") for p in done):
            continue
        if name.startswith("mtp.") and name.split(".", 2)[2].startswith(("embed_tokens.", "shared_head.head.")):
            continue                                  # shared with the main model: copied below
        t = fold.floats.get(name, t)
        if name.endswith(_STACKED):
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


def _check_exportable(model: DeepseekV3ForCausalLM) -> None:
    """Everything the layout cannot hold, refused before any folding, naming the module."""
    for path, mod in model.named_modules():
        if isinstance(mod, QuantLatentNorm):
            raise QuantError(f"{path}: graphopt's C8 latent KV cache has no msModelSlim layout; "
                             "quantise without kv_cache='int8'")
        if not isinstance(getattr(mod, "q", None), QuantizedLinear):
            continue
        q = mod.q
        if q.scheme not in TYPE_OF:
            raise QuantError(f"{path}: scheme {q.scheme!r} has no msModelSlim counterpart; exportable: "
                             f"{', '.join(TYPE_OF)}")
        if q.rotate_block:
            raise QuantError(f"{path}: Hadamard rotation (HadamardConfig) mixes input channels, which no "
                             "norm weight (one factor per channel) can absorb, so msModelSlim's layout cannot "
                             "hold it; quantise without HadamardConfig (SmoothQuantConfig(alpha, scope='input') "
                             "smoothing folds and exports)")
        if "bias" in q.tensors:
            raise QuantError(f"{path}: a linear bias is not exported (DeepSeek linears have none)")


# -- folding the smoothing factors -----------------------------------------------------------------
_STACKED = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")   # not shared_experts.down_proj


class _Fold:
    """The tensors the export writes once each smoothing factor (smooth_inv) is folded into what produces
    its linear's input: float tensors by state-dict name, a quantised matmul's by holder path (a
    QuantLinear, or QuantExperts path + ".gate_up" / ".down"). The model itself is not changed.
    Matmuls are named as norm_readers names them: linears by path, stacked experts by weight name."""

    def __init__(self, model: DeepseekV3ForCausalLM):
        self.model, self.state = model, model.state_dict()
        self.floats: dict[str, Tensor] = {}
        self.quant: dict[str, dict[str, Tensor]] = {}

    def tensors(self, holder: str) -> dict[str, Tensor]:
        if holder not in self.quant:
            self.quant[holder] = dict(self.model.get_submodule(holder).tensors())
        return self.quant[holder]

    def holder(self, matmul: str) -> str | None:
        """The holder path of a quantised matmul; None for a float one."""
        parent, _, leaf = matmul.rpartition(".")
        if matmul.endswith(_STACKED):
            experts = self.model.get_submodule(parent)
            part = leaf.removesuffix("_proj")
            return f"{parent}.{part}" if isinstance(experts, QuantExperts) and getattr(experts, part) else None
        return matmul if isinstance(self.model.get_submodule(matmul), QuantLinear) else None

    def smooth_inv(self, matmul: str) -> Tensor | None:
        holder = self.holder(matmul)
        return None if holder is None else self.tensors(holder).get("smooth_inv")

    def folded(self, matmul: str) -> None:
        del self.tensors(self.holder(matmul))["smooth_inv"]

    def _float(self, name: str, factor: Tensor) -> None:
        t = self.floats.get(name, self.state[name])
        self.floats[name] = (t.float() * factor).to(t.dtype)

    def scale_columns(self, matmul: str, s: Tensor) -> None:
        """A float matmul's weight [..., out, K] times s [K]: it then reads x * smooth_inv unchanged."""
        self._float(matmul if matmul.endswith(_STACKED) else f"{matmul}.weight", s)

    def scale_rows(self, matmul: str, factor: Tensor, reader: str) -> None:
        """Output row o of `matmul` times factor[..., o] ([..., out]): a quantised one through its per-row scale."""
        holder = self.holder(matmul)
        if holder is None:
            return self._float(matmul if matmul.endswith(_STACKED) else f"{matmul}.weight", factor.unsqueeze(-1))
        t = self.tensors(holder)
        if t["scale"].shape[-2] != t["weight"].shape[-2]:
            raise QuantError(f"{reader}: its smoothing folds into the output rows of {matmul}, whose scale is "
                             "not one per output row; exportable: per-channel or per-group scales")
        t["scale"] = t["scale"] * factor.unsqueeze(-1)

    def scale_norm(self, norm: str, factor: Tensor) -> None:
        self._float(f"{norm}.weight", factor)


def _fold_smoothing(model: DeepseekV3ForCausalLM) -> _Fold:
    """Every smoothed matmul's factor folded into the producer of its input (the module doc lists where)."""
    fold = _Fold(model)
    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    layers += [(f"mtp.{d}", layer) for d, layer in enumerate(model.mtp)]
    for prefix, layer in layers:
        for norm, readers in norm_readers(layer).items():
            _into_norms(fold, model, [f"{prefix}.{r}" for r in readers], [(f"{prefix}.{norm}", slice(None))])
        _into_rows(fold, f"{prefix}.self_attn.o_proj", f"{prefix}.self_attn.kv_b_proj",
                   functools.partial(_v_rows, layer.self_attn))
        # down reads silu(gate) * up, linear in up's rows
        if hasattr(layer.mlp, "experts"):              # per expert: inv [E, 1, I] -> up rows of gate_up [E, 2I]
            _into_rows(fold, f"{prefix}.mlp.experts.down_proj", f"{prefix}.mlp.experts.gate_up_proj",
                       lambda inv: torch.cat([torch.ones_like(inv[:, 0]), inv[:, 0]], dim=-1))
            mlps = [f"{prefix}.mlp.shared_experts"] if layer.mlp.shared_experts is not None else []
        else:
            mlps = [f"{prefix}.mlp"]
        for mlp in mlps:
            _into_rows(fold, f"{mlp}.down_proj", f"{mlp}.up_proj", lambda inv: inv)
    H = model.config.hidden_size
    for d in range(len(model.mtp)):                    # eh_proj reads [enorm(embedding), hnorm(hidden)]
        _into_norms(fold, model, [f"mtp.{d}.eh_proj"], [(f"mtp.{d}.enorm", slice(0, H)),
                                                        (f"mtp.{d}.hnorm", slice(H, 2 * H))])
    heads = [("model.norm", slice(None))] + [(f"mtp.{d}.shared_head.norm", slice(None)) for d in range(len(model.mtp))]
    _into_norms(fold, model, ["lm_head"], heads)      # one head module, read after every final norm
    return fold


def _into_norms(fold: _Fold, model, readers: list[str], norms: list[tuple[str, slice]]) -> None:
    """The readers of one tensor, the concatenated output of `norms`: one factor into the norm weights;
    float readers that are not smoothed get s on their weight columns, so they read the same function."""
    smoothed = {r: inv for r in readers if (inv := fold.smooth_inv(r)) is not None}
    if not smoothed:
        return
    first, inv = next(iter(smoothed.items()))
    norm = " + ".join(n for n, _ in norms)
    if any(not torch.equal(other, inv) for other in smoothed.values()):
        raise QuantError(f"{norm}: the linears reading its output ({', '.join(smoothed)}) were smoothed with "
                         f"different factors, and msModelSlim's layout holds one, folded into the norm weight; "
                         f"{_shared_hint(model.quant_config)}")
    for r in readers:
        if r in smoothed:
            fold.folded(r)
        elif fold.holder(r) is not None:
            raise QuantError(f"{r}: quantised without smoothing, but it reads the output of {norm}, which "
                             f"{first} smooths: its quantised weight columns cannot take the fold's inverse; "
                             f"{_shared_hint(model.quant_config)}")
        else:
            fold.scale_columns(r, 1.0 / inv)
    for name, part in norms:
        fold.scale_norm(name, inv[part])


def _into_rows(fold: _Fold, reader: str, producer: str, rows) -> None:
    """`reader`'s input channels are linear in output rows of `producer`: its factor scales them
    (rows(inv) -> one factor per output row of producer)."""
    inv = fold.smooth_inv(reader)
    if inv is not None:
        fold.scale_rows(producer, rows(inv), reader)
        fold.folded(reader)


def _v_rows(attn, inv: Tensor) -> Tensor:
    """o_proj's inv [H * v] -> a factor per kv_b_proj row [H * (nope + v)]: per head nope rows (1), then v rows."""
    H, nope, v = attn.num_heads, attn.qk_nope_head_dim, attn.v_head_dim
    return torch.cat([torch.ones(H, nope, dtype=inv.dtype, device=inv.device), inv.view(H, v)], dim=1).flatten()


def _shared_hint(config) -> str:
    t = config.transform
    if isinstance(t, FlexSmoothConfig):
        return ("FlexSmooth searches alpha and beta per linear, so the linears reading one tensor get different "
                "factors: for msModelSlim export quantise with SmoothQuantConfig(alpha, scope='input') instead")
    alpha = t.alpha if isinstance(t, SmoothQuantConfig) else 0.5
    return (f"quantise with SmoothQuantConfig(alpha={alpha}, scope='input'), which gives every linear reading one "
            "tensor one factor (the default scope='linear' computes one per linear)")


def _put(tensors: dict, desc: dict, name: str, t: Tensor, qtype: str) -> None:
    tensors[name] = t.detach().cpu().contiguous().clone()    # clone: safetensors refuses shared storage
    desc[name] = qtype


def _put_linear(tensors: dict, desc: dict, hf: str, q: QuantizedLinear, t: dict[str, Tensor], path: str) -> None:
    """One [out, K] linear (t: its tensors, weight [out, K]) under the HF module name `hf`."""
    qtype = TYPE_OF[q.scheme]                      # _check_exportable: an exportable scheme, no bias
    if "smooth_inv" in t:                          # every reader the fold knows has been folded
        raise QuantError(f"{path}: smoothed, but no producer of its input is known to fold the factor into; "
                         "exportable: smoothing of the linears docs/quantization.md (msModelSlim) lists")
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


def _put_experts(tensors: dict, desc: dict, hf: str, mod: QuantExperts, path: str, fold: _Fold) -> None:
    """Stacked [E, out, K] gate_up / down -> per-expert gate_proj, up_proj, down_proj."""
    for part in ("gate_up", "down"):
        holder = getattr(mod, part)
        if holder is None:
            name = f"{path}.{part}_proj"
            _put_float_experts(tensors, desc, hf, f"{part}_proj", fold.floats.get(name, getattr(mod, f"{part}_proj")))
            continue
        stacked = fold.tensors(f"{path}.{part}")
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
