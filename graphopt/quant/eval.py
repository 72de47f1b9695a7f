"""Accuracy of a quantised model against its 16-bit original, on token windows.

    stats = compare(base_model, {"w8a8": qmodel}, windows)["w8a8"]   # windows [n, T] int64
    stats.ppl, stats.kl, stats.top1, stats.mtp_accept               # quantised model
    stats.base_ppl, stats.base_mtp_accept                           # the original
    stats.ci["kl"]                                                   # (low, high): 95% bootstrap interval

  perplexity  exp(mean next-token cross entropy) over non-overlapping windows (no cache, full
              causal attention inside each window; the first token of a window is context only);
  kl          mean over positions of KL(base || quant) of the next-token distributions, in nats;
  top1        fraction of positions where both models' argmax agree;
  mtp_accept  teacher-forced greedy acceptance of the first MTP draft: the draft for token t+2 (MTP
              at position t, fed the true token t+1 and the main model's hidden state at t) equals
              the same model's main argmax for token t+2 (its logits at position t+1). That is the
              test speculative decoding applies, on text instead of the model's own continuation.

Prefill / decode weights (`PrefillDecode`): a compiled model with `QuantConfig(prefill_scheme=...)`
prefills with one weight set and decodes with another. `PrefillDecode(prefill, decode, prefix)` runs a
window that way: the prefill model writes the paged KV cache of the first `prefix` tokens, the decode
model runs the rest over that cache; `compare(..., score_from=prefix)` then scores only the decoded
positions (every model, the base included, on the same positions).

Intervals (`bootstrap_interval`): every measure is a function of sums over windows (`MEASURES`), and
the per-window sums are kept (`EvalStats.per_window`), so the bootstrap resamples whole windows
exactly: each resample draws n of the n windows with replacement (seeded), the measure is computed on
the drawn windows' sums, and the interval is the percentile interval of those values. Windows, not
tokens, are the unit because tokens of one window are correlated. Paired: the base model's sums are
drawn with the same windows, so the changes (ppl_change, mtp_accept_change) carry no base noise twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["EvalStats", "MEASURES", "PrefillDecode", "compare", "windows_from", "kl_divergence", "bootstrap_interval",
           "shared_span_windows"]

RESAMPLES, LEVEL = 1000, 0.95

# each measure as a function of window sums (tensors, [resamples] or scalars): one formula for the
# point estimate (every window once) and for each bootstrap resample
MEASURES = {
    "kl": lambda s: s["kl"] / s["tokens"],
    "top1": lambda s: s["agree"] / s["tokens"],
    "ppl_change": lambda s: torch.exp((s["nll"] - s["base_nll"]) / s["tokens"]) - 1,   # ppl / base_ppl - 1
    "mtp_accept": lambda s: s["hits"] / s["drafts"],
    "mtp_accept_change": lambda s: (s["hits"] - s["base_hits"]) / s["drafts"],
}


@dataclass
class EvalStats:
    ppl: float
    base_ppl: float
    kl: float
    top1: float
    mtp_accept: float | None
    base_mtp_accept: float | None
    tokens: int
    windows: int = 0
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)   # MEASURES name -> (low, high)
    level: float = LEVEL
    per_window: dict[str, Tensor] = field(default_factory=dict, repr=False)   # column -> [windows] sums

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change, (ppl - base) / base."""
        return self.ppl / self.base_ppl - 1.0

    def as_dict(self) -> dict:
        """JSON-friendly: every figure and its interval (the per-window sums left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_window"}
        out["ci"] = {k: list(v) for k, v in self.ci.items()}
        return {**out, "ppl_change": self.ppl_change}


def bootstrap_interval(measure, per_window: dict[str, Tensor], resamples: int = RESAMPLES, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `measure` (window sums -> value) over windows.

    per_window: column -> [n] per-window sums. Each of `resamples` draws n window indices with
    replacement (seeded); the measure gets every column summed over the drawn windows ([resamples]);
    the interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of its values."""
    n = len(next(iter(per_window.values())))
    if n < 1 or resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_interval: need windows >= 1, resamples >= 1, 0 < level < 1; "
                         f"got {n}, {resamples}, {level}")
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, n, (resamples, n), generator=gen)                       # [B, n] window ids
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(resamples, n, dtype=torch.float64))                      # [B, n] times drawn
    values = measure({k: counts @ v.double() for k, v in per_window.items()})          # [B]
    low, high = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(low), float(high)


