"""The reference model behind the step argument order.

Every step function in graphopt takes the captured graph's order:

    main: (input_ids, positions, slot_mapping, block_tables, kv_caches) -> (logits, hidden)
    MTP:  (next_ids, hidden, positions, slot_mapping, block_tables, mtp_cache) -> (logits, hidden)

The model's own paged forward puts the caches before the slot mapping (`model(ids, positions,
kv_caches, slot_mapping, block_tables)`); these two adapters are the only place that knows it.
Capture exports them; the eager step template and the reference provider call them. They only
duck-type the model (`forward(..., return_hidden=True)`, `mtp_forward`), so the step layer does not
import the model's implementation.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MTPStep", "MainStep"]


class MainStep(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, slot_mapping, block_tables, kv_caches):
        return self.model(input_ids, positions, kv_caches, slot_mapping, block_tables, return_hidden=True)


class MTPStep(nn.Module):
    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        self.model, self.depth = model, depth

    def forward(self, next_ids, hidden, positions, slot_mapping, block_tables, mtp_cache):
        return self.model.mtp_forward(self.depth, next_ids, hidden, positions, mtp_cache, slot_mapping,
                                      block_tables)
