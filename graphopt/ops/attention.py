"""graphopt::mla_attention: multi-head latent attention over latent keys, in its two equivalent forms.

The op receives MLA *before* kv_b_proj expands the latent, plus both forms of that weight, and picks
the cheaper computation from the number of query tokens T when it runs:

    expanded  (T > absorb_max_tokens, prefill)   k_nope, v = split(latent @ W_kvb^T)      per head
              scores = q_nope . k_nope + q_pe . k_pe       out = probs @ v
              cost ~ S * R * H * (dn + dv): every cached token is expanded, then attended densely.
    absorbed  (T <= absorb_max_tokens, decode / 1+k speculative queries)
              q_lat = q_nope @ W_UK  (an R-dim query per head)   scores = q_lat . latent + q_pe . k_pe
              out = (probs @ latent) @ W_UV^T
              cost ~ T * H * R * (dn + dv) for the two small matmuls plus attention over the R-dim
              latents shared by all heads (MQA-like): nothing of size S is expanded.

Both forms compute the same numbers up to floating-point reassociation (the tests compare them in
float32 against a float64 reference). Shapes (B batch, T queries, S keys, H heads, R kv_lora_rank,
dn qk_nope_head_dim, r qk_rope_head_dim, dv v_head_dim):

    q_nope [B, T, H, dn]   q_pe [B, T, H, r]   latent [B, S, R]   k_pe [B, S, r]
    kv_b_weight [H * (dn + dv), R]   (kv_b_proj.weight: per head, dn rows of W_UK then dv rows of W_UV)
    w_uk [H, dn, R]   w_uv [H, dv, R]  (the same numbers, split per head; views are fine)
    attn_mask: None, bool (True = may attend) or float (added to the scores), broadcastable to
               [B, H, T, S] (e.g. [B, 1, T, S] or [T, S]); for 1+k speculative queries it holds the
               causal mask inside the block
    -> out [B, T, H, dv] in q_nope's dtype

Numerics follow graphopt's reference attention (`models/deepseek.py`, MLAttention): scores are formed
in the input dtype and scaled, then masked and soft-maxed in float32; probabilities are cast back to
the input dtype before the value product.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["ABSORB_MAX_TOKENS", "mla_attention", "mla_attention_absorbed", "mla_attention_expanded"]

# Query lengths up to this use the absorbed form: decode (T = 1) and speculative verification
# (T = 1 + k, k <= 7). Longer queries (prefill chunks) are compute-bound and keep the expanded form.
ABSORB_MAX_TOKENS = 8


def _require(cond, message: str) -> None:
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: message)
    elif not cond:
        raise ValueError(message)


def _check(q_nope: Tensor, q_pe: Tensor, latent: Tensor, k_pe: Tensor, kv_b_weight: Tensor,
           w_uk: Tensor, w_uv: Tensor, attn_mask: Optional[Tensor]) -> None:
    op = "graphopt.mla_attention"
    _require(q_nope.dim() == 4, f"{op}: q_nope must be [B, T, H, dn], got shape {tuple(q_nope.shape)}")
    _require(q_pe.dim() == 4, f"{op}: q_pe must be [B, T, H, r], got shape {tuple(q_pe.shape)}")
    _require(latent.dim() == 3, f"{op}: latent must be [B, S, R], got shape {tuple(latent.shape)}")
    _require(k_pe.dim() == 3, f"{op}: k_pe must be [B, S, r], got shape {tuple(k_pe.shape)}")
    H, dn, R = q_nope.shape[2], q_nope.shape[3], latent.shape[2]
    _require(w_uk.dim() == 3 and w_uk.shape[0] == H and w_uk.shape[1] == dn and w_uk.shape[2] == R,
             f"{op}: w_uk must be [H, dn, R] = [{H}, {dn}, {R}], got {tuple(w_uk.shape)}")
    _require(w_uv.dim() == 3 and w_uv.shape[0] == H and w_uv.shape[2] == R,
             f"{op}: w_uv must be [H, dv, R] = [{H}, dv, {R}], got {tuple(w_uv.shape)}")
    dv = w_uv.shape[1]
    _require(kv_b_weight.dim() == 2 and kv_b_weight.shape[0] == H * (dn + dv) and kv_b_weight.shape[1] == R,
             f"{op}: kv_b_weight must be [H * (dn + dv), R] = [{H * (dn + dv)}, {R}], "
             f"got {tuple(kv_b_weight.shape)}")
    _require(q_pe.shape[2] == H and q_pe.shape[3] == k_pe.shape[2],
             f"{op}: q_pe [B, T, H, r] and k_pe [B, S, r] disagree: {tuple(q_pe.shape)} vs {tuple(k_pe.shape)}")
    _require(attn_mask is None or attn_mask.dim() <= 4,
             f"{op}: attn_mask must be None or broadcastable to [B, H, T, S] (at most 4-d), "
             f"got shape {None if attn_mask is None else tuple(attn_mask.shape)}")
    _require(attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point,
             f"{op}: attn_mask must be bool (True = attend) or floating point (added), got {attn_mask.dtype}"
             if attn_mask is not None else "")


def _softmax(scores: Tensor, attn_mask: Optional[Tensor], scale: float, dtype: torch.dtype) -> Tensor:
    # scores [B, H, T, S] in the input dtype -> probabilities [B, H, T, S] in `dtype`
    scores = (scores * scale).float()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return scores.softmax(dim=-1).to(dtype)


def mla_attention_expanded(q_nope, q_pe, latent, k_pe, kv_b_weight, attn_mask, scale: float) -> Tensor:
    """Expanded form: per-head keys and values from the latent ([B, S, H, dn + dv]), then attention."""
    B, S = latent.shape[:2]
    H, dn = q_nope.shape[2], q_nope.shape[3]
    kv = torch.nn.functional.linear(latent, kv_b_weight).view(B, S, H, -1)     # [B, S, H, dn + dv]
    k_nope, v = kv.split([dn, kv.shape[-1] - dn], dim=-1)
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
    probs = _softmax(scores, attn_mask, scale, v.dtype)
    return torch.einsum("bhts,bshd->bthd", probs, v)                              # [B, T, H, dv]


def mla_attention_absorbed(q_nope, q_pe, latent, k_pe, w_uk, w_uv, attn_mask, scale: float) -> Tensor:
    """Absorbed form: W_UK folded into the query, W_UV applied after attending over the latents."""
    q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)                          # [B, T, H, R]
    scores = torch.einsum("bthr,bsr->bhts", q_lat, latent) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
    probs = _softmax(scores, attn_mask, scale, latent.dtype)
    out_lat = torch.einsum("bhts,bsr->bthr", probs, latent)                       # [B, T, H, R]
    return torch.einsum("bthr,hvr->bthv", out_lat, w_uv)                          # [B, T, H, dv]


@torch.library.custom_op("graphopt::mla_attention", mutates_args=())
def mla_attention(q_nope: Tensor, q_pe: Tensor, latent: Tensor, k_pe: Tensor, kv_b_weight: Tensor,
                  w_uk: Tensor, w_uv: Tensor, attn_mask: Optional[Tensor], scale: float,
                  absorb_max_tokens: int = ABSORB_MAX_TOKENS) -> Tensor:
    """MLA attention; the absorbed form when T <= absorb_max_tokens, else the expanded form."""
    _check(q_nope, q_pe, latent, k_pe, kv_b_weight, w_uk, w_uv, attn_mask)
    if q_nope.shape[1] <= absorb_max_tokens:
        out = mla_attention_absorbed(q_nope, q_pe, latent, k_pe, w_uk, w_uv, attn_mask, scale)
    else:
        out = mla_attention_expanded(q_nope, q_pe, latent, k_pe, kv_b_weight, attn_mask, scale)
    return out.to(q_nope.dtype).contiguous()


@mla_attention.register_fake
def _(q_nope, q_pe, latent, k_pe, kv_b_weight, w_uk, w_uv, attn_mask, scale, absorb_max_tokens=ABSORB_MAX_TOKENS):
    _check(q_nope, q_pe, latent, k_pe, kv_b_weight, w_uk, w_uv, attn_mask)
    B, T, H = q_nope.shape[:3]
    return q_nope.new_empty((B, T, H, w_uv.shape[1]))
