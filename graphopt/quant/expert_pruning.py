"""MoE top-k expert pruning on the reference model: what the decode steps compute with
`graphopt.compile(..., moe_prune_threshold=t)`, in eager form, for accuracy figures and tests.

    pruned = prune_experts(model, 0.2)          # a copy; every router (main and MTP) drops experts
    kept = count_kept_experts(pruned, ids)      # mean experts kept per token per MoE layer

The rule is the op's own (`ops.core.prune_routing`, run by graphopt::moe_route's prune_threshold):
an expert whose share of the token's routing weight is below the threshold gets weight 0 (so its
weights are never read), the kept ones are rescaled to the same total, and the top expert is
always kept. The compiled graph path prunes only the decode steps (passes/prune_routed_experts.py)
and prefills in full; this eager copy prunes every position, so teacher-forced figures on it are
those of a sequence decoded token by token from the start (the prompt's cache pruned too): an
upper bound on what decode-only pruning costs.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from graphopt.models.deepseek import DeepseekV3ForCausalLM, TopkRouter
from graphopt.ops.core import prune_routing

__all__ = ["PrunedRouter", "count_kept_experts", "prune_experts"]


class PrunedRouter(TopkRouter):
    """TopkRouter whose weights go through prune_routing; same parameters and state-dict names."""

    def __init__(self, router: TopkRouter, threshold: float):
        nn.Module.__init__(self)
        self.config, self.threshold = router.config, float(threshold)
        self.weight = router.weight
        if router.e_score_correction_bias is not None:
            self.register_buffer("e_score_correction_bias", router.e_score_correction_bias)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weights, ids = super().forward(x)                    # [N, k] each
        return (prune_routing(weights, self.threshold) if self.threshold > 0 else weights), ids


def prune_experts(model: DeepseekV3ForCausalLM, threshold: float, inplace: bool = False) -> DeepseekV3ForCausalLM:
    """`model` (a copy unless inplace) with every MoE router pruning at `threshold` in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"prune_experts: threshold must be a number in [0, 1] (0: no pruning), got {threshold!r}")
    if not any(isinstance(m, TopkRouter) for m in model.modules()):
        raise ValueError("prune_experts: the model has no routed experts (no MoE router)")
    model = model if inplace else copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, TopkRouter):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, PrunedRouter(mod, threshold))   # a PrunedRouter: re-thresholded
    return model


@torch.no_grad()
def count_kept_experts(model: nn.Module, windows: Tensor, batch: int = 4, prefix: str = "model.") -> dict[str, float]:
    """Experts kept per token per MoE layer over `windows` [n, T] (full forwards), for the routers
    whose module name starts with `prefix` (default: the main model's, not the MTP module's):
    {"kept": mean over layers and tokens, "top_k": the routed count, "layers": MoE layers counted}."""
    kept, tokens, routers = [0.0], [0], []
    top_k = None

    def hook(module, args, out):
        weights = out[0]                                          # [N, k]
        kept[0] += float((weights != 0).sum())
        tokens[0] += weights.shape[0]

    for name, mod in model.named_modules():
        if isinstance(mod, TopkRouter) and name.startswith(prefix):
            routers.append(mod.register_forward_hook(hook))
            top_k = mod.config.num_experts_per_tok
    if not routers:
        raise ValueError(f"count_kept_experts: no router under {prefix!r}")
    try:
        dev = next(model.parameters()).device
        for i in range(0, len(windows), batch):
            model(windows[i: i + batch].to(dev))
    finally:
        for h in routers:
            h.remove()
    return {"kept": kept[0] / max(tokens[0], 1), "top_k": top_k, "layers": len(routers)}
