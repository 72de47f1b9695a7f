"""Fuse the MoE router subgraph into one `graphopt.moe_route` node (weights fp32 [N, k], ids int64 [N, k]).

Handles the router as models.deepseek.TopkRouter writes it, in every configuration DeepSeek ships:
  * noaux_tc (V3/R1): sigmoid scores + e_score_correction_bias for selection, groups scored by their
    top-2 experts, best topk_group groups kept, top-k inside them;
  * group_limited_greedy (V2): softmax or sigmoid scores, groups scored by their best expert;
  * greedy, or n_group 1: a plain top-k, with or without a correction bias;
  * with or without normalisation (norm_topk_prob), any routed_scaling_factor, any number of
    experts, groups and top-k (all read from the matched graph), float32 or bf16 models (the casts
    to float32 of the input and weights stay outside the pattern and are absorbed when the op can
    do the cast itself).
Given `ctx.model_config`, only that configuration's pattern is traced; without it, all of them.
Not matched: a linear + softmax + top-k that is not a router (e.g. no gather of the chosen scores,
or a top-k over another dimension); a grouped view whose sizes do not multiply to the expert count.

Before (float32, from `capture_main(random_model())`, layer 1; the group-masking lines elided):
    linear_13: "f32[s18*s5, 8]" = torch.ops.aten.linear.default(view_16, model_model_layers_1_mlp_gate_weight);  model_model_layers_1_mlp_gate_weight = None
    sigmoid: "f32[s18*s5, 8]" = torch.ops.aten.sigmoid.default(linear_13);  linear_13 = None
    add_858: "f32[s18*s5, 8]" = torch.ops.aten.add.Tensor(sigmoid, model_model_layers_1_mlp_gate_e_score_correction_bias);  model_model_layers_1_mlp_gate_e_score_correction_bias = None
    view_17: "f32[s18*s5, 4, 2]" = torch.ops.aten.view.default(add_858, [-1, 4, 2])
    topk = torch.ops.aten.topk.default(view_17, 2);  view_17 = None
    ...
    masked_fill_2: "f32[s18*s5, 8]" = torch.ops.aten.masked_fill.Scalar(add_858, eq_488, -inf);  add_858 = eq_488 = None
    topk_2 = torch.ops.aten.topk.default(masked_fill_2, 2);  masked_fill_2 = None
    getitem_21: "i64[s18*s5, 2]" = topk_2[1];  topk_2 = None
    gather: "f32[s18*s5, 2]" = torch.ops.aten.gather.default(sigmoid, 1, getitem_21);  sigmoid = None
    sum_2: "f32[s18*s5, 1]" = torch.ops.aten.sum.dim_IntList(gather, [-1], True)
    add_922: "f32[s18*s5, 1]" = torch.ops.aten.add.Tensor(sum_2, 1e-20);  sum_2 = None
    div: "f32[s18*s5, 2]" = torch.ops.aten.div.Tensor(gather, add_922);  gather = add_922 = None
    mul_741: "f32[s18*s5, 2]" = torch.ops.aten.mul.Tensor(div, 2.5);  div = None
After:
    moe_route_default = torch.ops.graphopt.moe_route.default(view_16, model_model_layers_1_mlp_gate_weight, model_model_layers_1_mlp_gate_e_score_correction_bias, 2, 4, 2, 'noaux_tc', 'sigmoid', True, 2.5);  model_model_layers_1_mlp_gate_weight = model_model_layers_1_mlp_gate_e_score_correction_bias = None
    getitem_40: "f32[s18*s5, 2]" = moe_route_default[0]
    getitem_41: "i64[s18*s5, 2]" = moe_route_default[1];  moe_route_default = None
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import core  # noqa: F401  registers torch.ops.graphopt.*
from .base import GraphPass, PassContext, PassResult
from .patterns import Match, Pattern, call_op, fake_mode_of, find_matches, getitem, rewrite, same_shape, \
    strip_float_cast, trace_pattern, val

# Sentinels the patterns are traced with; each is a wildcard that matches (and reports) any value.
_N_GROUP, _GROUP_SIZE, _TOPK_GROUP, _TOP_K, _SCALE = 5, 7, 3, 4, 2.75
_N_EXPERTS = _N_GROUP * _GROUP_SIZE


@dataclass(frozen=True)
class RouterVariant:
    """The structural choices of a router; everything numeric is a wildcard."""

    scoring_func: str            # "sigmoid" | "softmax"
    group_score: str | None      # "top2" (noaux_tc), "max" (group_limited_greedy), None: no grouping
    bias: bool                   # a correction bias is added to the scores for selection
    norm_topk_prob: bool

    @property
    def topk_method(self) -> str:
        if self.group_score == "top2" or (self.group_score is None and self.bias):
            return "noaux_tc"
        return "group_limited_greedy" if self.group_score == "max" else "greedy"

    @classmethod
    def of_config(cls, c) -> "RouterVariant":
        grouped = c.topk_method != "greedy" and (c.n_group or 1) > 1
        group_score = ("top2" if c.topk_method == "noaux_tc" else "max") if grouped else None
        return cls(c.scoring_func, group_score, c.topk_method == "noaux_tc", c.norm_topk_prob)


ALL_VARIANTS = tuple(RouterVariant(s, g, b, n) for n in (True, False) for s, g, b in (
    ("sigmoid", "top2", True), ("sigmoid", "max", False), ("softmax", "max", False),
    ("sigmoid", None, True), ("sigmoid", None, False), ("softmax", None, False)))


def router_pattern(x, gate_weight, correction_bias=None, *, v: RouterVariant):
    """TopkRouter.forward on float32 inputs, with the sentinel sizes (x: [N, H] -> [N, k] twice)."""
    logits = F.linear(x, gate_weight)                                           # [N, E]
    scores = logits.sigmoid() if v.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores + correction_bias if v.bias else scores
    if v.group_score is not None:
        grouped = choice.view(-1, _N_GROUP, _GROUP_SIZE)                        # [N, G, E/G]
        if v.group_score == "top2":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        best_groups = group_scores.topk(_TOPK_GROUP, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter(1, best_groups, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = choice.topk(_TOP_K, dim=-1).indices
    weights = scores.gather(1, ids)
    if v.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * _SCALE, ids


@functools.lru_cache(maxsize=None)
def _pattern(v: RouterVariant) -> Pattern:
    inputs = {"x": torch.randn(6, 16), "gate_weight": torch.randn(_N_EXPERTS, 16)}
    if v.bias:
        inputs["correction_bias"] = torch.randn(_N_EXPERTS)
    wildcards = {"top_k": _TOP_K, "scale": _SCALE}
    if v.group_score is not None:
        wildcards.update(n_group=_N_GROUP, group_size=_GROUP_SIZE, topk_group=_TOPK_GROUP, n_experts=_N_EXPERTS)
    return trace_pattern(f"router[{v}]", functools.partial(router_pattern, v=v), inputs, wildcards)


def _accept(v: RouterVariant, m: Match) -> bool:
    x, w = val(m.inputs["x"]), val(m.inputs["gate_weight"])
    if x is None or w is None or x.dim() != 2 or w.dim() != 2 or not same_shape(x.shape[1:], w.shape[1:]):
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return False   # the router computes in float32; other dtypes mean a different computation
    n_experts = w.shape[0]
    if v.bias:
        b = val(m.inputs["correction_bias"])
        if b is None or b.dtype != torch.float32 or not same_shape(b.shape, (n_experts,)):
            return False
    lit = m.literals
    if v.group_score is not None:
        if lit["n_group"] * lit["group_size"] != n_experts or lit["n_experts"] != n_experts:
            return False
        if not 1 <= lit["topk_group"] <= lit["n_group"]:
            return False
    return 1 <= lit["top_k"] <= n_experts and isinstance(lit["scale"], float)


def _build(v: RouterVariant, fake, graph, m: Match):
    lit = m.literals
    grouped = v.group_score is not None
    bias = strip_float_cast(m.inputs["correction_bias"]) if v.bias else None
    route = call_op(graph, fake, torch.ops.graphopt.moe_route.default, (
        strip_float_cast(m.inputs["x"]), strip_float_cast(m.inputs["gate_weight"]), bias, lit["top_k"],
        lit["n_group"] if grouped else 1, lit["topk_group"] if grouped else 1, v.topk_method, v.scoring_func,
        v.norm_topk_prob, lit["scale"]))
    return [getitem(graph, route, 0), getitem(graph, route, 1)]


class FuseMoeRoutingPass(GraphPass):
    name = "fuse_moe_routing"
    rtol = atol = 0.0   # the op runs the router's ATen ops in the same order

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        config = ctx.model_config
        if config is not None and getattr(config, "n_routed_experts", None) is None:
            return PassResult(gm, modified=False, notes=["the model has no routed experts"])
        variants = [RouterVariant.of_config(config)] if config is not None else ALL_VARIANTS
        ops = " ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        if "topk" not in ops:
            return PassResult(gm, modified=False)
        fake = fake_mode_of(gm)
        fused = 0
        for v in variants:
            if v.scoring_func not in ops:   # no sigmoid (softmax) at all: skip tracing that variant
                continue
            matches = find_matches(gm.graph, _pattern(v), functools.partial(_accept, v))
            fused += rewrite(gm, matches, functools.partial(_build, v, fake))
        if fused:
            gm.graph.lint()
        return PassResult(gm, modified=fused > 0, matches=fused)
