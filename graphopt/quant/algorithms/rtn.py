"""Round to nearest on the abs-max grid of the scheme (per channel, per group or per fp8 block)."""

from __future__ import annotations

from ..config import RTNConfig
from ..schemes import quantize_weight
from .base import Target, Transformed

__all__ = ["rtn"]


def rtn(cfg: RTNConfig, target: Target, t: Transformed) -> dict:
    c = target.config
    return quantize_weight(target.scheme, t.weight, c.group_size, c.fp8_block)
