"""The graphopt:: ops as plain torch that torch.onnx's exporter can lower to standard ONNX ops.

Each entry of `DECOMPOSITIONS` computes what the op's reference computes (graphopt/ops), the same
numbers at the same rounding points, written without what ONNX cannot express:

    op                          what changes against the reference, and why
    rms_norm, swiglu, moe_route the reference itself (plain torch)
    mla_attention               both forms computed, the reference's choice (T <= absorb_max_tokens)
                                taken by `where`: T is dynamic in prefill and ONNX has no shape branch
                                at export time (an If node would need both subgraphs anyway)
    mla_paged_attention         the reference gather + the mla_attention above
    moe_experts                 gathered (`moe_experts_gathered`): the reference groups on the host
    quantized_moe_experts       gathered as well: each assignment picks its expert's quantised tensors,
                                then the same op sequence (`emit_linear`) as a batched [M, 1, K] linear
    quantize_*, int8_matmul,    the reference (round half to even is ONNX Round; the int8 matmul is a
    dequantize_*                float MatMul that is exact, as in the reference)
    sampling_probs              top-p bisection compares float values instead of float bit patterns
                                (no bitcast in onnxruntime), one_hot as a comparison with arange, the
                                bool `where` as and / or (onnxruntime has no bool Where kernel)
    greedy_accept               the reference's maths (`sampling.greedy_accept_maths`: its leading run of
                                accepted drafts is a min reduction, no scan)
    rejection_accept            the reference, one_hot as a comparison with arange (as in sampling_probs)
    sample_from_probs           the reference

`decomposition(op)` returns the entry for one op overload, or None when the op has none (the
export then fails and names it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import ops as _ops  # noqa: F401  registers torch.ops.graphopt.*
from ...ops import attention as _attn, core as _core, quant as _quant, sampling as _sampling
from ...ops.paged_attention import ABSORB_MAX_TOKENS
from ..inductor.kernels.moe import moe_experts_gathered

__all__ = ["DECOMPOSITIONS", "decomposition"]

G = torch.ops.graphopt


# -- attention --------------------------------------------------------------------------------------

def mla_attention(q_nope, q_pe, latent, k_pe, kv_b_weight, w_uk, w_uv, attn_mask, scale: float,
                  absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    T = q_nope.shape[1]
    absorbed = lambda: _attn.mla_attention_absorbed(q_nope, q_pe, latent, k_pe, w_uk, w_uv, attn_mask, scale)  # noqa: E731
    expanded = lambda: _attn.mla_attention_expanded(q_nope, q_pe, latent, k_pe, kv_b_weight, attn_mask, scale)  # noqa: E731
    if isinstance(T, int):                       # decode / verify graphs: 1 + k is static
        out = absorbed() if T <= absorb_max_tokens else expanded()
    else:                                        # prefill: the choice at run time
        small = torch.full((), T, dtype=torch.int64, device=q_nope.device) <= absorb_max_tokens
        out = torch.where(small, absorbed(), expanded())
    return out.to(q_nope.dtype).contiguous()


def mla_paged_attention(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight, w_uk, w_uv,
                        scale: float, absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    # the reference's gather ([B, S = M * bs, R + r]) and causal-by-position mask, then mla_attention
    R, r = w_uk.shape[2], q_pe.shape[3]
    context = kv_cache[block_tables].flatten(1, 2).to(q_nope.dtype)
    latent, k_pe = context.split([R, r], dim=-1)
    key_positions = torch.arange(context.shape[1], device=q_nope.device)
    visible = key_positions[None, None, None, :] <= positions[:, None, :, None]    # [B, 1, T, S]
    return mla_attention(q_nope, q_pe, latent, k_pe, kv_b_weight, w_uk, w_uv, visible, scale, absorb_max_tokens)


# -- experts ----------------------------------------------------------------------------------------

def quantized_moe_experts(x, weights, ids, gate_up, down, gate_up_scheme: str, down_scheme: str,
                          params: list[int]) -> Tensor:
    """x [N, H], weights / ids [N, k] -> [N, H]: every assignment a = n * k + j runs expert ids[n, j]
    on x[n] through the quantised op sequence, with that expert's tensors gathered ([M, ...])."""
    from ...ops.quant_linear import TENSOR_FIELDS, QuantizedLinear, emit_linear

    n_tokens, top_k = ids.shape
    flat = ids.reshape(-1)                                                       # [M]
    tokens = torch.arange(flat.numel(), device=x.device) // top_k               # [M]
    rows = x.index_select(0, tokens)[:, None, :]                                 # [M, 1, H]

    def linear(v, tensors, scheme, p):                                           # v [M, 1, K] -> [M, 1, out]
        t = {name: (w.index_select(0, flat) if w.dim() == 3 else w)
             for name, w in zip(TENSOR_FIELDS, tensors) if w is not None}
        if scheme == "bf16":
            return torch.matmul(v, t["weight"].transpose(-1, -2))
        return emit_linear(_call, v, QuantizedLinear(scheme, t, *p), t, v.dtype)

    gate, up = linear(rows, gate_up, gate_up_scheme, params[0:3]).chunk(2, dim=-1)
    y = linear(torch.nn.functional.silu(gate) * up, down, down_scheme, params[3:6])   # [M, 1, H]
    y = y[:, 0].float() * weights.reshape(-1, 1).float()
    return y.view(n_tokens, top_k, -1).sum(1).to(x.dtype)


