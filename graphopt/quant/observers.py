"""Activation observers: what calibration remembers about the input of every targeted matmul.

An `Observer` sees input activations [..., K] (a linear) or [E, N, K] (per-expert inputs of the
stacked down projection, `per_expert=True`) and keeps, in memory bounded by the config, not by the
data:
  * amax      per-channel abs-max, [K] or [E, K]  (SmoothQuant / FlexSmooth / static scales / C8);
  * hist      histogram of |x| over `bins` bins on [0, hist_max] (static activation thresholds);
              the range grows by re-binning old counts when a larger value arrives;
  * samples   a uniform random sample of at most `max_rows` token rows, [R, K] or [E, R, K]
              (output-error searches: FlexSmooth, clipping). Priority sampling: every row draws a
              random key and the largest keys are kept, which is uniform over all rows seen.
  * tokens    how many token rows were observed (per expert: every expert sees every token).

Statistics live on the device of the observed activations (the model's device), so the algorithms
that read them (smoothing, clipping, static scales, C8) compute beside the weights they combine with;
only the sampling keys come from a CPU generator (reproducible on every device) and are moved once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Observer", "mse_threshold"]


class Observer:
    def __init__(self, name: str, max_rows: int = 512, bins: int = 1024, per_expert: bool = False,
                 seed: int = 0):
        self.name, self.max_rows, self.bins, self.per_expert = name, max_rows, bins, per_expert
        self.amax: Tensor | None = None
        self.hist = torch.zeros(bins, dtype=torch.float64, device="cpu")   # moves to the data's device
        self.hist_max = 0.0
        self.samples: Tensor | None = None
        self._keys: Tensor | None = None
        self.tokens = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        x = x.detach().float()
        rows = x.reshape(x.shape[0], -1, x.shape[-1]) if self.per_expert else x.reshape(1, -1, x.shape[-1])
        amax = rows.abs().amax(dim=1)                                           # [E or 1, K]
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.tokens += rows.shape[1]
        self._add_histogram(rows.abs())
        self._add_samples(rows)

    def _add_histogram(self, a: Tensor) -> None:
        top = float(a.max())
        if self.hist.device != a.device:
            self.hist = self.hist.to(a.device)
        if top > self.hist_max:
            self.hist = _rebin(self.hist, self.hist_max, top) if self.hist_max > 0 else self.hist
            self.hist_max = top
        if self.hist_max > 0:
            self.hist += torch.histc(a.flatten(), self.bins, 0.0, self.hist_max).double()

    def _add_samples(self, rows: Tensor) -> None:
        keys = torch.rand(rows.shape[1], generator=self._gen, device="cpu").to(rows.device)
        if self.samples is not None:
            rows, keys = torch.cat([self.samples, rows], dim=1), torch.cat([self._keys, keys])
        if keys.numel() > self.max_rows:
            keep = keys.topk(self.max_rows).indices.sort().values
            rows, keys = rows[:, keep], keys[keep]
        self.samples, self._keys = rows, keys

    # -- what the algorithms read -------------------------------------------------------------
    def channel_amax(self) -> Tensor:
        """[K], or [E, K] for per-expert observers."""
        self._require()
        return self.amax if self.per_expert else self.amax[0]

    def rows(self) -> Tensor:
        """Sampled input rows: [R, K], or [E, R, K] for per-expert observers."""
        self._require()
        return self.samples if self.per_expert else self.samples[0]

    def _require(self) -> None:
        if self.amax is None:
            raise RuntimeError(f"observer {self.name!r} saw no data: calibration did not reach this "
                               "matmul (is it on a path the calibration inputs run?)")


def _rebin(hist: Tensor, old_max: float, new_max: float) -> Tensor:
    """Move counts of bins on [0, old_max] into the same number of bins on [0, new_max] (by centre)."""
    bins = hist.numel()
    if old_max == new_max:
        return hist.clone()
    centres = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) * (old_max / bins)
    target = (centres / new_max * bins).long().clamp_(max=bins - 1)
    return torch.zeros(bins, dtype=torch.float64, device=hist.device).index_add_(0, target, hist)


def mse_threshold(hist: Tensor, hist_max: float, qmax: int = 127, candidates: int = 64) -> float:
    """The clipping threshold t <= hist_max that minimises the expected squared error of symmetric
    int quantisation with step t / qmax, estimated from a histogram of |x| (bin centres as values)."""
    if hist_max <= 0:
        return 1e-8
    bins = hist.numel()
    centres = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) * (hist_max / bins)
    best_t, best_err = hist_max, float("inf")
    for i in range(candidates):
        t = hist_max * (1.0 - 0.7 * i / candidates)          # search down to 30% of the maximum
        step = t / qmax
        clipped = (centres - t).clamp(min=0)
        rounding = torch.where(centres <= t, torch.full_like(centres, step * step / 12), clipped ** 2)
        err = float((hist * rounding).sum())
        if err < best_err:
            best_t, best_err = t, err
    return best_t
