"""Hadamard rotation (QuaRot-style): rotate input channels so outliers spread before quantisation.

W' = W H and x' = x H with H a block-diagonal orthonormal Hadamard (blocks of b channels, b the
largest power of two dividing K, at most max_block): x' W'^T = x H H^T W^T = x W^T. The activation
side is the graphopt::hadamard_transform op in front of the quantiser (computed online; a fast
kernel is a butterfly, O(K log b) per row).
"""

from __future__ import annotations

from graphopt.ops import quant as qops

from ..config import HadamardConfig
from .base import Target, Transformed

__all__ = ["hadamard", "block_for"]


def block_for(k: int, max_block: int) -> int:
    b = 1
    while b * 2 <= max_block and k % (b * 2) == 0:
        b *= 2
    return b


def hadamard(cfg: HadamardConfig, target: Target) -> Transformed:
    b = block_for(target.k, cfg.max_block)
    if b < 2:
        return Transformed(weight=target.weight, meta={"hadamard_block": 0})
    w = qops.hadamard_transform(target.weight, b)     # rotates rows of W: W H
    return Transformed(weight=w, rotate_block=b, meta={"hadamard_block": b})
