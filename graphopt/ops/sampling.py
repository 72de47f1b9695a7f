"""graphopt:: sampling and speculative-acceptance ops: seeded, sync-free, capturable.

A speculative step samples 1+k positions per sequence and decides which drafts to keep without the
host looking at a value, so every op here is plain tensor maths with static shapes:

    sampling_probs(logits [N, V], temperature, top_k, top_p, min_p [N], max_top_k) -> probs [N, V]
    sample_from_probs(probs [N, V], seed [N], position [N])                        -> tokens [N]
    greedy_accept(target_tokens [B, 1+k], draft_tokens [B, k])       -> out [B, 1+k], accepted [B]
    rejection_accept(target_probs [B, 1+k, V], draft_tokens [B, k], draft_probs [B, k, V]?,
                     seed [B], start_pos [B])                         -> out [B, 1+k], accepted [B]

Randomness. Every random number is a counter-based hash of (seed, position, stream, vocab index)
computed with int64 tensor ops (`uniform`): no torch.Generator, no state carried between steps, so a
request draws the same numbers alone or in any batch, and a captured graph replays them. Tokens are
drawn by an exponential race: argmax_v p[v] / E[v] with E[v] = -log(u[v]) ~ Exp(1) picks v with
probability p[v] / sum(p). One uniform per (position, vocab entry) replaces a sorted CDF.

Filtering order (per row, each optional): temperature -> top-k -> top-p over the renormalised
top-k set -> min-p relative to the most likely token. temperature == 0 is greedy: a one-hot at
argmax(logits), the same argmax plain greedy decoding takes, so greedy speculation stays exact.

Cost, and where no sort happens. top-k uses `topk(max_top_k)` (one O(V) selection, its max_top_k
results come out sorted) and top-p for top_k > 0 runs over those candidates only. top_k == 0 with
top_p < 1 needs the nucleus of the whole vocabulary: instead of an O(V log V) sort it bisects on the
float bits of the threshold probability, 31 masked sums over [N, V] (exact: the kept set is the
smallest nucleus, ties kept together). A static graph computes that for every row of a sampling
step, whether or not a row asks for it: a step over N = B * (1+k) positions of V = 129280 costs about
31 * N * V * 4 bytes of reads (~16 MB per position). Steps where every row is greedy use the
greedy-only graph (`SpecStep(sampling=False)`), which runs none of this.

top_k larger than max_top_k is clamped to max_top_k (the runtime should reject such requests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["DEFAULT_MAX_TOP_K", "STREAM_ACCEPT", "STREAM_TOKEN", "greedy_accept", "greedy_accept_maths",
           "leading_run", "rejection_accept",
           "sample_from_probs", "sampling_probs", "uniform"]

DEFAULT_MAX_TOP_K = 256
STREAM_TOKEN = 2    # the draw that picks the token at a position (sampled, resampled or bonus)
STREAM_ACCEPT = 3   # the acceptance test of the draft at a position

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B    # < 2^31: x < 2^32 times it stays below 2^63, no int64 overflow anywhere
_BISECT_STEPS = 31  # float32 bit patterns of probabilities in [0, 1] are < 2^30


def _require(cond, message: str) -> None:
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: message)
    elif not cond:
        raise ValueError(message)


# -- counter-based random numbers -------------------------------------------------------------

def _mix(x: Tensor) -> Tensor:
    """32-bit avalanche hash of int64 values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def uniform(seed: Tensor, position: Tensor, stream: int, index: Optional[Tensor] = None) -> Tensor:
    """float32 in (0, 1), a pure function of (seed, position, stream[, index]).

    seed, position: int64, broadcastable; index (e.g. vocab ids) broadcasts against them with one
    more trailing dimension: seed/position [...] and index [..., C] -> [..., C]. 23 bits of resolution.
    """
    h = _mix((seed & _M32) ^ (stream * 0x9E3779B1 & _M32))
    h = _mix(h ^ ((seed >> 32) & _M32))
    h = _mix(h ^ (position & _M32))
    if index is not None:
        h = _mix(_mix(h.unsqueeze(-1) ^ (index & _M32)))
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def _race(weights: Tensor, seed: Tensor, position: Tensor) -> Tensor:
    # weights [..., V] >= 0 (unnormalised), seed/position [...] -> int64 [...] drawn ~ weights
    vocab = torch.arange(weights.shape[-1], device=weights.device)
    exp = -torch.log(uniform(seed, position, STREAM_TOKEN, vocab))               # [..., V] ~ Exp(1)
    return (weights.float() / exp).argmax(dim=-1)


# -- the target distribution ------------------------------------------------------------------

