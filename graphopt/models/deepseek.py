"""Reference DeepSeek-V3 (and V2) with Multi-Token Prediction, written to be captured by torch.export.

This is the model every graphopt path is compared against. Two rules shape it:
  * parameter names are the HF checkpoint names (`model.layers.3.mlp.experts.gate_up_proj`, ...), so a
    checkpoint loads by name and a `transformers` model can lend us its parameters without copies;
    the MTP module `model.layers.{L+i}.*` of the checkpoint lives at `mtp.{i}.*` here;
  * no data-dependent Python control flow: routing is top-k + masks, experts are a dense dispatch over
    stacked weights, the KV cache is read through index tensors. torch.export sees one static graph.

Attention is MLA in the plain "expanded" form: the cache holds the normalised latent and the roped
shared key (kv_lora_rank + qk_rope_head_dim values per token and layer); keys and values are expanded
from it by kv_b_proj at every step. The absorbed form is a graph pass (`passes/`), not the model's job.

KV cache layout (paged). One tensor per layer, [num_blocks, block_size, kv_lora_rank + rope_dim].
  slot_mapping [B, T]  flat slot (block * block_size + offset) each new token is written to;
  block_tables [B, M]  the blocks of each sequence, in order, so gathered slot j holds position j.
A query at position p attends to gathered slots j <= p. Stale slots beyond a sequence's length are
therefore never read, and padding tokens are pointed at slot 0 (block 0 is reserved as a sink).

MoE dispatch cost (dense form): every token runs through every routed expert and the outputs are
weighted by the (mostly zero) routing weights. FLOPs are n_routed_experts / num_experts_per_tok times
the sparse minimum (8/64 experts on V2-Lite: 10.7x) and, at batch 1 decode, all expert weights are read
instead of the top-k (same ratio in bytes). It is the price of a static graph in the reference; the
`graphopt::moe_experts` op (sparse, grouped by expert) replaces it in compiled graphs. As a side
effect, every expert sees every token, which quantisation calibration wants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.core import route
from .config import DeepseekV3Config, yarn_mscale


def _tracing() -> bool:
    return torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of position * inv_freq; YaRN rescales inv_freq and the cos/sin amplitude."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        self.inv_freq = rope_parameters(self.config)[0].to(device or self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions: [B, T] -> cos, sin: [B, T, rope_dim / 2]
        freqs = positions[..., None].float() * self.inv_freq.float()
        return ((freqs.cos() * self.attention_factor).to(dtype),
                (freqs.sin() * self.attention_factor).to(dtype))


def rope_parameters(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if config.rope_type != "yarn":
        return 1.0 / pos_freqs, 1.0
    rs = config.rope_scaling
    factor = rs["factor"]
    orig_max = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, heads, r] by cos/sin [B, T, r/2].

    interleave=True: pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout); the result is written
    de-interleaved [rotated evens, rotated odds], the same for q and k, so dot products are unchanged.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MLAttention(nn.Module):
    """Multi-head latent attention, expanded form, optionally over a paged latent cache."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        c = config
        self.config = c
        self.num_heads = c.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = c.v_head_dim, c.kv_lora_rank
        qk = c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_cache_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.softmax_scale = c.softmax_scale

    def forward(self, x, cos, sin, positions, kv_cache=None, slot_mapping=None, block_tables=None):
        # x: [B, T, hidden]; positions: [B, T]
        B, T, _ = x.shape
        H = self.num_heads
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.config.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)                                    # [B, T, R]
        q_pe = apply_rope(q_pe, cos, sin, self.config.rope_interleave)          # [B, T, H, r]
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.config.rope_interleave).squeeze(2)  # [B, T, r]

        if kv_cache is None:
            keys_latent, keys_pe, key_positions = latent, k_pe, positions
        else:
            # write the new tokens' cache entries, then read each sequence's context back in order
            entry = torch.cat([latent, k_pe], dim=-1).to(kv_cache.dtype)       # [B, T, R + r]
            flat = kv_cache.view(-1, kv_cache.shape[-1])                        # [blocks * bs, R + r]
            flat.index_copy_(0, slot_mapping.reshape(-1), entry.reshape(B * T, -1))
            context = kv_cache[block_tables].flatten(1, 2).to(x.dtype)          # [B, S, R + r]
            keys_latent, keys_pe = context.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            key_positions = torch.arange(context.shape[1], device=x.device).expand(B, -1)

        S = keys_latent.shape[1]
        kv = self.kv_b_proj(keys_latent).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        scores = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
                  + torch.einsum("bthd,bsd->bhts", q_pe, keys_pe)) * self.softmax_scale
        visible = key_positions[:, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
        scores = scores.float().masked_fill(~visible, float("-inf"))
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * self.v_head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopkRouter(nn.Module):
    """Scores experts and picks num_experts_per_tok of them, within the topk_group best groups.

    noaux_tc (V3): sigmoid scores; selection uses scores + e_score_correction_bias, a group scores as
    the sum of its top-2; weights are the unbiased scores. group_limited_greedy (V2): softmax, a group
    scores as its best expert. greedy: plain top-k. Weights: normalised to sum 1 if norm_topk_prob,
    then times routed_scaling_factor.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        c = config
        self.config = c
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [N, hidden] -> weights [N, k] (float32), ids [N, k] (int64)
        c = self.config
        return route(x, self.weight, self.e_score_correction_bias, c.num_experts_per_tok, c.n_group or 1,
                     c.topk_group or 1, c.topk_method, c.scoring_func, c.norm_topk_prob, c.routed_scaling_factor)


class Experts(nn.Module):
    """Routed experts as stacked weights (the transformers 5 layout), dense dispatch."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))   # [E, gate rows ; up rows, H]
        self.down_proj = nn.Parameter(torch.empty(e, h, i))          # [E, H, I]

    def forward(self, x, weights, ids):
        # x: [N, H]; weights/ids: [N, k] -> [N, H]
        routing = torch.zeros(x.shape[0], self.gate_up_proj.shape[0], dtype=torch.float32, device=x.device)
        routing = routing.scatter(1, ids, weights.float())                       # [N, E], zero if not routed
        gate, up = torch.matmul(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [E, N, I] each
        y = torch.matmul(F.silu(gate) * up, self.down_proj.transpose(1, 2))       # [E, N, H]
        return torch.einsum("enh,ne->nh", y.float(), routing).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = Experts(config)
        n_shared = config.n_shared_experts or 0
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * n_shared)
                               if n_shared else None)

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)
        out = self.experts(flat, weights, ids).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                          config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, positions, kv_cache=None, slot_mapping=None, block_tables=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, kv_cache, slot_mapping,
                               block_tables)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    def __init__(self, config: DeepseekV3Config, head: nn.Linear):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = head


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 MTP module: h' = eh_proj([enorm(embed(tok_{t+1})), hnorm(h_t)]) -> block -> head.

    Predicts token t+2 from the main model's pre-norm hidden state at t and the token at t+1. The
    embedding and output head are the main model's (shared modules, as in DeepSeek-V3).
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int, embed_tokens: nn.Embedding, head: nn.Linear):
        super().__init__(config, layer_idx)
        self.embed_tokens = embed_tokens
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config, head)