def windows_from(ids: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows [n, seq_len] from a 1-D id stream (the tail that does not fill one is dropped)."""
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def shared_span_windows(windows: Tensor, ids: Tensor, span: int = 32) -> int:
    """How many of `windows` [n, T] contain a run of `span` consecutive tokens that also occurs in the
    stream `ids`: 0 says calibration windows and an evaluation slice share no text of that length."""
    def runs(x: Tensor) -> set[bytes]:
        b = x.to(torch.int32).contiguous().numpy().tobytes()                       # 4 bytes per id
        return {b[4 * i: 4 * (i + span)] for i in range(len(x) - span + 1)}
    seen = runs(ids.flatten())
    return sum(bool(runs(w) & seen) for w in windows)


class PrefillDecode(nn.Module):
    """A window as a compiled split model runs it: `prefill` (one quantised copy) writes the paged KV cache
    of positions [0, prefix), `decode` (another) runs positions [prefix, T) over that cache in one chunk.
    Under per-token activation scales (every scheme here) a chunk equals decoding its tokens one at a
    time, up to float summation order. Logits and hidden states of both parts, concatenated; the MTP
    module is the decode model's (drafts are made while decoding)."""

    def __init__(self, prefill: nn.Module, decode: nn.Module, prefix: int, block_size: int = 16):
        super().__init__()
        if prefix < 1:
            raise ValueError(f"PrefillDecode: prefix must be >= 1 token, got {prefix}")
        self.prefill, self.decode, self.prefix, self.block_size = prefill, decode, prefix, block_size
        self.mtp = getattr(decode, "mtp", ())
        self.lm_head = decode.lm_head

    def forward(self, ids: Tensor, return_hidden: bool = False):
        b, T = ids.shape
        if T <= self.prefix:
            raise ValueError(f"PrefillDecode: windows of {T} tokens leave nothing to decode after {self.prefix}")
        bs = self.block_size
        n = -(-T // bs)
        caches = self.decode.new_kv_caches(b * n + 1, bs)                        # block 0: padding sink
        tables = 1 + torch.arange(b * n, device=ids.device).view(b, n)
        pos = torch.arange(T, device=ids.device).expand(b, T)
        slots = tables.gather(1, pos // bs) * bs + pos % bs
        parts = [model(ids[:, span], pos[:, span], caches, slots[:, span], tables, return_hidden=True)
                 for model, span in ((self.prefill, slice(None, self.prefix)), (self.decode, slice(self.prefix, None)))]
        logits, hidden = (torch.cat(x, dim=1) for x in zip(*parts))
        return (logits, hidden) if return_hidden else logits

    def mtp_forward(self, *args, **kwargs):
        return self.decode.mtp_forward(*args, **kwargs)


def _forward(model: nn.Module, ids: Tensor, score_from: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token log-probs [b, T-1-score_from, V] and per-window sums [b] (nll, tokens, MTP hits and
    drafts) of the predictions made at positions score_from .. T-2."""
    logits, hidden = model(ids, return_hidden=True)                               # [b, T, V], [b, T, H]
    s = score_from
    logp = F.log_softmax(logits[:, s:-1].float(), dim=-1)                         # predicts ids[:, s+1:]
    b = ids.shape[0]
    sums = {"nll": -logp.gather(-1, ids[:, s + 1:, None]).sum((1, 2)).double(),
            "tokens": torch.full((b,), ids.shape[1] - 1 - s, dtype=torch.float64),
            "hits": torch.zeros(b, dtype=torch.float64), "drafts": torch.zeros(b, dtype=torch.float64)}
    if len(getattr(model, "mtp", ())) and ids.shape[1] > 2 + s:
        draft_logits, _ = model.mtp_forward(0, ids[:, 1:], hidden[:, :-1])       # position t -> token t+2
        draft = draft_logits[:, s:-1].argmax(-1)                                  # t = s .. T-3
        target = logits[:, s + 1:-1].argmax(-1)                                   # main at t+1 -> token t+2
        sums["hits"] = (draft == target).sum(1).double()
        sums["drafts"] = torch.full((b,), draft.shape[1], dtype=torch.float64)
    return logp, {k: v.cpu() for k, v in sums.items()}


@torch.no_grad()
def compare(base: nn.Module, models: dict[str, nn.Module], windows: Tensor, batch: int = 4,
            progress: bool = False, resamples: int = RESAMPLES, seed: int = 0,
            level: float = LEVEL, score_from: int = 0) -> dict[str, EvalStats]:
    """Evaluate every model in `models` against `base` on `windows` [n, T], one batch at a time for
    all of them (memory: one batch of log-probs per model, whatever the number of windows), with a
    `level` bootstrap interval over windows for every measure (`bootstrap_interval`; resamples=0: none).
    score_from: score only the predictions made at positions >= score_from (PrefillDecode's prefix)."""
    if not 0 <= score_from < windows.shape[1] - 1:
        raise ValueError(f"compare: score_from must be in [0, {windows.shape[1] - 2}] for windows of "
                         f"{windows.shape[1]} tokens, got {score_from}")
    dev = base.lm_head.weight.device
    cols: dict[str, dict[str, list[Tensor]]] = {name: {} for name in models}
    # counts window forwards (base + each model), so a single batch still moves the bar
    bar = tqdm(total=len(windows) * (1 + len(models)), desc=f"evaluate (base + {len(models)})", unit="window",
               delay=2.0, disable=not progress)
    for i in range(0, len(windows), batch):
        ids = windows[i: i + batch].to(dev)
        p, ref = _forward(base, ids, score_from)
        bar.update(len(ids))
        for name, model in models.items():
            q, sums = _forward(model, ids, score_from)
            sums["kl"] = (p.exp() * (p - q)).sum((1, 2)).double().cpu()
            sums["agree"] = (p.argmax(-1) == q.argmax(-1)).sum(1).double().cpu()
            sums["base_nll"], sums["base_hits"] = ref["nll"], ref["hits"]
            for k, v in sums.items():
                cols[name].setdefault(k, []).append(v)
            bar.update(len(ids))
    bar.close()
    return {name: _stats({k: torch.cat(v) for k, v in c.items()}, resamples, seed, level)
            for name, c in cols.items()}


def _stats(per_window: dict[str, Tensor], resamples: int, seed: int, level: float) -> EvalStats:
    total = {k: v.sum() for k, v in per_window.items()}
    tokens = float(total["tokens"])
    has_mtp = float(total["drafts"]) > 0
    accept = lambda hits: float(hits) / float(total["drafts"]) if has_mtp else None   # noqa: E731
    names = [m for m in MEASURES if has_mtp or not m.startswith("mtp")]
    ci = {m: bootstrap_interval(MEASURES[m], per_window, resamples, seed, level) for m in names} if resamples else {}
    return EvalStats(ppl=math.exp(float(total["nll"]) / tokens), base_ppl=math.exp(float(total["base_nll"]) / tokens),
                     kl=float(MEASURES["kl"](total)), top1=float(MEASURES["top1"](total)),
                     mtp_accept=accept(total["hits"]), base_mtp_accept=accept(total["base_hits"]),
                     tokens=int(tokens), windows=len(per_window["tokens"]), ci=ci, level=level,
                     per_window=per_window)


def kl_divergence(base_logits: Tensor, quant_logits: Tensor) -> float:
    """Mean KL(base || quant) over all positions of two logits tensors [..., V]."""
    p = F.log_softmax(base_logits.float(), dim=-1)
    q = F.log_softmax(quant_logits.float(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())
