"""Accuracy of a quantised model against its 16-bit original, on token windows.

    stats = compare(base_model, {"w8a8": qmodel}, windows)["w8a8"]   # windows [n, T] int64
    stats.ppl, stats.kl, stats.top1, stats.mtp_accept               # quantised model
    stats.base_ppl, stats.base_mtp_accept                           # the original

  perplexity  exp(mean next-token cross entropy) over non-overlapping windows (no cache, full
              causal attention inside each window; the first token of a window is context only);
  kl          mean over positions of KL(base || quant) of the next-token distributions, in nats;
  top1        fraction of positions where both models' argmax agree;
  mtp_accept  teacher-forced greedy acceptance of the first MTP draft: the draft for token t+2 (MTP
              at position t, fed the true token t+1 and the main model's hidden state at t) equals
              the same model's main argmax for token t+2 (its logits at position t+1). That is the
              test speculative decoding applies, on text instead of the model's own continuation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["EvalStats", "compare", "windows_from", "kl_divergence"]


@dataclass
class EvalStats:
    ppl: float
    base_ppl: float
    kl: float
    top1: float
    mtp_accept: float | None
    base_mtp_accept: float | None
    tokens: int

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change, (ppl - base) / base."""
        return self.ppl / self.base_ppl - 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl_change": self.ppl_change}


def windows_from(ids: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows [n, seq_len] from a 1-D id stream (the tail that does not fill one is dropped)."""
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


class _Tally:
    def __init__(self):
        self.nll, self.tokens, self.hits, self.drafts, self.kl, self.agree = 0.0, 0, 0, 0, 0.0, 0

    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    def accept(self) -> float | None:
        return self.hits / self.drafts if self.drafts else None


def _forward(model: nn.Module, ids: Tensor, tally: _Tally) -> Tensor:
    """Adds one batch's nll and MTP acceptance to `tally`; returns next-token log-probs [b, T-1, V]."""
    logits, hidden = model(ids, return_hidden=True)                               # [b, T, V], [b, T, H]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)                          # predicts ids[:, 1:]
    tally.nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
    tally.tokens += ids[:, 1:].numel()
    if len(getattr(model, "mtp", ())) and ids.shape[1] > 2:
        draft_logits, _ = model.mtp_forward(0, ids[:, 1:], hidden[:, :-1])       # position t -> token t+2
        draft = draft_logits[:, :-1].argmax(-1)                                   # t = 0 .. T-3
        target = logits[:, 1:-1].argmax(-1)                                       # main at t+1 -> token t+2
        tally.hits += int((draft == target).sum())
        tally.drafts += draft.numel()
    return logp


@torch.no_grad()
def compare(base: nn.Module, models: dict[str, nn.Module], windows: Tensor, batch: int = 4,
            progress: bool = False) -> dict[str, EvalStats]:
    """Evaluate every model in `models` against `base` on `windows` [n, T], one batch at a time for
    all of them (memory: one batch of log-probs per model, whatever the number of windows)."""
    dev = base.lm_head.weight.device
    ref, tallies = _Tally(), {name: _Tally() for name in models}
    # counts window forwards (base + each model), so a single batch still moves the bar
    bar = tqdm(total=len(windows) * (1 + len(models)), desc=f"evaluate (base + {len(models)})", unit="window",
               delay=2.0, disable=not progress)
    for i in range(0, len(windows), batch):
        ids = windows[i: i + batch].to(dev)
        p = _forward(base, ids, ref)
        bar.update(len(ids))
        for name, model in models.items():
            q = _forward(model, ids, tallies[name])
            t = tallies[name]
            t.kl += float((p.exp() * (p - q)).sum())
            t.agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            bar.update(len(ids))
    bar.close()
    return {name: EvalStats(t.ppl(), ref.ppl(), t.kl / t.tokens, t.agree / t.tokens, t.accept(), ref.accept(),
                            t.tokens) for name, t in tallies.items()}


def kl_divergence(base_logits: Tensor, quant_logits: Tensor) -> float:
    """Mean KL(base || quant) over all positions of two logits tensors [..., V]."""
    p = F.log_softmax(base_logits.float(), dim=-1)
    q = F.log_softmax(quant_logits.float(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())
