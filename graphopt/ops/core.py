"""graphopt:: core ops: RMSNorm, SwiGLU, a dense projection, MoE routing and the sparse MoE expert dispatch.

Each op has a reference implementation in plain torch that does exactly the reference model's maths
(`graphopt/models/deepseek.py`: RMSNorm, MLP, TopkRouter, Experts) and a fake implementation that
only computes output shapes and dtypes, so graphs holding these ops can be exported, shape-propagated
and traced with symbolic (dynamic) batch and token dimensions. Backends register faster kernels for
the same ops; they never change what an op means.

    rms_norm(x [..., H], weight [H], eps)                      -> [..., H]   (dtype: x * weight promotion)
    swiglu(gate [...], up [...])                               -> [...]      silu(gate) * up
    linear(x [..., K], weight [N, K])                          -> [..., N]   x @ weight^T (no bias)
    moe_route(x [N, H], gate_weight [E, H], bias [E]?, ...,
              prune_threshold)                                  -> weights fp32 [N, k], ids int64 [N, k]
    moe_experts(x [N, H], weights [N, k], ids [N, k],
                gate_up [E, 2I, H], down [E, H, I])            -> [N, H]
    moe_expert_terms(the same)                                 -> float32 [N, k, H], before the sum over k

Bad arguments raise ValueError naming the argument, what it was and what is accepted.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SUPPORTED_SCORING", "SUPPORTED_TOPK_METHODS", "linear", "rms_norm", "swiglu", "moe_route", "moe_experts",
           "moe_expert_terms", "prune_routing", "route"]

# the routers graphopt implements (models/config.py validates a config against these)
SUPPORTED_TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
SUPPORTED_SCORING = ("sigmoid", "softmax")


def _require(cond, message: str) -> None:
    """Plain bools raise ValueError; symbolic conditions (dynamic shapes) become torch._check asserts."""
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: message)
    elif not cond:
        raise ValueError(message)


# -- rms_norm ---------------------------------------------------------------------------------------

def _check_rms_norm(x: Tensor, weight: Tensor) -> None:
    _require(x.dim() >= 1, f"graphopt.rms_norm: x must have at least 1 dimension, got shape {tuple(x.shape)}")
    _require(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
             f"graphopt.rms_norm: weight must have shape [hidden] = [{x.shape[-1]}] (x's last dimension), "
             f"got {tuple(weight.shape)}")
    _require(x.dtype.is_floating_point, f"graphopt.rms_norm: x must be a floating-point tensor, got {x.dtype}")


@torch.library.custom_op("graphopt::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)); the statistics in float32, cast back to x.dtype before the
    weight multiply (as the model and HF do), so a bf16 model gets bit-identical results."""
    _check_rms_norm(x, weight)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check_rms_norm(x, weight)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


# -- swiglu -----------------------------------------------------------------------------------------

def _check_swiglu(gate: Tensor, up: Tensor) -> None:
    _require(gate.dim() == up.dim() and all(a == b for a, b in zip(gate.shape, up.shape)),
             f"graphopt.swiglu: gate and up must have the same shape, got {tuple(gate.shape)} and "
             f"{tuple(up.shape)}")
    _require(gate.dtype == up.dtype,
             f"graphopt.swiglu: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")


