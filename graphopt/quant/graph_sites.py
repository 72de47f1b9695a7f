"""Where quantisation applies in a captured step graph: the sites both quant passes work on.

A site is one node of the graph with a model-level name (the same names QuantConfig.scheme_for and
quantize_model use, so one config drives both paths):

    linear   aten.linear(x, get_attr W [out, K], [bias])            q_a_proj, o_proj, mlp.*_proj, eh_proj, ...
    experts  aten.matmul(x, aten.transpose(get_attr W [E, out, K], 1, 2))   the stacked expert matmuls
             (x [N, K] shared by every expert for gate_up; [E, N, K] per expert for down_proj)
    moe      graphopt.moe_experts(x, weights, ids, get_attr gate_up, get_attr down): routed experts
             already fused by fuse_moe_experts; named after the experts module (`...mlp.experts`)
    latent   the output of self_attn.kv_a_layernorm: aten.mul(get_attr norm weight, ...) or
             graphopt.rms_norm(x, weight, eps): the normalised latent a C8 cache stores

Readers of one input (`readers_of_one_input`, for SmoothQuant scope="input"): the quantised matmuls
whose input is the same node once views are followed back. After the normalise phase (layer 1 of
`random_model(num_hidden_layers=2)`; the routed experts read the norm output through a flattening view):

    rms_norm_default_7: "f32[s5, s18, 64]" = torch.ops.graphopt.rms_norm.default(add_423, model_model_layers_1_post_attention_layernorm_weight, 1e-06)
    view_15: "f32[s18*s5, 64]" = torch.ops.aten.view.default(rms_norm_default_7, [-1, 64])
    moe_experts_default: "f32[s18*s5, 64]" = torch.ops.graphopt.moe_experts.default(view_15, getitem_23, getitem_24, model_model_layers_1_mlp_experts_gate_up_proj, model_model_layers_1_mlp_experts_down_proj)
    linear_15: "f32[s5, s18, 32]" = torch.ops.aten.linear.default(rms_norm_default_7, model_model_layers_1_mlp_shared_experts_gate_proj_weight)
    linear_16: "f32[s5, s18, 32]" = torch.ops.aten.linear.default(rms_norm_default_7, model_model_layers_1_mlp_shared_experts_up_proj_weight)

-> one group: experts.gate_up_proj, shared_experts.gate_proj, shared_experts.up_proj (and q_a_proj +
kv_a_proj_with_mqa on input_layernorm's output): the groups quant.model_quant.norm_readers names.

Names come from get_attr targets, whatever wrapper the capture put around the model:
`model.model.layers.0.self_attn.q_a_proj.weight` -> `model.layers.0.self_attn.q_a_proj`,
`model.mtp.0.eh_proj.weight` -> `mtp.0.eh_proj`. Linears whose weight is not a plain get_attr (the
router casts its weight to float32 first) are not sites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from .config import QuantConfig

__all__ = ["Site", "find_sites", "module_name", "attr_tensor", "readers_of_one_input"]

aten = torch.ops.aten
_NAME = re.compile(r"(model\.layers\.\d+\..*|mtp\.\d+\..*|lm_head)$")
_TRANSPOSES = (aten.transpose.int, aten.permute.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)   # same values, other shape


@dataclass
class Site:
    name: str
    kind: str                 # "linear" | "experts" | "moe" | "latent"
    node: fx.Node             # the linear / matmul / moe_experts, or the node producing the latent
    x: fx.Node | None         # the activation input (linear, experts, moe)
    weight: fx.Node | None    # get_attr of the weight (linear, experts; moe: gate_up)
    bias: fx.Node | None = None
    down: fx.Node | None = None   # moe: get_attr of the stacked down_proj

    @property
    def per_expert(self) -> bool:
        return self.kind == "experts" and self.x.meta["val"].dim() == 3


def module_name(target: str) -> str | None:
    """Model-level name of a get_attr target (weight suffix dropped), or None outside layers / mtp / lm_head."""
    m = _NAME.search(target.removesuffix(".weight"))
    return m[1] if m else None


def attr_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _get_attr(node) -> fx.Node | None:
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def find_sites(gm: fx.GraphModule, config: QuantConfig) -> list[Site]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default and (w := _get_attr(node.args[1])) is not None:
            name = module_name(w.target)
            bias = node.args[2] if len(node.args) > 2 else None
            if name and config.scheme_for(name) is not None and (bias is None or _get_attr(bias)):
                sites.append(Site(name, "linear", node, node.args[0], w, bias))
        elif node.target is aten.matmul.default and _is_expert_matmul(node):
            w = node.args[1].args[0]
            name = module_name(w.target)
            if name and config.scheme_for(name) is not None:
                sites.append(Site(name, "experts", node, node.args[0], w))
        elif node.target is _op("moe_experts") and all(_get_attr(a) is not None for a in node.args[3:5]):
            gate_up, down = node.args[3], node.args[4]
            name = (module_name(gate_up.target) or "").removesuffix(".gate_up_proj")
            if name and any(config.scheme_for(f"{name}.{p}") for p in ("gate_up_proj", "down_proj")):
                sites.append(Site(name, "moe", node, node.args[0], gate_up, down=down))
        elif config.kv_cache == "int8" and (latent := _latent_norm(node)) is not None:
            sites.append(Site(latent, "latent", node, None, None))
    return sites


def readers_of_one_input(sites: list[Site], config: QuantConfig) -> list[list[tuple[str, fx.Node]]]:
    """The quantised matmuls grouped by the tensor they read, as (name, get_attr of the weight): only
    groups of two or more. A matmul's input is followed back through views; a fused moe site reads
    it with its gate_up (`<experts>.gate_up_proj`, when that is quantised). A per-expert input (the
    experts' down_proj, [E, N, I]) is a different tensor per expert and is never shared."""
    groups: dict[fx.Node, list[tuple[str, fx.Node]]] = {}
    for site in sites:
        if site.kind in ("linear", "experts") and not site.per_expert:
            name = site.name
        elif site.kind == "moe" and config.scheme_for(f"{site.name}.gate_up_proj") is not None:
            name = f"{site.name}.gate_up_proj"
        else:
            continue
        groups.setdefault(_viewed(site.x), []).append((name, site.weight))
    return [g for g in groups.values() if len(g) > 1]


def _viewed(x: fx.Node) -> fx.Node:
    """The node whose values `x` holds, before any reshaping view."""
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _VIEWS:
        x = x.args[0]
    return x


def _op(name: str):
    """torch.ops.graphopt.<name>.default, or None while that op's module is not registered."""
    return getattr(getattr(torch.ops.graphopt, name, None), "default", None)


def _is_expert_matmul(node: fx.Node) -> bool:
    t = node.args[1]
    if not (isinstance(t, fx.Node) and t.op == "call_function" and t.target in _TRANSPOSES):
        return False
    w = _get_attr(t.args[0])
    if w is None or not w.target.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return False
    dims = list(t.args[1:]) if t.target is aten.transpose.int else list(t.args[1])
    return dims in ([1, 2], [2, 1], [-1, -2], [-2, -1], [0, 2, 1])


def _latent_norm(node: fx.Node) -> str | None:
    """Name of the kv_a_layernorm whose output `node` is, if it is one."""
    weights = [a for a in node.args if (w := _get_attr(a)) is not None
               and w.target.endswith("self_attn.kv_a_layernorm.weight")]
    if not weights or node.target not in (aten.mul.Tensor, _op("rms_norm")):
        return None
    return module_name(weights[0].target)
