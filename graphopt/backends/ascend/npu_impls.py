"""graphopt ops written as torch_npu calls: what `lowering.for_ascend(gm, npu=True)` puts in the graph.

Each function takes the graphopt op's own arguments (graphopt/ops is the definition) and returns what
the op returns, through the fused torch_npu kernels named in `plan.ASCEND_OPS`. Where a kernel's
documented constraints are not met (shapes, dtypes, router kind) the function falls back to the op's
reference, so the meaning never changes. torch_npu is imported inside each call: this module imports
on any machine. NOT EXECUTED: no NPU or CANN toolkit is available to the project; the calls follow
the signatures of the torch_npu API reference (docs/backends.md lists each one as not run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops import core, paged_attention
from ...ops.attention import ABSORB_MAX_TOKENS

__all__ = ["FUSED", "IMPLS"]


def _npu():
    import torch_npu   # noqa: PLC0415  the NPU runtime; only present on an Ascend machine
    return torch_npu


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _npu().npu_rms_norm(x, weight, epsilon=eps)[0]


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    # npu_swiglu activates the first half of the last dim and multiplies by the second
    return _npu().npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)


def moe_route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
              norm_topk_prob, routed_scaling_factor, prune_threshold=0.0):
    weights, ids = _gating_top_k(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method,
                                 scoring_func, norm_topk_prob, routed_scaling_factor)
    # expert pruning (decode steps): the reference's rule on the kernel's weights
    return (core.prune_routing(weights, prune_threshold) if prune_threshold > 0 else weights), ids


def _gating_top_k(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                  norm_topk_prob, routed_scaling_factor):
    eligible = (topk_method == "noaux_tc" and scoring_func == "sigmoid" and norm_topk_prob
                and correction_bias is not None and gate_weight.shape[0] == 256 and topk_group == 4)
    if not eligible:          # the kernel's documented limits on Atlas A2/A3
        return core.route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method,
                          scoring_func, norm_topk_prob, routed_scaling_factor)
    logits = F.linear(x.float(), gate_weight.float())
    weights, ids, _ = _npu().npu_moe_gating_top_k(
        logits, k=top_k, bias=correction_bias.float(), k_group=topk_group, group_count=n_group,
        group_select_mode=1, renorm=0, norm_type=1, out_flag=False,
        routed_scaling_factor=routed_scaling_factor, eps=1e-20)
    return weights.float(), ids.long()


def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    npu = _npu()
    N, k = ids.shape
    E = gate_up.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)                                   # assignments by expert
    tokens = order // k
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    kw = dict(group_list=counts, group_list_type=1, group_type=0, split_item=2)
    gu = npu.npu_grouped_matmul([x[tokens]], [gate_up.transpose(1, 2)], **kw)[0]          # [N*k, 2I]
    y = npu.npu_grouped_matmul([npu.npu_swiglu(gu, dim=-1)], [down.transpose(1, 2)], **kw)[0]  # [N*k, H]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, y.float() * weights.reshape(-1)[order, None].float())
    return out.to(x.dtype)


def mla_paged_attention(q_nope, q_pe, kv_cache, block_tables, positions, kv_b_weight, w_uk, w_uv, scale,
                        absorb_max_tokens: int = ABSORB_MAX_TOKENS):
    B, T, H, _ = q_nope.shape
    if T > absorb_max_tokens:   # prefill chunks: the reference (expanded) form
        return paged_attention.mla_paged_attention_reference(q_nope, q_pe, kv_cache, block_tables, positions,
                                                             kv_b_weight, w_uk, w_uv, scale, absorb_max_tokens)
    R, bs = w_uk.shape[2], kv_cache.shape[1]
    q_lat = torch.einsum("bthd,hdr->bhtr", q_nope, w_uk)                       # [B, H, T, R]
    latent = kv_cache[..., :R].unsqueeze(1)                                   # [N, 1 head, bs, R]
    k_rope = kv_cache[..., R:].unsqueeze(1)                                   # [N, 1, bs, r]
    seq_lens = positions.max(dim=1).values + 1                                # keys each row sees
    causal = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=q_nope.device), diagonal=1)
    out, _ = _npu().npu_fused_infer_attention_score(
        q_lat, latent, latent, query_rope=q_pe.permute(0, 2, 1, 3), key_rope=k_rope, num_heads=H,
        num_key_value_heads=1, input_layout="BNSD", scale=scale, block_table=block_tables.int(), block_size=bs,
        actual_seq_lengths_kv=seq_lens.int(), atten_mask=causal if T > 1 else None, sparse_mode=3 if T > 1 else 0)
    return torch.einsum("bhtr,hvr->bthv", out, w_uv).to(q_nope.dtype).contiguous()


def kv_cache_write(cache: Tensor, slots: Tensor, entry: Tensor) -> None:
    D = cache.shape[-1]
    _npu().npu_scatter_nd_update_(cache.view(-1, D), slots.reshape(-1, 1), entry.reshape(-1, D).to(cache.dtype))


def quantize_per_token(x: Tensor, smooth_inv, qmax: int):
    if qmax != 127:
        from ...ops.quant import quantize_per_token as reference
        return reference(x, smooth_inv, qmax)
    q, s = _npu().npu_dynamic_quant(x, smooth_scales=smooth_inv)
    return q, s.float().unsqueeze(-1)


def quant_linear(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, bias, out_dtype) -> Tensor:
    """int8_matmul + dequantize_int32 as one npu_quant_matmul (per-token x per-channel scales)."""
    lead = x_q.shape[:-1]
    y = _npu().npu_quant_matmul(x_q.reshape(-1, x_q.shape[-1]), w_q.transpose(-1, -2), w_scale.reshape(-1).float(),
                                pertoken_scale=x_scale.reshape(-1).float(), bias=None, output_dtype=out_dtype)
    y = y.reshape(*lead, -1)
    return y if bias is None else (y.float() + bias.float()).to(out_dtype)


def weight_quant_linear(x: Tensor, w_q: Tensor, scale: Tensor, zero, out_dtype, bias=None) -> Tensor:
    """dequantize_weight + linear as one npu_weight_quant_batchmatmul ((w + offset) * scale per group)."""
    groups, K = scale.shape[-1], w_q.shape[-1]
    offset = None if zero is None else (-zero).t().to(x.dtype)
    y = _npu().npu_weight_quant_batchmatmul(x, w_q.t(), scale.t().to(x.dtype), antiquant_offset=offset,
                                            antiquant_group_size=0 if groups == 1 else K // groups)
    return (y if bias is None else y + bias).to(out_dtype)


# graphopt op overload name -> its torch_npu implementation (plan.ASCEND_OPS routes "torch_npu")
IMPLS = {
    "graphopt.rms_norm.default": rms_norm,
    "graphopt.swiglu.default": swiglu,
    "graphopt.moe_route.default": moe_route,
    "graphopt.moe_experts.default": moe_experts,
    "graphopt.mla_paged_attention.default": mla_paged_attention,
    "graphopt.kv_cache_write.default": kv_cache_write,
    "graphopt.quantize_per_token.default": quantize_per_token,
}
# pairs lowered as one kernel: (producer, consumer) -> implementation (lowering.py matches them)
FUSED = {
    ("graphopt.int8_matmul.default", "graphopt.dequantize_int32.default"): quant_linear,
    ("graphopt.dequantize_weight.default", "aten.linear.default"): weight_quant_linear,
}