class DeepseekV3Model(nn.Module):
    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DeepseekV3ForCausalLM(nn.Module):
    """Main model + MTP modules. `model(input_ids)` -> logits [B, T, vocab], as in transformers."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, n + i, self.model.embed_tokens, self.lm_head)
                                 for i in range(config.num_nextn_predict_layers))

    # -- main model ---------------------------------------------------------------------------
    def forward(self, input_ids, positions=None, kv_caches=None, slot_mapping=None, block_tables=None,
                return_hidden: bool = False):
        """input_ids/positions/slot_mapping: [B, T]; kv_caches: one tensor per layer (see module doc).

        Returns logits [B, T, vocab] and, with return_hidden, the last hidden states before the final
        norm [B, T, hidden] (the MTP module's input).
        """
        hidden = self.hidden_states(input_ids, positions, kv_caches, slot_mapping, block_tables)
        logits = self.lm_head(self.model.norm(hidden))
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, input_ids, positions=None, kv_caches=None, slot_mapping=None, block_tables=None):
        B, T = input_ids.shape
        if positions is None:
            if not _tracing() and T > self.config.max_position_embeddings:
                raise ValueError(f"input of {T} tokens is longer than max_position_embeddings "
                                 f"({self.config.max_position_embeddings})")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if not _tracing():
            _check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        if kv_caches is not None and not _tracing():
            _check_cache_args(self.config, kv_caches, slot_mapping, block_tables, B, T, self.config.num_hidden_layers)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            h = layer(h, cos, sin, positions, cache, slot_mapping, block_tables)
        return h

    # -- multi-token prediction ---------------------------------------------------------------
    def mtp_forward(self, depth: int, next_ids, hidden, positions=None, kv_cache=None, slot_mapping=None,
                    block_tables=None):
        """One MTP module. next_ids[b, t] is token t+1 and hidden[b, t] the hidden state at t.

        Returns logits [B, T, vocab] (predicting token t+2) and the module's pre-norm output
        [B, T, hidden], which feeds the next depth (or the same module again when chaining drafts).
        """
        if not 0 <= depth < len(self.mtp):
            raise ValueError(f"MTP depth {depth} requested but the model has {len(self.mtp)} MTP module(s) "
                             "(num_nextn_predict_layers); load a checkpoint with MTP weights")
        B, T = next_ids.shape
        if positions is None:
            positions = torch.arange(T, device=next_ids.device).expand(B, T)
        if not _tracing():
            _check_token_ids(next_ids, self.config.vocab_size, "next_ids")
        if kv_cache is not None and not _tracing():
            _check_cache_args(self.config, [kv_cache], slot_mapping, block_tables, B, T, 1)
        layer = self.mtp[depth]
        e = layer.enorm(layer.embed_tokens(next_ids))
        h = layer.eh_proj(torch.cat([e, layer.hnorm(hidden)], dim=-1))
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        h = layer(h, cos, sin, positions, kv_cache, slot_mapping, block_tables)
        return layer.shared_head.head(layer.shared_head.norm(h)), h

    # -- utilities ----------------------------------------------------------------------------
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "DeepseekV3ForCausalLM":
        """Random weights (normal(0, std) for matrices, ones for norms), deterministic in `seed`."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            for name, b in self.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.zero_()
        self.model.rotary_emb.reset_parameters()
        return self

    def new_kv_caches(self, num_blocks: int, block_size: int, dtype=None, device=None, mtp: bool = False):
        """Zeroed paged caches: one [num_blocks, block_size, kv_cache_dim] tensor per (MTP) layer."""
        n = self.config.num_nextn_predict_layers if mtp else self.config.num_hidden_layers
        ref = self.lm_head.weight
        return [torch.zeros(num_blocks, block_size, self.config.kv_cache_dim, dtype=dtype or ref.dtype,
                            device=device or ref.device) for _ in range(n)]


def _check_token_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    """A ValueError for ids outside [0, vocab_size), which the embedding would read out of bounds
    (a device-side assert on CUDA). One aminmax and one host sync per call: eager calls only; never
    while tracing, nor while a CUDA graph is being captured (a sync there would break the capture)."""
    if ids.numel() == 0 or ids.is_meta or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} hold token ids in [{lo}, {hi}]; this model's ids must be in [0, {vocab_size}) "
                         f"(config.vocab_size = {vocab_size})")


def _check_cache_args(config, kv_caches, slot_mapping, block_tables, B, T, n_layers) -> None:
    if len(kv_caches) != n_layers:
        raise ValueError(f"kv_caches: expected {n_layers} tensors (one per layer), got {len(kv_caches)}")
    if slot_mapping is None or block_tables is None:
        raise ValueError("kv_caches given without slot_mapping and block_tables")
    if tuple(slot_mapping.shape) != (B, T):
        raise ValueError(f"slot_mapping: expected shape {(B, T)}, got {tuple(slot_mapping.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables: expected shape ({B}, max_blocks), got {tuple(block_tables.shape)}")
    shape = tuple(kv_caches[0].shape)
    if len(shape) != 3 or shape[2] != config.kv_cache_dim:
        raise ValueError(f"kv_caches[0]: expected shape (num_blocks, block_size, {config.kv_cache_dim}), "
                         f"got {shape}")
