"""The modules that put a quantised linear into a reference model (`QuantLinear`, `QuantExperts`,
`QuantLatentNorm`) and the argument list of graphopt::quantized_moe_experts (`moe_op_args`).

The quantised linear itself (`QuantizedLinear`, its op sequence `emit_linear`, `sparse_moe`) is in
`graphopt/ops/quant_linear.py`, re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphopt.ops import quant as _ops  # noqa: F401  registers torch.ops.graphopt.*
from graphopt.ops.quant_linear import TENSOR_FIELDS, QuantizedLinear, eager_call, emit_linear, sparse_moe

OPS = torch.ops.graphopt

__all__ = ["QuantizedLinear", "emit_linear", "QuantLinear", "QuantExperts", "QuantLatentNorm", "eager_call",
           "TENSOR_FIELDS", "sparse_moe", "moe_op_args"]


class _Holder(nn.Module):
    """Registers a QuantizedLinear's tensors as buffers, so .to(), state_dict and export see them."""

    def __init__(self, q: QuantizedLinear):
        super().__init__()
        self.q = q
        for name, tensor in q.tensors.items():
            self.register_buffer(name, tensor)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.q.tensors}

    def forward(self, x: Tensor) -> Tensor:
        return emit_linear(eager_call, x, self.q, self.tensors(), x.dtype)


class QuantLinear(_Holder):
    """Drop-in for nn.Linear [out, K]."""

    def extra_repr(self) -> str:
        out, k = self.q.shape[-2:]
        return f"{self.q.scheme}, in_features={k}, out_features={out}"


def moe_op_args(gate_up: QuantizedLinear, down: QuantizedLinear, t_gate_up: dict, t_down: dict) -> tuple:
    """(gate_up list, down list, gate_up scheme, down scheme, params) for graphopt::quantized_moe_experts; t_* map
    TENSOR_FIELDS to tensors (eager) or get_attr nodes (FX)."""
    lists = tuple([t.get(k) for k in TENSOR_FIELDS] for t in (t_gate_up, t_down))
    params = [v for q in (gate_up, down) for v in (q.rotate_block, q.act_block, q.input_zero)]
    return (*lists, gate_up.scheme, down.scheme, params)


class QuantExperts(nn.Module):
    """Drop-in for deepseek.Experts with either stacked matmul quantised (None: keep it in float).

    Eager runs call graphopt::quantized_moe_experts (sparse, like graphopt::moe_experts: each expert on
    its routed tokens); under torch.export the dense dispatch of the reference model is kept, with
    the quantised op sequence in place of each stacked matmul.
    """

    def __init__(self, experts: nn.Module, gate_up: QuantizedLinear | None, down: QuantizedLinear | None):
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.gate_up = _Holder(gate_up) if gate_up else None
        self.down = _Holder(down) if down else None
        if gate_up is None:
            self.gate_up_proj = experts.gate_up_proj
        if down is None:
            self.down_proj = experts.down_proj

    def _part(self, part: str) -> tuple[QuantizedLinear, dict[str, Tensor]]:
        holder = getattr(self, part)
        if holder is None:
            w = getattr(self, f"{part}_proj")
            return QuantizedLinear("bf16", {"weight": w}), {"weight": w}
        return holder.q, holder.tensors()

    def forward(self, x, weights, ids):
        # x: [N, H]; weights/ids: [N, k] -> [N, H]
        if torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)():
            return self._dense(x, weights, ids)
        (gu, t_gu), (dn, t_dn) = self._part("gate_up"), self._part("down")
        return OPS.quantized_moe_experts(x, weights, ids, *moe_op_args(gu, dn, t_gu, t_dn))

    def _matmul(self, part: str, x: Tensor) -> Tensor:
        holder = getattr(self, part)
        if holder is None:
            return torch.matmul(x, getattr(self, f"{part}_proj").transpose(1, 2))
        return holder(x)

    def _dense(self, x, weights, ids):
        routing = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32, device=x.device)
        routing = routing.scatter(1, ids, weights)                                 # [N, E]
        gate, up = self._matmul("gate_up", x).chunk(2, dim=-1)                    # [E, N, I] each
        y = self._matmul("down", F.silu(gate) * up)                               # [E, N, H]
        return torch.einsum("enh,ne->nh", y.float(), routing).to(x.dtype)


class QuantLatentNorm(nn.Module):
    """C8: wraps self_attn.kv_a_layernorm so the latent is what an int8 cache gives back.

    The 512-d normalised latent is quantised with static per-channel scales [R] (calibrated abs-max);
    the 64-d roped key stays in 16 bit (as in DeepSeek's FlashMLA fp8 cache: few bytes, rotary
    precision matters). Every key, cached or current, is read through this round trip.
    """

    def __init__(self, norm: nn.Module, scale: Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("kv_scale", scale.float())

    def forward(self, x: Tensor) -> Tensor:
        latent = self.norm(x)
        q = OPS.quantize_kv(latent, self.kv_scale)
        return OPS.dequantize_kv(q, self.kv_scale, latent.dtype)
