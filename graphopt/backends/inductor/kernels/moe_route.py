"""graphopt::moe_route in two Triton launches: the router's float32 logits, split over the hidden
size, then one program per token for the scoring, the group-limited selection and the top-k with
its normalised weights, without leaving registers.

Inlined as torch maths, Inductor turns the router into ~8 kernels per MoE layer (a cast of the gate
weight to float32, a cuBLAS GEMV and its reduction, the scoring, `topk`'s gather and bitonic sort, the
gather and the normalisation): ~22 us per layer at batch 1 on the H200, about 15% of a V2-Lite decode
step (benchmarks/NOTES.md). One program per token doing it all measured 50 us on the H200 (one SM
streams the whole [E, H] gate weight), so the logits are split: up to 32 programs per token each sum
a slice of H, and the routing program adds the slices in a fixed order (no atomics: the same logits,
and so the same experts, on every run):

    logits[e] = sum_h float(x[h]) * float(W[e, h])          float32 accumulation, like the reference
    scores    = sigmoid(logits) | softmax(logits)
    choice    = scores + correction_bias                     (when given)
    groups    : noaux_tc scores a group by the sum of its best two, group_limited_greedy by its best;
                the topk_group best groups are kept, the other experts' choices are -inf
    ids       = top_k of choice by repeated argmax           (ties: the lower expert index)
    weights   = scores[ids], / (sum + 1e-20) when norm_topk_prob, * routed_scaling_factor

The reference (`graphopt/ops/core.py: route`) stays the definition. The logits are the same sums in
another order, so they agree to float32 rounding and the selection agrees except where two experts'
choices are that close (the tests check both). Grouped routing needs a power-of-two expert and group
count (the reshape into groups); other shapes, and more than 1024 experts, run the reference.
Expert pruning (prune_threshold > 0, the decode step's) is honoured on every path: the kernel's
weights go through the reference's own `core.prune_routing` (elementwise torch on the device, no
host synchronisation), so pruned and unpruned routing share the kernel and the pruning rule.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from graphopt.ops import core
from graphopt.ops.core import _check_moe_route

try:
    import triton
    import triton.language as tl
except ImportError:            # the module still imports; available() says False
    triton = None

__all__ = ["available", "moe_route_cuda", "register"]

_MAX_EXPERTS = 1024
_MAX_SPLITS = 32     # programs per token computing the logits, each over a slice of the hidden size
_GROUP_MODE = {"noaux_tc": 1, "group_limited_greedy": 2}


def available() -> bool:
    """Triton importable, and a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) to run on."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _logits_kernel(x_ptr, w_ptr, partial_ptr, stride_x, stride_w, H: tl.constexpr, E: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, ITERS: tl.constexpr, SPLITS: tl.constexpr):
        """partial[row, s, e] = the float32 dot of x[row] and W[e] over split s's slice of H."""
        row, s = tl.program_id(0).to(tl.int64), tl.program_id(1)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for i in tl.static_range(ITERS):
            h = (s * ITERS + i) * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = h < H
            xv = tl.load(x_ptr + row * stride_x + h, mask=h_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + e[:, None] * stride_w + h[None, :], mask=e_ok[:, None] & h_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        tl.store(partial_ptr + (row * SPLITS + s) * BLOCK_E + e, acc)

    @triton.jit
    def _route_kernel(partial_ptr, bias_ptr, weights_ptr, ids_ptr, scale,
                      E: tl.constexpr, BLOCK_E: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr, TOPK_G: tl.constexpr,
                      GROUP_MODE: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        sp = tl.arange(0, BLOCK_S)
        parts = tl.load(partial_ptr + (row * SPLITS + sp[:, None]) * BLOCK_E + e[None, :],
                        mask=(sp < SPLITS)[:, None], other=0.0)
        acc = tl.sum(parts, axis=0)                       # a fixed order: the same logits every run
        if SIGMOID:
            scores = tl.sigmoid(acc)
        else:
            a = tl.where(e_ok, acc, float("-inf"))
            p = tl.where(e_ok, tl.exp(a - tl.max(a, axis=0)), 0.0)
            scores = p / tl.sum(p, axis=0)
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        choice = tl.where(e_ok, choice, float("-inf"))
        if GROUP_MODE != 0:                               # E == BLOCK_E here: a power of two
            EG: tl.constexpr = BLOCK_E // G
            grouped = tl.reshape(choice, (G, EG))
            best = tl.max(grouped, axis=1)
            if GROUP_MODE == 1:                           # noaux_tc: the sum of the group's best two
                col = tl.arange(0, EG)
                first = tl.argmax(grouped, axis=1)
                second = tl.max(tl.where(col[None, :] == first[:, None], float("-inf"), grouped), axis=1)
                group_scores = best + second
            else:
                group_scores = best
            g = tl.arange(0, G)
            keep = g < 0
            for _ in tl.static_range(TOPK_G):
                pick = tl.argmax(group_scores, axis=0)
                keep = keep | (g == pick)
                group_scores = tl.where(g == pick, float("-inf"), group_scores)
            kept = tl.reshape(tl.broadcast_to(keep[:, None], (G, EG)), (BLOCK_E,))
            choice = tl.where(kept, choice, float("-inf"))
        k = tl.arange(0, BLOCK_K)
        out_w = tl.zeros([BLOCK_K], dtype=tl.float32)
        out_i = tl.zeros([BLOCK_K], dtype=tl.int64)
        for i in tl.static_range(K):
            pick = tl.argmax(choice, axis=0)
            chosen = e == pick
            out_w = tl.where(k == i, tl.sum(tl.where(chosen, scores, 0.0), axis=0), out_w)
            out_i = tl.where(k == i, pick.to(tl.int64), out_i)
            choice = tl.where(chosen, float("-inf"), choice)
        if NORM:
            out_w = out_w / (tl.sum(out_w, axis=0) + 1e-20)
        tl.store(weights_ptr + row * K + k, out_w * scale, mask=k < K)
        tl.store(ids_ptr + row * K + k, out_i, mask=k < K)


def _kernel_takes(x: Tensor, gate_weight: Tensor, n_group: int, grouped: bool) -> bool:
    e = gate_weight.shape[0]
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    pow2 = e & (e - 1) == 0 and n_group & (n_group - 1) == 0
    return triton is not None and on_device and e <= _MAX_EXPERTS and (pow2 or not grouped) \
        and gate_weight.stride(-1) == 1 and x.dim() == 2


def moe_route_cuda(x: Tensor, gate_weight: Tensor, correction_bias: Tensor | None, top_k: int, n_group: int,
                   topk_group: int, topk_method: str, scoring_func: str, norm_topk_prob: bool,
                   routed_scaling_factor: float, prune_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """graphopt::moe_route's CUDA kernel: same arguments and results as the reference op."""
    _check_moe_route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                     prune_threshold)
    weights, ids = _route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                          norm_topk_prob, routed_scaling_factor)
    return (core.prune_routing(weights, prune_threshold) if prune_threshold > 0 else weights), ids


def _route(x: Tensor, gate_weight: Tensor, correction_bias: Tensor | None, top_k: int, n_group: int,
           topk_group: int, topk_method: str, scoring_func: str, norm_topk_prob: bool,
           routed_scaling_factor: float) -> tuple[Tensor, Tensor]:
    grouped = topk_method != "greedy" and n_group > 1
    if not _kernel_takes(x, gate_weight, n_group, grouped):
        return core.route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                          norm_topk_prob, routed_scaling_factor)
    n, h = x.shape
    e = gate_weight.shape[0]
    weights = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, top_k, dtype=torch.int64, device=x.device)
    if n == 0:
        return weights, ids
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_e = triton.next_power_of_2(e)
    block_h = max(16, min(128, 8192 // block_e, triton.next_power_of_2(h)))
    tiles = triton.cdiv(h, block_h)
    iters = triton.cdiv(tiles, _MAX_SPLITS)
    splits = triton.cdiv(tiles, iters)
    partial = torch.empty(n, splits, block_e, dtype=torch.float32, device=x.device)
    _logits_kernel[(n, splits)](x, gate_weight, partial, x.stride(0), gate_weight.stride(0), H=h, E=e,
                                BLOCK_E=block_e, BLOCK_H=block_h, ITERS=iters, SPLITS=splits, num_warps=4)
    bias = correction_bias if correction_bias is not None else weights     # unread without a bias
    _route_kernel[(n,)](partial, bias, weights, ids, float(routed_scaling_factor), E=e, BLOCK_E=block_e,
                        SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), K=top_k,
                        BLOCK_K=triton.next_power_of_2(top_k), G=n_group if grouped else 1,
                        TOPK_G=topk_group if grouped else 1, GROUP_MODE=_GROUP_MODE[topk_method] if grouped else 0,
                        SIGMOID=scoring_func == "sigmoid", HAS_BIAS=correction_bias is not None,
                        NORM=norm_topk_prob, num_warps=4)
    return weights, ids


_registered = False


def register() -> bool:
    """Make moe_route_cuda the op's CUDA kernel, once (later calls do nothing)."""
    global _registered
    if not _registered:
        torch.library.register_kernel("graphopt::moe_route", "cuda", moe_route_cuda)
        _registered = True
    return _registered
