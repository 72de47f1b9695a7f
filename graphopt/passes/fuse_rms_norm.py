"""Fuse RMSNorm subgraphs into one `graphopt.rms_norm(x, weight, eps)` node.

Handles the norm as the reference model, HF DeepSeek and most Llama-style code write it:
    weight * (x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
  * any epsilon (read from the matched `add`), any hidden size, any leading dimensions;
  * float32 graphs (the casts vanish at capture) and bf16 / fp16 graphs (a `_to_copy` to float32
    before the statistics and one back to x.dtype before the weight multiply).
Not matched: a mean over another dimension, a norm without the trailing weight multiply, a weight
that is not one value per channel ([hidden]), an epsilon added outside the rsqrt.

Before (float32, from `capture_main(random_model())`, layer 0's input norm; capture's dtype asserts elided):
    pow_1: "f32[s5, s18, 64]" = torch.ops.aten.pow.Tensor_Scalar(embedding, 2)
    mean: "f32[s5, s18, 1]" = torch.ops.aten.mean.dim(pow_1, [-1], True);  pow_1 = None
    add_40: "f32[s5, s18, 1]" = torch.ops.aten.add.Tensor(mean, 1e-06);  mean = None
    rsqrt: "f32[s5, s18, 1]" = torch.ops.aten.rsqrt.default(add_40);  add_40 = None
    mul_42: "f32[s5, s18, 64]" = torch.ops.aten.mul.Tensor(embedding, rsqrt);  rsqrt = None
    mul_46: "f32[s5, s18, 64]" = torch.ops.aten.mul.Tensor(model_model_layers_0_input_layernorm_weight, mul_42);  model_model_layers_0_input_layernorm_weight = mul_42 = None
After:
    rms_norm_default: "f32[s5, s18, 64]" = torch.ops.graphopt.rms_norm.default(embedding, model_model_layers_0_input_layernorm_weight, 1e-06);  model_model_layers_0_input_layernorm_weight = None
"""

from __future__ import annotations

import functools

import torch

from ..ops import core  # noqa: F401  registers torch.ops.graphopt.*
from .base import GraphPass, PassContext, PassResult
from .patterns import Match, Pattern, call_op, fake_mode_of, find_matches, float_dtypes, rewrite, same_shape, \
    trace_pattern, val

_EPS = 1.2345e-3   # sentinel epsilon: the traced pattern matches any epsilon and reports it


def rms_norm_pattern(x, weight, eps):
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@functools.lru_cache(maxsize=None)
def _pattern(dtype: torch.dtype) -> Pattern:
    """The norm traced for an x of `dtype` (the casts it contains depend on it)."""
    return trace_pattern(f"rms_norm[{dtype}]", functools.partial(rms_norm_pattern, eps=_EPS),
                         {"x": torch.randn(6, 16, dtype=dtype), "weight": torch.ones(16, dtype=dtype)},
                         wildcards={"eps": _EPS})


def _accept(dtype: torch.dtype, m: Match) -> bool:
    x, w = val(m.inputs["x"]), val(m.inputs["weight"])
    return (x is not None and w is not None and x.dtype == dtype and x.dim() >= 1 and w.dim() == 1
            and same_shape(w.shape, x.shape[-1:]) and isinstance(m.literals.get("eps"), float))


class FuseRmsNormPass(GraphPass):
    name = "fuse_rms_norm"
    rtol = atol = 0.0   # the op runs the same ATen ops in the same order

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        fake = fake_mode_of(gm)
        fused = 0
        for dtype in float_dtypes(gm):
            matches = find_matches(gm.graph, _pattern(dtype), functools.partial(_accept, dtype))
            fused += rewrite(gm, matches, lambda g, m: [call_op(
                g, fake, torch.ops.graphopt.rms_norm.default,
                (m.inputs["x"], m.inputs["weight"], m.literals["eps"]))])
        if fused:
            gm.graph.lint()
        return PassResult(gm, modified=fused > 0, matches=fused)