@torch.library.custom_op("graphopt::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the gated activation of every DeepSeek MLP and expert ([..., I] -> [..., I])."""
    _check_swiglu(gate, up)
    return F.silu(gate) * up


@swiglu.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    _check_swiglu(gate, up)
    return torch.empty_like(gate)


# -- linear -----------------------------------------------------------------------------------------
# The graphs hold aten.linear; a backend that has a faster kernel for some shapes (the inductor
# backend's small-row GEMV on CUDA) rewrites those nodes to this op, whose reference is aten.linear.

def _check_linear(x: Tensor, weight: Tensor) -> None:
    _require(weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1],
             f"graphopt.linear: weight must be [out, K] with K = x's last dimension ({x.shape[-1] if x.dim() else '?'}), "
             f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    _require(x.dtype == weight.dtype,
             f"graphopt.linear: x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")


@torch.library.custom_op("graphopt::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight^T over x's last dimension, exactly aten.linear(x, weight)."""
    _check_linear(x, weight)
    return F.linear(x, weight)


@linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    _check_linear(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# -- moe_route --------------------------------------------------------------------------------------

def _check_moe_route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method,
                     scoring_func, prune_threshold: float = 0.0) -> None:
    where = "graphopt.moe_route"
    _require(0.0 <= prune_threshold <= 1.0,
             f"{where}: prune_threshold must be in [0, 1] (0: no pruning), got {prune_threshold}")
    _require(topk_method in SUPPORTED_TOPK_METHODS,
             f"{where}: topk_method {topk_method!r} is not supported; accepted: {SUPPORTED_TOPK_METHODS}")
    _require(scoring_func in SUPPORTED_SCORING,
             f"{where}: scoring_func {scoring_func!r} is not supported; accepted: {SUPPORTED_SCORING}")
    _require(x.dim() == 2, f"{where}: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    _require(gate_weight.dim() == 2 and gate_weight.shape[1] == x.shape[1],
             f"{where}: gate_weight must be [n_experts, hidden={x.shape[1]}], got {tuple(gate_weight.shape)}")
    e = gate_weight.shape[0]
    _require(1 <= top_k <= e, f"{where}: top_k must be in 1..n_experts ({e}), got {top_k}")
    _require(n_group >= 1 and e % n_group == 0,
             f"{where}: n_group must be >= 1 and divide n_experts ({e}), got {n_group}")
    _require(1 <= topk_group <= n_group, f"{where}: topk_group must be in 1..n_group ({n_group}), got {topk_group}")
    if correction_bias is not None:
        _require(tuple(correction_bias.shape) == (e,),
                 f"{where}: correction_bias must be [n_experts] = [{e}], got {tuple(correction_bias.shape)}")


def route(x, gate_weight, correction_bias, top_k: int, n_group: int, topk_group: int, topk_method: str,
          scoring_func: str, norm_topk_prob: bool, routed_scaling_factor: float):
    """The DeepSeek router's maths: x [N, H] -> weights, ids [N, k]. models.deepseek.TopkRouter calls it
    and it is the graphopt::moe_route reference, so the two cannot drift apart."""
    logits = F.linear(x.float(), gate_weight.float())                          # [N, E]
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if topk_method != "greedy" and n_group > 1:
        grouped = choice.view(-1, n_group, gate_weight.shape[0] // n_group)    # [N, G, E/G]
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)           # [N, G]
        else:
            group_scores = grouped.amax(dim=-1)
        best_groups = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter(1, best_groups, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def prune_routing(weights: Tensor, threshold: float) -> Tensor:
    """Top-k expert pruning: weights [N, k] -> [N, k], the experts whose share of the token's routing
    weight is below `threshold` set to 0, the others rescaled to the same total.

        share_j = w_j / sum_j w_j          (the normalised routing weight; w_j itself when norm_topk_prob)
        keep_j  = share_j >= threshold, or j is the token's largest weight (a token keeps >= 1 expert)
        w'_j    = keep_j * w_j * sum(w) / sum(keep * w)

    A weight of 0 marks a dropped expert: moe_experts skips it, so its weights are never read. The
    ids are unchanged (shapes stay static for CUDA graphs). Scale-invariant, so applying it to the
    scaled weights (x routed_scaling_factor) equals applying it before the scaling."""
    total = weights.sum(dim=-1, keepdim=True)                                  # [N, 1]
    share = weights / (total + 1e-20)
    best = weights.argmax(dim=-1, keepdim=True)
    keep = (share >= threshold).scatter(1, best, True)                         # [N, k] bool
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept * (total / (kept.sum(dim=-1, keepdim=True) + 1e-20))


@torch.library.custom_op("graphopt::moe_route", mutates_args=())
def moe_route(x: Tensor, gate_weight: Tensor, correction_bias: Optional[Tensor], top_k: int, n_group: int,
              topk_group: int, topk_method: str, scoring_func: str, norm_topk_prob: bool,
              routed_scaling_factor: float, prune_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """The DeepSeek router: scores in float32, (group-limited) top-k selection, normalised weights.

    Same maths as models.deepseek.TopkRouter: noaux_tc selects on sigmoid scores + correction_bias
    with a group scored by the sum of its top-2 experts; group_limited_greedy scores a group by its
    best expert; greedy (or n_group 1) is a plain top-k. Weights are the unbiased scores of the chosen
    experts, normalised to sum 1 when norm_topk_prob, times routed_scaling_factor.
    prune_threshold > 0 (the decode step's expert pruning, passes/prune_routed_experts.py) then drops
    the chosen experts whose normalised weight is below it (`prune_routing`: weight 0, ids kept).
    Returns weights float32 [N, top_k] and ids int64 [N, top_k].
    """
    _check_moe_route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                     prune_threshold)
    weights, ids = route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                         norm_topk_prob, routed_scaling_factor)
    return (prune_routing(weights, prune_threshold) if prune_threshold > 0 else weights), ids


@moe_route.register_fake
def _(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob,
      routed_scaling_factor, prune_threshold=0.0):
    _check_moe_route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                     prune_threshold)
    shape = (x.shape[0], top_k)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int64)


# -- moe_experts ------------------------------------------------------------------------------------

