"""A quantised linear as data (`QuantizedLinear`) and as its op sequence (`emit_linear`), plus the
reference of the routed-expert op (`sparse_moe`).

`emit_linear` is written once against a `call(op, *args)` function, so the same sequence runs eagerly
(call = apply: `eager_call`) in the quantised reference modules of `graphopt/quant/qlinear.py` and
is written as FX nodes by passes/quant_insert.py (call = graph.call_function): the model-level
accuracy numbers and the compiled graph compute the same thing. It lives in `ops` because
graphopt::quantized_moe_experts' reference runs it.

    w8a8:    x_q, x_s = quantize_per_token(x, smooth_inv, 127); acc = int8_matmul(x_q, w)
             y = dequantize_int32(acc, x_s, scale, bias, dtype)
    w4a8:    as w8a8 with acc = w4a8_matmul(x_q, w, group_scale)
    static:  x_q = quantize_per_tensor(x, input_scale, input_zero, smooth_inv, -128, 127); x_s = input_scale
    a16:     w = dequantize_weight(w, scale, zero, dtype); y = linear(x * smooth_inv, w, bias)
             (w4a16 / w2a16: w = dequantize_int4 / dequantize_int2(w_packed, scale, zero, dtype), the
             weight two int4 / four int2 a byte)
             (hif8: w = dequantize_lut(w, codebook, scale, dtype), codes into a value table; nf4:
             dequantize_lut4, its codes two a byte)
    fp8:     x_q, x_s = quantize_fp8(x, smooth_inv, act_block); y = fp8_linear(x_q, x_s, w, scale, bias, dtype)
    hadamard rotation (optional) first: x = hadamard_transform(x, rotate_block).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import quant as _quant  # noqa: F401  registers torch.ops.graphopt.* (quantize, int8_matmul, ...)
from .quant_schemes import SCHEMES

__all__ = ["QuantizedLinear", "TENSOR_FIELDS", "eager_call", "emit_linear", "moe_linears", "sparse_moe"]

OPS = torch.ops.graphopt
TENSOR_FIELDS = ("weight", "scale", "group_scale", "zero", "smooth_inv", "input_scale", "bias", "codebook")


@dataclass
class QuantizedLinear:
    """Everything one quantised linear (or stacked expert matmul) needs at run time.

    tensors: weight (int8 / uint8 HQQ-8 / e4m3 / uint8 hif8 codes) [..., out, K], or packed uint8
    [..., out, K / n] (graphopt/ops/packing.py: int4 of w4a8 / w4a16 and NF4 codes two a byte, int2 of
    w2a16 four); scale
    fp32; optional group_scale (w4a8, int8), zero (HQQ, w2a16: fp32), smooth_inv ([K] or [E, 1, K]:
    inputs are multiplied by it), input_scale (static activations), bias, codebook (hif8, nf4: the
    float32 value of each code, [L]). meta: what the algorithms chose (alpha, beta, ...).
    """

    scheme: str
    tensors: dict[str, Tensor]
    rotate_block: int = 0
    act_block: int = 0          # fp8_block: activation scale every act_block channels
    input_zero: int = 0         # static activations (msModelSlim W8A8 imports can carry an offset)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stacked(self) -> bool:
        return self.tensors["weight"].dim() == 3

    @property
    def packed(self) -> bool:
        """The weight holds several values a byte (int4 / nf4: two, int2: four; last dimension K / n)."""
        return SCHEMES[self.scheme].per_byte > 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical weight shape [..., out, K], whatever the storage."""
        w = self.tensors["weight"]
        return (*w.shape[:-1], w.shape[-1] * SCHEMES[self.scheme].per_byte)

    def expert(self, e: int, tensors: dict[str, Tensor] | None = None) -> tuple["QuantizedLinear", dict[str, Tensor]]:
        """Expert e of a stacked linear: 3-d tensors ([E, ...]) indexed, shared ones ([K], 0-d) kept."""
        tensors = {k: (t[e] if t.dim() == 3 else t) for k, t in (tensors or self.tensors).items()}
        return QuantizedLinear(self.scheme, tensors, self.rotate_block, self.act_block, self.input_zero,
                               self.meta), tensors

    def spec(self) -> dict[str, Any]:
        """The non-tensor part, JSON-friendly (saved next to the tensors)."""
        return {"scheme": self.scheme, "rotate_block": self.rotate_block, "act_block": self.act_block,
                "input_zero": self.input_zero, "meta": self.meta, "shape": list(self.shape)}


def eager_call(op: Callable, *args):
    return op(*args)


