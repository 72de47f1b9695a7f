"""Compile a transformers DeepseekV3ForCausalLM with graphopt and use it in place of the HF model.

    python examples/plug_into_transformers.py

The HF model here is small and random (no download); with a real checkpoint it is
`DeepseekV3ForCausalLM.from_pretrained(path)`. graphopt shares the HF model's parameters (no copy),
and transformers drops the MTP weights on load, so spec="mtp" needs `from_transformers(hf,
mtp_weights=path)`; this example compiles without speculation.
"""

import torch
import transformers

import graphopt
from graphopt.models import from_transformers

config = transformers.DeepseekV3Config(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
torch.manual_seed(0)
hf = transformers.DeepseekV3ForCausalLM(config).eval()

compiled = graphopt.compile(hf)                      # accepts the HF model directly
ids = torch.randint(0, 512, (2, 10))
with torch.no_grad():
    expected = hf(ids).logits
got = compiled(ids).logits                           # drop-in for hf(ids): an output with .logits
print(f"max |graphopt - transformers| logits: {(got - expected).abs().max():.2e}")

shared = dict(from_transformers(hf).named_parameters())
print("parameters shared with the HF model:",
      all(shared[name].data_ptr() == p.data_ptr() for name, p in hf.named_parameters()))
print("greedy continuation:", compiled.generate([[1, 2, 3, 4]], max_new_tokens=8)[0])
