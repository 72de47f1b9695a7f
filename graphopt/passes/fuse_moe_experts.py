"""Fuse the dense routed-expert dispatch into one sparse `graphopt.moe_experts` node.

The reference model runs every token through every routed expert and weights the outputs by a
mostly-zero [N, E] routing matrix (a static graph for torch.export). `graphopt.moe_experts` runs each
expert only on the tokens routed to it: E / top_k times fewer expert FLOPs (and, at decode, weight
bytes read). Same result up to float summation order, hence the small verify tolerance.

Handles models.deepseek.Experts (the transformers 5 stacked layout gate_up_proj [E, 2I, H],
down_proj [E, H, I]):
    routing = zeros(N, E, float32).scatter(1, ids, weights)
    gate, up = matmul(x, gate_up.transpose(1, 2)).chunk(2, -1)
    y = matmul(silu(gate) * up, down.transpose(1, 2))        # or graphopt.swiglu(gate, up)
    out = einsum("enh,ne->nh", y.float(), routing).to(x.dtype)
  * any number of experts and intermediate size (read from the graph, checked against the weights);
  * float32 graphs and bf16 / fp16 graphs (the casts around the einsum are part of the pattern);
  * before or after fuse_swiglu.
Not matched: a routing matrix scattered into a non-zero tensor, a weighted sum over a different index
order, weights whose shapes do not fit [E, 2I, H] / [E, H, I].

Before (float32, `capture_main(random_model())` after the earlier normalise passes, layer 1; asserts elided):
    zeros: "f32[s18*s5, 8]" = torch.ops.aten.zeros.default([mul_197, 8], dtype = torch.float32, device = device(type='cpu'), pin_memory = False)
    scatter_1: "f32[s18*s5, 8]" = torch.ops.aten.scatter.src(zeros, 1, getitem_41, getitem_40);  zeros = getitem_41 = getitem_40 = None
    transpose: "f32[8, 64, 64]" = torch.ops.aten.transpose.int(model_model_layers_1_mlp_experts_gate_up_proj, 1, 2);  model_model_layers_1_mlp_experts_gate_up_proj = None
    matmul: "f32[8, s18*s5, 64]" = torch.ops.aten.matmul.default(view_16, transpose);  view_16 = transpose = None
    split = torch.ops.aten.split.Tensor(matmul, 32, -1);  matmul = None
    getitem_22: "f32[8, s18*s5, 32]" = split[0]
    getitem_23: "f32[8, s18*s5, 32]" = split[1];  split = None
    swiglu_default_1: "f32[8, s18*s5, 32]" = torch.ops.graphopt.swiglu.default(getitem_22, getitem_23);  getitem_22 = getitem_23 = None
    transpose_1: "f32[8, 32, 64]" = torch.ops.aten.transpose.int(model_model_layers_1_mlp_experts_down_proj, 1, 2);  model_model_layers_1_mlp_experts_down_proj = None
    matmul_1: "f32[8, s18*s5, 64]" = torch.ops.aten.matmul.default(swiglu_default_1, transpose_1);  swiglu_default_1 = transpose_1 = None
    einsum_6: "f32[s18*s5, 64]" = torch.ops.aten.einsum.default('enh,ne->nh', [matmul_1, scatter_1]);  matmul_1 = scatter_1 = None
    view_18: "f32[s5, s18, 64]" = torch.ops.aten.view.default(einsum_6, [sym_size_int_70, sym_size_int_67, 64]);  einsum_6 = None
After:
    moe_experts_default: "f32[s18*s5, 64]" = torch.ops.graphopt.moe_experts.default(view_16, getitem_40, getitem_41, model_model_layers_1_mlp_experts_gate_up_proj, model_model_layers_1_mlp_experts_down_proj);  view_16 = getitem_40 = getitem_41 = model_model_layers_1_mlp_experts_gate_up_proj = model_model_layers_1_mlp_experts_down_proj = None
    view_18: "f32[s5, s18, 64]" = torch.ops.aten.view.default(moe_experts_default, [sym_size_int_70, sym_size_int_67, 64]);  moe_experts_default = None
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..ops import core  # noqa: F401  registers torch.ops.graphopt.*
from .base import GraphPass, PassContext, PassResult
from .patterns import Match, Pattern, call_op, fake_mode_of, find_matches, rewrite, same_shape, trace_pattern, val

_N_EXPERTS, _N_INTER = 13, 11   # sentinels: wildcards for the expert count and intermediate size


def dense_experts_pattern(x, weights, ids, gate_up, down, *, fused_swiglu: bool):
    """Experts.forward: x [N, H], weights/ids [N, k], gate_up [E, 2I, H], down [E, H, I] -> [N, H]."""
    routing = torch.zeros(x.shape[0], _N_EXPERTS, dtype=torch.float32, device=x.device)
    routing = routing.scatter(1, ids, weights)                                   # [N, E]
    gate, up = torch.matmul(x, gate_up.transpose(1, 2)).chunk(2, dim=-1)         # [E, N, I] each
    act = torch.ops.graphopt.swiglu(gate, up) if fused_swiglu else F.silu(gate) * up
    y = torch.matmul(act, down.transpose(1, 2))                                  # [E, N, H]
    return torch.einsum("enh,ne->nh", y.float(), routing).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _pattern(dtype: torch.dtype, fused_swiglu: bool) -> Pattern:
    h, k = 16, 3
    inputs = {"x": torch.randn(6, h, dtype=dtype), "weights": torch.rand(6, k),
              "ids": torch.randint(0, _N_EXPERTS, (6, k)),
              "gate_up": torch.randn(_N_EXPERTS, 2 * _N_INTER, h, dtype=dtype),
              "down": torch.randn(_N_EXPERTS, h, _N_INTER, dtype=dtype)}
    return trace_pattern(f"dense_experts[{dtype}, swiglu={fused_swiglu}]",
                         functools.partial(dense_experts_pattern, fused_swiglu=fused_swiglu), inputs,
                         wildcards={"n_experts": _N_EXPERTS, "n_inter": _N_INTER},
                         dynamic=[True, True, True, False, False])


def _accept(dtype: torch.dtype, m: Match) -> bool:
    x, w, ids, gu, down = (val(m.inputs[k]) for k in ("x", "weights", "ids", "gate_up", "down"))
    if any(t is None for t in (x, w, ids, gu, down)) or x.dtype != dtype:
        return False
    if x.dim() != 2 or w.dim() != 2 or ids.dim() != 2 or gu.dim() != 3 or down.dim() != 3:
        return False
    e, i = m.literals["n_experts"], m.literals["n_inter"]
    return (w.dtype == torch.float32 and ids.dtype == torch.int64 and same_shape(w.shape, ids.shape)
            and same_shape(gu.shape, (e, 2 * i, x.shape[1])) and same_shape(down.shape, (e, x.shape[1], i))
            and gu.dtype == dtype and down.dtype == dtype)


class FuseMoeExpertsPass(GraphPass):
    name = "fuse_moe_experts"
    rtol, atol = 1e-4, 1e-5   # dense and sparse sum the weighted expert outputs in a different order

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        dtypes = {n.meta["val"].dtype for n in nodes if "matmul" in str(n.target) and "val" in n.meta}
        swiglu = [False] + ([True] if any(n.target is torch.ops.graphopt.swiglu.default for n in nodes) else [])
        fake = fake_mode_of(gm)
        fused = 0
        for dtype in sorted(dtypes, key=str):
            for fused_swiglu in swiglu:
                matches = find_matches(gm.graph, _pattern(dtype, fused_swiglu), functools.partial(_accept, dtype))
                fused += rewrite(gm, matches, lambda g, m: [call_op(
                    g, fake, torch.ops.graphopt.moe_experts.default,
                    tuple(m.inputs[k] for k in ("x", "weights", "ids", "gate_up", "down")))])
        if fused:
            gm.graph.lint()
        return PassResult(gm, modified=fused > 0, matches=fused)
