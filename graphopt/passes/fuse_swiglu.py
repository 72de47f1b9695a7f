"""Fuse `silu(gate) * up` into one `graphopt.swiglu(gate, up)` node.

Handles the gated activation of every DeepSeek MLP: the dense MLPs of the first layers, the shared
experts and the stacked routed experts ([E, N, I] operands), in any dtype, with the product written
either way round (`silu(a) * b` or `b * silu(a)`).
Not matched: a silu whose result is used elsewhere too (it would have to be computed twice), a silu
not multiplied (`silu(a) + b`), operands of different shapes (a broadcasting multiply) or dtypes.

Before (from `capture_main(random_model())`, the dense MLP of layer 0):
    linear_5: "f32[s5, s18, 96]" = torch.ops.aten.linear.default(rms_norm_default_3, model_model_layers_0_mlp_gate_proj_weight);  model_model_layers_0_mlp_gate_proj_weight = None
    silu: "f32[s5, s18, 96]" = torch.ops.aten.silu.default(linear_5);  linear_5 = None
    linear_6: "f32[s5, s18, 96]" = torch.ops.aten.linear.default(rms_norm_default_3, model_model_layers_0_mlp_up_proj_weight);  rms_norm_default_3 = model_model_layers_0_mlp_up_proj_weight = None
    mul_357: "f32[s5, s18, 96]" = torch.ops.aten.mul.Tensor(silu, linear_6);  silu = linear_6 = None
After:
    linear_5: "f32[s5, s18, 96]" = torch.ops.aten.linear.default(rms_norm_default_3, model_model_layers_0_mlp_gate_proj_weight);  model_model_layers_0_mlp_gate_proj_weight = None
    linear_6: "f32[s5, s18, 96]" = torch.ops.aten.linear.default(rms_norm_default_3, model_model_layers_0_mlp_up_proj_weight);  rms_norm_default_3 = model_model_layers_0_mlp_up_proj_weight = None
    swiglu_default: "f32[s5, s18, 96]" = torch.ops.graphopt.swiglu.default(linear_5, linear_6);  linear_5 = linear_6 = None
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..ops import core  # noqa: F401  registers torch.ops.graphopt.*
from .base import GraphPass, PassContext, PassResult
from .patterns import Match, Pattern, call_op, fake_mode_of, find_matches, rewrite, same_shape, trace_pattern, val


def silu_times_up(gate, up):
    return F.silu(gate) * up


def up_times_silu(gate, up):
    return up * F.silu(gate)


@functools.lru_cache(maxsize=None)
def _patterns() -> tuple[Pattern, ...]:
    example = {"gate": torch.randn(6, 16), "up": torch.randn(6, 16)}
    return (trace_pattern("silu(gate) * up", silu_times_up, example, dynamic=[True, True]),
            trace_pattern("up * silu(gate)", up_times_silu, example, dynamic=[True, True]))


def _accept(m: Match) -> bool:
    gate, up = val(m.inputs["gate"]), val(m.inputs["up"])
    return (gate is not None and up is not None and gate.dtype == up.dtype
            and same_shape(gate.shape, up.shape))


class FuseSwigluPass(GraphPass):
    name = "fuse_swiglu"
    rtol = atol = 0.0   # the op computes silu(gate) * up with the same ATen ops

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        fake = fake_mode_of(gm)
        fused = 0
        for pattern in _patterns():
            fused += rewrite(gm, find_matches(gm.graph, pattern, _accept), lambda g, m: [call_op(
                g, fake, torch.ops.graphopt.swiglu.default, (m.inputs["gate"], m.inputs["up"]))])
        if fused:
            gm.graph.lint()
        return PassResult(gm, modified=fused > 0, matches=fused)