def _check_rows(op: str, logits: Tensor, **rows: Tensor) -> None:
    _require(logits.dim() == 2, f"graphopt.{op}: expected [N, V], got shape {tuple(logits.shape)}")
    for name, t in rows.items():
        _require(t.dim() == 1 and t.shape[0] == logits.shape[0],
                 f"graphopt.{op}: {name} must be [N] = [{logits.shape[0]}], got shape {tuple(t.shape)}")


def _nucleus_threshold(probs: Tensor, top_p: Tensor) -> Tensor:
    """Largest float t with sum(probs[probs >= t]) >= top_p, per row; by bisection on float bits.

    probs [N, V] >= 0 -> t [N, 1] float32. Non-negative floats order like their int32 bit patterns,
    so 31 halvings of the bit range find t exactly, without sorting the vocabulary.
    """
    bits = probs.contiguous().view(torch.int32)                                   # [N, V]
    lo = torch.zeros_like(bits[:, 0])                                             # t = 0 keeps all
    hi = bits.max(dim=-1).values + 1                                              # keeps nothing
    for _ in range(_BISECT_STEPS):
        mid = lo + (hi - lo) // 2
        mass = torch.where(bits >= mid[:, None], probs, torch.zeros_like(probs)).sum(dim=-1)
        ok = mass >= top_p
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo.view(torch.float32)[:, None]


def _top_k_top_p(z: Tensor, top_k: Tensor, top_p: Tensor, max_top_k: int) -> Tensor:
    """Keep-mask [N, V] for rows with top_k > 0: top-k, then top-p over the renormalised top-k."""
    kc = min(max_top_k, z.shape[-1])
    values = z.topk(kc, dim=-1).values                                            # [N, kc] descending
    k = top_k.clamp(1, kc)
    rank = torch.arange(kc, device=z.device)[None, :]
    cand = (values - values[:, :1]).exp() * (rank < k[:, None])                   # unnormalised probs
    cand = cand / cand.sum(dim=-1, keepdim=True)
    before = cand.cumsum(dim=-1) - cand                                           # mass ranked above
    nucleus = (rank < k[:, None]) & ((before < top_p[:, None]) | (top_p[:, None] >= 1))
    last = (nucleus.sum(dim=-1, keepdim=True) - 1).clamp(min=0)                   # rank 0 stays, even for
    return z >= values.gather(1, last)                                            # a top_p <= 0 (invalid) row


