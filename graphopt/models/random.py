"""Small randomly initialised DeepSeek-V3 models, for tests, examples and the demo fallback.

The shape exercises every feature of the architecture (MLA with q_lora, dense first layer, grouped
MoE routing with correction bias, a shared expert, MTP) while running in milliseconds on a CPU.
"""

from __future__ import annotations

import torch

from .config import DeepseekV3Config
from .deepseek import DeepseekV3ForCausalLM


def random_config(**overrides) -> DeepseekV3Config:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                first_k_dense_replace=1, max_position_embeddings=256, num_nextn_predict_layers=1)
    base.update(overrides)
    return DeepseekV3Config(**base)


def random_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    """A random model in eval mode; the router is spread (std 0.5) so routing depends on the input."""
    model = DeepseekV3ForCausalLM(random_config(**overrides)).init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model.eval()