# -- sampling ---------------------------------------------------------------------------------------

def _one_hot(index: Tensor, classes: int) -> Tensor:
    return (index[..., None] == torch.arange(classes, device=index.device)).float()


def _float_of_bits(bits: Tensor) -> Tensor:
    """int64 bit patterns in [0, 2^30] -> the float32 they encode, exactly (computed in float64):
    (mantissa + 2^23 [normal]) * 2^(max(exponent, 1) - 150), which also covers the subnormals."""
    exponent, mantissa = bits // (1 << 23), (bits % (1 << 23)).double()
    normal = (exponent > 0).double() * float(1 << 23)
    return ((mantissa + normal) * torch.pow(2.0, (exponent.clamp(min=1) - 150).double())).float()


def _nucleus_threshold(probs: Tensor, top_p: Tensor) -> Tensor:
    """The reference's bisection over float32 bit patterns, comparing float values (for p >= 0,
    bits(p) >= m iff p >= float(m)). hi starts above every probability (bits(1.0) < 2^30), which finds
    the same largest kept pattern as the reference's hi = bits(max) + 1 (ties to the best token
    are kept by sampling_probs either way)."""
    lo = torch.zeros_like(top_p, dtype=torch.int64)
    hi = torch.full_like(lo, 1 << 30)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        mass = torch.where(probs >= _float_of_bits(mid)[:, None], probs, torch.zeros_like(probs)).sum(dim=-1)
        ok = mass >= top_p
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return _float_of_bits(lo)[:, None]


def sampling_probs(logits, temperature, top_k, top_p, min_p, max_top_k: int = _sampling.DEFAULT_MAX_TOP_K):
    # the reference (ops/sampling.py) line for line but for the threshold and the one-hot
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    z = logits / t[:, None]                                                       # [N, V]
    probs = z.softmax(dim=-1)
    top_p = top_p.float()
    keep_k = _sampling._top_k_top_p(z, top_k, top_p, max_top_k)
    keep_full = (probs >= _nucleus_threshold(probs, top_p)) | (top_p[:, None] >= 1)
    by_k = (top_k > 0)[:, None]
    keep = (by_k & keep_k) | (~by_k & keep_full)                                  # a bool Where: not in onnxruntime
    pmax = probs.max(dim=-1, keepdim=True).values
    keep = (keep & (probs >= min_p.float()[:, None] * pmax)) | (probs == pmax)
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.where(greedy[:, None], _one_hot(logits.argmax(dim=-1), logits.shape[-1]), probs)


def rejection_accept(target_probs, draft_tokens, draft_probs, seed, start_pos):
    B, k1, V = target_probs.shape
    k = k1 - 1
    p = target_probs.float()
    pos = start_pos[:, None] + 1 + torch.arange(k1, device=p.device)[None, :]    # [B, 1+k]
    q = draft_probs.float() if draft_probs is not None else _one_hot(draft_tokens, V)
    px = p[:, :k].gather(2, draft_tokens[..., None]).squeeze(-1)                  # [B, k]
    qx = q.gather(2, draft_tokens[..., None]).squeeze(-1)
    u = _sampling.uniform(seed[:, None], pos[:, :k], _sampling.STREAM_ACCEPT)
    accepted = _sampling.leading_run(u * qx < px)
    residual = (p[:, :k] - q).clamp_min(0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:, :k])
    replacement = torch.cat([residual, p[:, k:]], dim=1)
    drawn = _sampling._race(replacement, seed[:, None].expand(B, k1), pos)
    last = drawn.gather(1, accepted[:, None]).squeeze(1)
    return _sampling._emitted(draft_tokens, accepted, last), accepted


# -- the table ---------------------------------------------------------------------------------------

def _reference(op):
    return op._init_fn if hasattr(op, "_init_fn") else op


DECOMPOSITIONS = {
    G.rms_norm.default: _reference(_core.rms_norm),
    G.swiglu.default: _reference(_core.swiglu),
    G.moe_route.default: _reference(_core.moe_route),
    G.moe_experts.default: moe_experts_gathered,
    G.mla_attention.default: mla_attention,
    G.mla_paged_attention.default: mla_paged_attention,
    G.quantized_moe_experts.default: quantized_moe_experts,
    G.sampling_probs.default: sampling_probs,
    G.sample_from_probs.default: _reference(_sampling.sample_from_probs),
    G.greedy_accept.default: _sampling.greedy_accept_maths,
    G.rejection_accept.default: rejection_accept,
}
# the quantised-linear ops: their references are plain torch (graphopt/ops/quant.py)
for _name in ("quantize_per_token", "quantize_per_tensor", "int8_matmul", "dequantize_int32", "dequantize_weight",
              "dequantize_int4", "dequantize_int2", "dequantize_kv", "quantize_kv", "hadamard_transform",
              "dequantize_lut", "dequantize_lut4"):
    if hasattr(G, _name):
        DECOMPOSITIONS[getattr(G, _name).default] = _reference(getattr(_quant, _name))


def decomposition(op):
    """The ONNX-friendly torch function for graphopt op overload `op`, or None."""
    return DECOMPOSITIONS.get(op)


def _call(op, *args):
    """emit_linear's `call` inside quantized_moe_experts: graphopt ops through their decompositions."""
    return DECOMPOSITIONS.get(op, op)(*args)