def _check_moe_experts(x, weights, ids, gate_up, down) -> None:
    where = "graphopt.moe_experts"
    _require(x.dim() == 2, f"{where}: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    _require(weights.dim() == 2 and ids.dim() == 2 and weights.shape[0] == x.shape[0]
             and ids.shape[0] == x.shape[0] and weights.shape[1] == ids.shape[1],
             f"{where}: weights and ids must both be [tokens={x.shape[0]}, top_k], got "
             f"{tuple(weights.shape)} and {tuple(ids.shape)}")
    _require(not ids.dtype.is_floating_point and ids.dtype != torch.bool,
             f"{where}: ids must be an integer tensor, got {ids.dtype}")
    _require(gate_up.dim() == 3 and down.dim() == 3,
             f"{where}: gate_up must be [E, 2I, H] and down [E, H, I], got {tuple(gate_up.shape)} and "
             f"{tuple(down.shape)}")
    e, two_i, h = gate_up.shape
    _require(h == x.shape[1] and tuple(down.shape) == (e, h, two_i // 2) and two_i % 2 == 0,
             f"{where}: with x [tokens, {x.shape[1]}], gate_up must be [E, 2I, {x.shape[1]}] and down [E, "
             f"{x.shape[1]}, I]; got gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)}")


@torch.library.custom_op("graphopt::moe_experts", mutates_args=())
def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Routed experts, sparse: each expert runs only on the tokens routed to it.

    out[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]),  expert_e(v) = (silu(v Wg_e^T) * v Wu_e^T) Wd_e^T
    with gate_up[e] = [Wg_e ; Wu_e] ([2I, H], gate rows first) and down[e] = Wd_e ([H, I]).

    Equals models.deepseek.Experts' dense dispatch (every token through every expert, then a routing-
    weighted sum in float32) up to float summation order: both run the expert matmuls in x.dtype and
    accumulate the weighted expert outputs in float32, but here only the top_k non-zero terms are
    added, in expert order. The experts of one token must be distinct (top-k ids are); a repeated id
    would be added twice here but written once by the dense scatter. An assignment of weight 0 (an
    expert dropped by moe_route's prune_threshold) is skipped: it would add 0, and skipping it is what
    saves reading the expert's weights. The reference groups tokens by expert on the host (data-
    dependent sizes); a backend kernel does the same grouping on the device.
    """
    _check_moe_experts(x, weights, ids, gate_up, down)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)          # [N, H] float32 accumulator
    for assigned, term in _expert_terms(x, weights, ids, gate_up, down):
        out.index_add_(0, assigned // ids.shape[1], term)
    return out.to(x.dtype)


@moe_experts.register_fake
def _(x, weights, ids, gate_up, down):
    _check_moe_experts(x, weights, ids, gate_up, down)
    return torch.empty_like(x)


def _expert_terms(x, weights, ids, gate_up, down):
    """Per used expert, on the host grouping: (assigned [c] indices into N * k, their weighted outputs
    float32 [c, H]), the expert matmuls in x.dtype. Pruned assignments (weight 0) are not computed."""
    top_k, n_inter = ids.shape[1], down.shape[2]
    flat_weights = weights.reshape(-1).float()
    live = flat_weights != 0                                                   # pruned assignments: weight 0
    flat_ids = torch.where(live, ids.reshape(-1).long(), gate_up.shape[0])     # [N * k], dropped -> E (past the end)
    order = torch.argsort(flat_ids, stable=True)                               # assignments grouped by expert
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0] + 1)[:-1].tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        assigned = order[start:start + count]                                  # [c] indices into N * k
        start += count
        gu = x[assigned // top_k] @ gate_up[e].t()                              # [c, 2I]
        h = (F.silu(gu[:, :n_inter]) * gu[:, n_inter:]) @ down[e].t()           # [c, H] in x.dtype
        yield assigned, h.float() * flat_weights[assigned, None]


@torch.library.custom_op("graphopt::moe_expert_terms", mutates_args=())
def moe_expert_terms(x: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """moe_experts before its sum over k: float32 [N, k, H], term [n, j] = weights[n, j] *
    expert_{ids[n, j]}(x[n]) (0 for a pruned assignment), so moe_experts(...) equals
    moe_expert_terms(...).sum(1).to(x.dtype) up to float summation order. A backend calls it where the
    sum should fuse into the consumer (the CUDA backend's decode steps); no Program holds it."""
    _check_moe_experts(x, weights, ids, gate_up, down)
    n_tokens, top_k = ids.shape
    out = torch.zeros(n_tokens * top_k, x.shape[1], dtype=torch.float32, device=x.device)
    for assigned, term in _expert_terms(x, weights, ids, gate_up, down):
        out[assigned] = term
    return out.view(n_tokens, top_k, -1)


@moe_expert_terms.register_fake
def _(x, weights, ids, gate_up, down):
    _check_moe_experts(x, weights, ids, gate_up, down)
    return x.new_empty((*ids.shape, x.shape[1]), dtype=torch.float32)