@torch.library.custom_op("graphopt::sampling_probs", mutates_args=())
def sampling_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
                   max_top_k: int = DEFAULT_MAX_TOP_K) -> Tensor:
    """The distribution each row samples from, float32 [N, V] summing to 1 (one-hot when greedy)."""
    _check_rows("sampling_probs", logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    _require(max_top_k >= 1, f"graphopt.sampling_probs: max_top_k must be >= 1, got {max_top_k}")
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    z = logits / t[:, None]                                                       # [N, V]
    probs = z.softmax(dim=-1)
    top_p = top_p.float()
    keep_k = _top_k_top_p(z, top_k, top_p, max_top_k)
    keep_full = (probs >= _nucleus_threshold(probs, top_p)) | (top_p[:, None] >= 1)
    keep = torch.where((top_k > 0)[:, None], keep_k, keep_full)
    pmax = probs.max(dim=-1, keepdim=True).values
    keep = (keep & (probs >= min_p.float()[:, None] * pmax)) | (probs == pmax)   # the best token stays
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return torch.where(greedy[:, None], onehot, probs)


@sampling_probs.register_fake
def _(logits, temperature, top_k, top_p, min_p, max_top_k=DEFAULT_MAX_TOP_K):
    _check_rows("sampling_probs", logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("graphopt::sample_from_probs", mutates_args=())
def sample_from_probs(probs: Tensor, seed: Tensor, position: Tensor) -> Tensor:
    """One token per row, int64 [N], drawn from probs [N, V] with the (seed, position) noise."""
    _check_rows("sample_from_probs", probs, seed=seed, position=position)
    return _race(probs, seed, position)


@sample_from_probs.register_fake
def _(probs, seed, position):
    _check_rows("sample_from_probs", probs, seed=seed, position=position)
    return probs.new_empty(probs.shape[:1], dtype=torch.int64)


# -- acceptance ---------------------------------------------------------------------------------

def _emitted(drafts: Tensor, accepted: Tensor, last: Tensor) -> Tensor:
    # drafts [B, k], accepted [B] (leading drafts kept), last [B] -> [B, 1+k], -1 after the last token
    B, k = drafts.shape
    idx = torch.arange(k + 1, device=drafts.device)[None, :]
    padded = torch.cat([drafts, drafts.new_full((B, 1), -1)], dim=1)
    out = torch.where(idx < accepted[:, None], padded, torch.full_like(padded, -1))
    return torch.where(idx == accepted[:, None], last[:, None], out)


def leading_run(ok: Tensor) -> Tensor:
    """ok [B, k] bool -> [B] int64: how many leading entries are True, i.e. the index of the first False
    (k when there is none). One min reduction, no scan: Inductor fuses it with its neighbours and ONNX
    has it as Where + ReduceMin."""
    B, k = ok.shape
    idx = torch.arange(k + 1, device=ok.device)
    stops = torch.cat([~ok, ok.new_ones(B, 1)], dim=1)                           # a stop after the last draft
    return torch.where(stops, idx, k + 1).amin(dim=1)


def greedy_accept_maths(target_tokens: Tensor, draft_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """graphopt::greedy_accept without its argument checks: what a backend inlines into its step graph."""
    accepted = leading_run(draft_tokens == target_tokens[:, :-1])
    last = target_tokens.gather(1, accepted[:, None]).squeeze(1)
    return _emitted(draft_tokens, accepted, last), accepted


def _check_accept(op: str, target: Tensor, drafts: Tensor) -> None:
    _require(drafts.dim() == 2 and target.dim() >= 2 and target.shape[0] == drafts.shape[0]
             and target.shape[1] == drafts.shape[1] + 1,
             f"graphopt.{op}: target must be [B, 1+k, ...] for draft_tokens [B, k], got "
             f"{tuple(target.shape)} and {tuple(drafts.shape)}")


@torch.library.custom_op("graphopt::greedy_accept", mutates_args=())
def greedy_accept(target_tokens: Tensor, draft_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Keep drafts while draft i == target argmax at i-1; then the target's token (correction/bonus).

    target_tokens [B, 1+k] (argmax of each verified position), draft_tokens [B, k] ->
    out [B, 1+k] (accepted drafts, then one target token, then -1), accepted [B] in 0..k.
    """
    _check_accept("greedy_accept", target_tokens, draft_tokens)
    return greedy_accept_maths(target_tokens, draft_tokens)


@greedy_accept.register_fake
def _(target_tokens, draft_tokens):
    _check_accept("greedy_accept", target_tokens, draft_tokens)
    return target_tokens.new_empty(target_tokens.shape), target_tokens.new_empty(target_tokens.shape[:1])


@torch.library.custom_op("graphopt::rejection_accept", mutates_args=())
def rejection_accept(target_probs: Tensor, draft_tokens: Tensor, draft_probs: Optional[Tensor],
                     seed: Tensor, start_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Speculative sampling: the emitted tokens are distributed exactly as the target's.

    target_probs [B, 1+k, V]: index j predicts the token at position start_pos + 1 + j. Draft x at
    index j is accepted with probability min(1, p(x) / q(x)) (q = draft_probs, or one-hot when
    None: greedy drafts); the first rejection is replaced by a draw from normalize(max(0, p - q)); if
    all k pass, a bonus token is drawn from p at index k. Returns out [B, 1+k], accepted [B].
    """
    _check_accept("rejection_accept", target_probs, draft_tokens)
    B, k1, V = target_probs.shape
    k = k1 - 1
    p = target_probs.float()
    pos = start_pos[:, None] + 1 + torch.arange(k1, device=p.device)[None, :]    # [B, 1+k]
    q = (draft_probs.float() if draft_probs is not None
         else torch.nn.functional.one_hot(draft_tokens, V).float())               # [B, k, V]
    px = p[:, :k].gather(2, draft_tokens[..., None]).squeeze(-1)                  # [B, k]
    qx = q.gather(2, draft_tokens[..., None]).squeeze(-1)
    u = uniform(seed[:, None], pos[:, :k], STREAM_ACCEPT)                        # [B, k]
    accepted = leading_run(u * qx < px)                                          # u < p/q, leading run
    residual = (p[:, :k] - q).clamp_min(0)                                        # [B, k, V]
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:, :k])
    replacement = torch.cat([residual, p[:, k:]], dim=1)                          # [B, 1+k, V]
    drawn = _race(replacement, seed[:, None].expand(B, k1), pos)                 # [B, 1+k]
    last = drawn.gather(1, accepted[:, None]).squeeze(1)
    return _emitted(draft_tokens, accepted, last), accepted


@rejection_accept.register_fake
def _(target_probs, draft_tokens, draft_probs, seed, start_pos):
    _check_accept("rejection_accept", target_probs, draft_tokens)
    B, k1 = target_probs.shape[:2]
    return draft_tokens.new_empty((B, k1)), draft_tokens.new_empty((B,))
