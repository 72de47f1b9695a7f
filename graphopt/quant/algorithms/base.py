"""What every algorithm works on: a `Target` (one linear or stacked expert matmul with its calibration
statistics) and a `Transformed` weight (after smoothing or rotation), plus the output-error measure
the searches minimise.

Shapes: weight [out, K] or [E, out, K]; calibration rows [R, K] (shared input: a linear, or the
experts' gate_up which every expert reads) or [E, R, K] (per-expert input: the experts' down_proj).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from graphopt.ops import quant as qops

from ..config import QuantConfig
from ..observers import Observer
from ..schemes import Scheme, groups_of

__all__ = ["Target", "Transformed", "rows_in_basis", "group_count", "weight_error", "SEARCH_ROWS"]

SEARCH_ROWS = 256  # calibration rows used by output-error searches (the observer may keep more)


@dataclass
class Target:
    name: str
    weight: Tensor               # float32
    bias: Tensor | None
    scheme: Scheme
    config: QuantConfig
    observer: Observer | None    # None: calibration-free (only HQQ / RTN weight-only work without it)
    # [K]: max|W_j| over every smoothed linear reading this input (SmoothQuant scope="input", set by
    # quantize_model); None: over this weight alone
    column_amax: Tensor | None = None

    @property
    def k(self) -> int:
        return self.weight.shape[-1]

    def rows(self) -> Tensor:
        if self.observer is None:
            raise RuntimeError(f"{self.name}: this algorithm needs calibration data and none was observed")
        x = self.observer.rows()
        return x[..., :SEARCH_ROWS, :].float()

    def search_rows(self) -> Tensor:
        """The rows a weight search judges this weight on: per expert its routed rows [E, R, K] where the
        observer keeps them (the experts' gate_up, a shared input), else rows()."""
        routed = getattr(self.observer, "routed_rows", None)
        if routed is None or routed.amax is None:
            return self.rows()
        return routed.rows()[..., :SEARCH_ROWS, :].float()


@dataclass
class Transformed:
    """The float weight the weight method quantises, and how inputs are mapped to its basis:
    x' = hadamard(x * smooth_inv); x' @ weight^T equals x @ W^T in exact arithmetic."""

    weight: Tensor
    smooth_inv: Tensor | None = None      # [K] or [E, 1, K]
    rotate_block: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def rows_in_basis(x: Tensor, t: Transformed) -> Tensor:
    if t.smooth_inv is not None:
        x = x * t.smooth_inv
    if t.rotate_block:
        x = qops.hadamard_transform(x, t.rotate_block)
    return x


def group_count(target: Target) -> int:
    """Scale groups along K for the target's scheme (1 = per output channel)."""
    return groups_of(target.k, target.config.group_size) if target.scheme.grouped else 1


def weight_error(x: Tensor, w: Tensor, wq: Tensor, groups: int) -> Tensor:
    """Output error each (out channel, group) of a quantised weight causes on inputs x.

    x [R, K] or [E, R, K]; w, wq [..., out, K] -> sum_r (x_g (w_g - wq_g)^T)^2, [..., out, groups].
    Groups are treated as independent (cross terms ignored), as in AWQ's clipping search.
    """
    diff = (w - wq).unflatten(-1, (groups, -1))                 # [..., out, G, k]
    xg = x.unflatten(-1, (groups, -1))                         # [..., R, G, k]
    y = torch.einsum("...rgk,...ogk->...rog", xg, diff)          # [..., R, out, G]
    return y.square().sum(dim=-3)
