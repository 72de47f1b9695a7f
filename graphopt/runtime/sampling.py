"""Token sampling on the device, with per-row parameters and draws fixed by (seed, position).

Determinism rule: the random number used to sample the token at position p of a request is
`uniform(seed, p, stream)`, a counter-based hash of those integers computed with int64 tensor ops.
No generator state is carried between steps or shared between rows, so a request samples the same
tokens whether it runs alone or in any batch, with any prefill chunking, and a replayed step (CUDA
graph) needs no host-side RNG bookkeeping. `stream` separates independent uses at one position
(the speculative provider draws its acceptance test and its residual sample from different streams).

Filtering order (each optional per row): temperature -> top-k -> top-p on the renormalised
top-k distribution -> min-p relative to the most likely token. temperature == 0 is greedy (argmax
of the raw logits) and ignores the other filters.
"""

from __future__ import annotations

import torch

__all__ = ["STREAM_SAMPLE", "filtered_probs", "sample", "uniform"]

STREAM_SAMPLE = 0  # the stream plain decoding samples from
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x in [0, 2^32), split in 16-bit halves so no int64 product overflows
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer (xor-shift / multiply rounds): every input bit flips ~half the output."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def uniform(seed: torch.Tensor, position: torch.Tensor, stream: int = STREAM_SAMPLE) -> torch.Tensor:
    """float32 in [0, 1), a pure function of (seed, position, stream); broadcasts seed with position.

    seed, position: int64 tensors (any broadcastable shapes, same device). 24 bits of resolution.
    """
    seed = seed.to(torch.int64)
    position = position.to(torch.int64)
    h = _mix32(torch.full_like(seed, (stream * 0x9E3779B9 + 0x7F4A7C15) & _MASK32))
    h = _mix32(h ^ (seed & _MASK32))
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    h = _mix32(h ^ (position & _MASK32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution, in descending-logit order.

    logits [B, V]; per-row parameters [B]. Returns (probs [B, V] float32, sorted ids [B, V] int64):
    probs[b, r] is the probability of token ids[b, r] (rank r), zero where a filter removed it, rows
    sum to 1. Greedy rows (temperature 0) get the temperature-1 distribution; `sample` ignores it.
    """
    values, ids = logits.float().sort(dim=-1, descending=True, stable=True)          # [B, V]
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    probs = (values / t[:, None]).softmax(dim=-1)
    rank = torch.arange(values.shape[-1], device=logits.device)[None, :]             # [1, V]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays)
    before = probs.cumsum(dim=-1) - probs
    keep = keep & (before < top_p.float()[:, None])
    # min-p: drop tokens less likely than min_p times the most likely one
    keep = keep & (probs >= min_p.float()[:, None] * probs[:, :1])
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True), ids


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
           stream: int = STREAM_SAMPLE) -> torch.Tensor:
    """One token per row [B] int64: argmax where temperature == 0, else an inverse-CDF draw.

    logits [B, V]; position [B] is the position the sampled token will occupy (the draw's counter).
    """
    greedy = logits.argmax(dim=-1)
    probs, ids = filtered_probs(logits, temperature, top_k, top_p, min_p)
    cdf = probs.cumsum(dim=-1)                                                      # [B, V]
    u = uniform(seed, position, stream) * cdf[:, -1]                                # [B]
    # first rank whose cdf exceeds u: always a kept token, since cdf only rises at kept ranks
    rank = torch.searchsorted(cdf, u[:, None].contiguous(), right=True).clamp(max=cdf.shape[-1] - 1)
    drawn = ids.gather(1, rank).squeeze(1)
    return torch.where(temperature > 0, drawn, greedy)