def emit_linear(call: Callable, x, q: QuantizedLinear, t: dict[str, Any], out_dtype: torch.dtype):
    """y = x @ W^T (+ bias) through the quantised op sequence. `t` maps TENSOR_FIELDS to tensors
    (eager) or get_attr nodes (FX); x is [..., K] (linear) or broadcastable against [E, out, K]."""
    s = SCHEMES[q.scheme]
    smooth, bias = t.get("smooth_inv"), t.get("bias")
    if q.rotate_block:
        x = call(OPS.hadamard_transform.default, x, q.rotate_block)
    if s.activation == "none":
        if smooth is not None:
            x = call(torch.ops.aten.mul.Tensor, x, smooth)
        if s.codebook:                                     # nf4: codes packed two a byte
            lut = OPS.dequantize_lut4 if s.per_byte == 2 else OPS.dequantize_lut
            w = call(lut.default, t["weight"], t["codebook"], t["scale"], out_dtype)
        elif s.per_byte > 1:                               # int4 / int2: packed, unpacked inside
            packed = OPS.dequantize_int4 if s.per_byte == 2 else OPS.dequantize_int2
            w = call(packed.default, t["weight"], t["scale"], t.get("zero"), out_dtype)
        else:
            w = call(OPS.dequantize_weight.default, t["weight"], t["scale"], t.get("zero"), out_dtype)
        if q.stacked:
            y = call(torch.ops.aten.matmul.default, x, call(torch.ops.aten.transpose.int, w, -1, -2))
            return y if bias is None else call(torch.ops.aten.add.Tensor, y, bias)
        return call(torch.ops.aten.linear.default, x, w, bias)
    if s.activation == "fp8_dynamic":
        pair = call(OPS.quantize_fp8.default, x, smooth, q.act_block)
        x_q, x_s = call(operator.getitem, pair, 0), call(operator.getitem, pair, 1)
        return call(OPS.fp8_linear.default, x_q, x_s, t["weight"], t["scale"], bias, out_dtype)
    if s.activation == "int8_static":
        x_s = t["input_scale"]
        x_q = call(OPS.quantize_per_tensor.default, x, x_s, q.input_zero, smooth, -128, 127)
    else:
        pair = call(OPS.quantize_per_token.default, x, smooth, 127)
        x_q, x_s = call(operator.getitem, pair, 0), call(operator.getitem, pair, 1)
    if "group_scale" in t:
        acc = call(OPS.w4a8_matmul.default, x_q, t["weight"], t["group_scale"])
    else:
        acc = call(OPS.int8_matmul.default, x_q, t["weight"])
    return call(OPS.dequantize_int32.default, acc, x_s, t["scale"], bias, out_dtype)


def moe_linears(gate_up: list, down: list, gate_up_scheme: str, down_scheme: str,
                params: list[int]) -> tuple[QuantizedLinear, QuantizedLinear]:
    """graphopt::quantized_moe_experts' arguments (tensors in TENSOR_FIELDS order, params
    [rotate_block, act_block, input_zero] of each) as its two stacked linears."""
    parts = []
    for i, (tensors, scheme) in enumerate(((gate_up, gate_up_scheme), (down, down_scheme))):
        t = {k: v for k, v in zip(TENSOR_FIELDS, tensors) if v is not None}
        parts.append(QuantizedLinear(scheme, t, *params[3 * i: 3 * i + 3]))
    return parts[0], parts[1]


def _expert_matmul(q: QuantizedLinear, x: Tensor, e: int) -> Tensor:
    """x [c, K] through expert e of a stacked (quantised or "bf16") matmul -> [c, out]."""
    if q.scheme == "bf16":
        return torch.matmul(x, q.tensors["weight"][e].t())
    qe, tensors = q.expert(e)
    return emit_linear(eager_call, x, qe, tensors, x.dtype)


def sparse_moe(x: Tensor, weights: Tensor, ids: Tensor, gate_up: QuantizedLinear, down: QuantizedLinear) -> Tensor:
    """Routed experts, each on its routed tokens only: x [N, H], weights / ids [N, k] -> [N, H].

    The reference of graphopt::quantized_moe_experts. Every quantiser is row-wise (per token, or a fixed
    static scale), so a token's result does not depend on which others share the batch: this equals
    the dense dispatch up to float summation order, at top_k / E of the expert work.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)             # [N, H]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.tensors["weight"].shape[0]).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        picked = order[start:start + count]                                      # [c] of N * k
        start += count
        tokens = picked // ids.shape[1]
        gate, up = _expert_matmul(gate_up, x[tokens], e).chunk(2, dim=-1)         # [c, I] each
        y = _expert_matmul(down, F.silu(gate) * up, e)                            # [c, H]
        out.index_add_(0, tokens, y.float() * weights.reshape(-1)[picked, None].float())
    return out.to(x.dtype)


