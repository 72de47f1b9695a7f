"""Reference greedy decoding on the eager model: the ground truth compiled paths are compared against.

Deliberately simple: one sequence at a time, a private paged cache whose blocks are laid out in
order, prefill then one token per forward. Slow, for clarity; the runtime
(`graphopt.runtime`) is the fast path.
"""

from __future__ import annotations

import torch

from .deepseek import DeepseekV3ForCausalLM


@torch.no_grad()
def greedy_generate(model: DeepseekV3ForCausalLM, prompt: list[int], max_new_tokens: int,
                    eos_token_id: int | None = None, block_size: int = 16) -> list[int]:
    """Greedy continuation of `prompt` (token ids), without the prompt."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    total = len(prompt) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    device = model.lm_head.weight.device
    n_blocks = -(-total // block_size)
    caches = model.new_kv_caches(n_blocks + 1, block_size)             # block 0: padding sink
    block_tables = torch.arange(1, n_blocks + 1, device=device)[None]  # [1, n_blocks]

    def run(ids: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(ids), device=device)[None]
        slots = positions + block_size  # blocks 1.. in order: slot of position p is bs + p
        logits = model(torch.tensor([ids], device=device), positions, caches, slots, block_tables)
        return logits[0, -1]

    out: list[int] = []
    logits = run(prompt, 0)
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token == eos_token_id or step == max_new_tokens - 1:
            break
        logits = run([token], len(prompt) + step)
    return out
