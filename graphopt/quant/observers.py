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
  * tokens    how many token rows were observed.

Per-expert observers see routed data (`observe_routed(x [E, N, K], routed [E, N])`): expert e's
statistics come from the tokens the router sent to it. An expert that received fewer than
`min_routed` tokens over the whole calibration falls back to dense statistics (every token), kept
alongside at small cost:
  * amax      routed and dense abs-max, [E, K] each; `channel_amax()` picks per expert;
  * samples   one reservoir per expert of `max_rows` rows, keyed u + routed (u uniform in [0, 1)):
              an expert's routed rows come first (a uniform sample of them) and the rest are the
              top-u other tokens, so the top-u rows of the reservoir are exactly a uniform sample
              of all tokens (the dense fallback; exact because min_routed <= max_rows). `rows()`
              gives [E, R, K]: an expert with fewer than R rows of its own repeats them cyclically
              (each row weighted R / n, within one copy), so no zero padding reaches the searches;
  * hist      over routed rows (per-expert static scales are computed from each expert's rows);
  * expert_tokens  routed rows per expert, [E]; `dense_experts()` lists the fallback experts.
`observe(x)` on a per-expert observer counts every token as routed to every expert.

A shared input that per-expert weights read (the experts' gate_up: every expert reads the token
itself) keeps one set of statistics for the one smoothing vector and static scale of the fused op,
plus, after `track_routed_rows()`, a per-expert `routed_rows` observer fed by
`observe_routed_rows(x [N, K], routed [E, N])`: each expert's routed token rows (same reservoir and
fallback rule as above, no histogram), for the weight searches that judge expert e's weight on the
inputs it actually gets (clipping: `Target.search_rows`).

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
                 seed: int = 0, min_routed: int = 16):
        if per_expert and not 1 <= min_routed <= max_rows:
            raise ValueError(f"observer {name!r}: min_routed must be in [1, max_rows={max_rows}], got {min_routed}")
        self.name, self.max_rows, self.bins, self.per_expert = name, max_rows, bins, per_expert
        self.min_routed, self.seed = min_routed, seed
        self.routed_rows: Observer | None = None      # track_routed_rows(): per-expert rows of a shared input
        self.amax: Tensor | None = None
        self.amax_dense: Tensor | None = None         # per expert: over every token, for the fallback
        self.expert_tokens: Tensor | None = None      # per expert: routed rows seen, [E]
        self.hist = torch.zeros(bins, dtype=torch.float64, device="cpu")   # moves to the data's device
        self.hist_max = 0.0
        self.samples: Tensor | None = None
        self._keys: Tensor | None = None
        self.tokens = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        if self.per_expert:
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            return self.observe_routed(rows, torch.ones(rows.shape[:2], dtype=torch.bool, device=x.device))
        x = x.detach().float()
        rows = x.reshape(1, -1, x.shape[-1])
        amax = rows.abs().amax(dim=1)                                           # [1, K]
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.tokens += rows.shape[1]
        self._add_histogram(rows.abs())
        self._add_samples(rows)

    @torch.no_grad()
    def observe_routed(self, x: Tensor, routed: Tensor) -> None:
        """x [E, N, K] every expert's input on every token; routed [E, N] bool: the router's choice."""
        if not self.per_expert:
            raise ValueError(f"observer {self.name!r} is not per expert: routed observation needs [E, N, K]")
        x = x.detach().float()
        routed = routed.to(device=x.device, dtype=torch.bool)
        a = x.abs()                                                             # [E, N, K]
        amax = (a * routed.unsqueeze(-1)).amax(dim=1)                           # [E, K], 0 where unrouted
        self._add_expert_stats(amax, a.amax(dim=1), routed.sum(dim=1))
        self.tokens += x.shape[1]
        if bool(routed.any()):
            self._add_histogram(a[routed])
        self._add_samples(x, routed)

    def track_routed_rows(self) -> "Observer":
        """Also keep each expert's routed rows of this shared input (`routed_rows`); returns self."""
        if self.per_expert:
            raise ValueError(f"observer {self.name!r} is per expert already: routed rows are for a shared input")
        if self.routed_rows is None:
            self.routed_rows = Observer(f"{self.name} (routed rows)", self.max_rows, self.bins, per_expert=True,
                                        seed=self.seed + 1, min_routed=self.min_routed)
        return self

    @torch.no_grad()
    def observe_routed_rows(self, x: Tensor, routed: Tensor) -> None:
        """x [N, K] the input every expert reads; routed [E, N] bool. Per expert: routed abs-max (dense
        alongside), routed counts, a reservoir of routed rows; no [E, N, K] tensor is formed (the batch's
        top max_rows keys per expert are picked first, then their rows gathered)."""
        if not self.per_expert:
            raise ValueError(f"observer {self.name!r} is not per expert: routed rows need a per-expert observer")
        x = x.detach().float().reshape(-1, x.shape[-1])
        routed = routed.to(device=x.device, dtype=torch.bool)
        a = x.abs()
        dense = a.amax(dim=0).expand(routed.shape[0], -1).clone()                 # [E, K]
        amax = torch.stack([a[r].amax(dim=0) if bool(r.any()) else torch.zeros_like(a[0]) for r in routed])
        self._add_expert_stats(amax, dense, routed.sum(dim=1))
        self.tokens += x.shape[0]
        keys = torch.rand(x.shape[0], generator=self._gen, device="cpu").to(x.device) + routed   # [E, N]
        keys, pick = keys.topk(min(self.max_rows, x.shape[0]), dim=1)              # [E, R'] per expert
        self._add_expert_samples(x[pick], keys)                                    # rows [E, R', K]

    def _add_expert_stats(self, amax: Tensor, dense: Tensor, counts: Tensor) -> None:
        """Fold one batch's per-expert routed / dense abs-max [E, K] and routed counts [E] in."""
        if self.amax is None:
            self.amax, self.amax_dense, self.expert_tokens = amax, dense, counts
        else:
            self.amax, self.amax_dense = torch.maximum(self.amax, amax), torch.maximum(self.amax_dense, dense)
            self.expert_tokens = self.expert_tokens + counts

    def _add_histogram(self, a: Tensor) -> None:
        top = float(a.max())
        if self.hist.device != a.device:
            self.hist = self.hist.to(a.device)
        if top > self.hist_max:
            self.hist = _rebin(self.hist, self.hist_max, top) if self.hist_max > 0 else self.hist
            self.hist_max = top
        if self.hist_max > 0:
            self.hist += torch.histc(a.flatten(), self.bins, 0.0, self.hist_max).double()

    def _add_samples(self, rows: Tensor, routed: Tensor | None = None) -> None:
        keys = torch.rand(rows.shape[1], generator=self._gen, device="cpu").to(rows.device)
        if routed is not None:
            return self._add_expert_samples(rows, keys + routed)                 # [E, N]: routed rows first
        if self.samples is not None:
            rows, keys = torch.cat([self.samples, rows], dim=1), torch.cat([self._keys, keys])
        if keys.numel() > self.max_rows:
            keep = keys.topk(self.max_rows).indices.sort().values
            rows, keys = rows[:, keep], keys[keep]
        self.samples, self._keys = rows, keys

    def _add_expert_samples(self, rows: Tensor, keys: Tensor) -> None:
        """Per expert, keep the max_rows largest keys (rows [E, N, K], keys [E, N] in [0, 2))."""
        if self.samples is not None:
            rows, keys = torch.cat([self.samples, rows], dim=1), torch.cat([self._keys, keys], dim=1)
        if keys.shape[1] > self.max_rows:
            keys, keep = keys.topk(self.max_rows, dim=1)                          # [E, R]
            rows = rows.gather(1, keep.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
        self.samples, self._keys = rows, keys

    # -- what the algorithms read -------------------------------------------------------------
    def channel_amax(self) -> Tensor:
        """[K], or [E, K] for per-expert observers (routed, or dense for the fallback experts)."""
        self._require()
        if not self.per_expert:
            return self.amax[0]
        return torch.where(self._dense_mask().unsqueeze(-1), self.amax_dense, self.amax)

    def rows(self) -> Tensor:
        """Sampled input rows: [R, K], or [E, R, K] for per-expert observers (see the module doc)."""
        self._require()
        if not self.per_expert:
            return self.samples[0]
        E, R, _ = self.samples.shape
        dense = self._dense_mask()
        own = torch.where(dense.unsqueeze(-1), self._keys < 1, self._keys >= 1)    # [E, R] the rows e uses
        if self.tokens > R:             # the reservoir is a sample: the dense rows are the top-u ones
            n_dense = R - torch.minimum(self.expert_tokens, torch.tensor(R, device=dense.device))
            rank = (self._keys % 1).argsort(dim=1, descending=True).argsort(dim=1)  # rank by u, [E, R]
            own = torch.where(dense.unsqueeze(-1), rank < n_dense.unsqueeze(-1), own)
        else:                           # the reservoir holds every token: dense means all of them
            own = own | dense.unsqueeze(-1)
        order = own.to(torch.int8).argsort(dim=1, descending=True, stable=True)     # own rows first
        n = own.sum(dim=1, keepdim=True).clamp_min(1)                                # [E, 1]
        pick = order.gather(1, torch.arange(R, device=n.device).unsqueeze(0) % n)   # cycle own rows
        return self.samples.gather(1, pick.unsqueeze(-1).expand(-1, -1, self.samples.shape[-1]))

    def dense_experts(self) -> list[int]:
        """Experts observed on every token because fewer than min_routed tokens were routed to them."""
        return [] if not self.per_expert or self.amax is None else self._dense_mask().nonzero().flatten().tolist()

    def _dense_mask(self) -> Tensor:
        return self.expert_tokens < self.min_routed

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
