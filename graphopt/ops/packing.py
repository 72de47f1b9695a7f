"""Sub-byte weights packed into bytes, the one layout shared by memory, the Program and saved files.

    int4  [..., K] -> uint8 [..., K/2]: element 2j in the low nibble of byte j, 2j + 1 in the high one.
          Signed values (-8..7, symmetric w4a8 / w4a16) are stored offset by 8 (nibble = v + 8);
          unsigned codes (0..15, HQQ's asymmetric grid, NF4 codes) as they are.
    int2  [..., K] -> uint8 [..., K/4]: element 4j + i in bits 2i, 2i + 1 of byte j (codes 0..3).

Packing is along K (the input dimension), so a weight's output rows, its experts and its scales
keep their shapes: row slicing (tensor parallelism, gate / up halves, expert gathers) works on the
packed tensor unchanged. The quantised ops (graphopt/ops/quant.py) take the packed tensor and unpack
inside, so the weight lives in memory at its scheme's size (w4a8, w4a16, nf4, w2a16).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INT4_OFFSET", "pack_int4", "unpack_int4", "pack_int2", "unpack_int2", "check_packed"]

INT4_OFFSET = 8   # a signed int4 value v is stored as the nibble v + 8


def pack_int4(q: Tensor) -> Tensor:
    """int4 values [..., K] (int8 in [-8, 7] or uint8 in [0, 15]) -> uint8 [..., K/2], low nibble first."""
    if q.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"pack_int4: expected int8 (signed int4) or uint8 (codes 0..15) values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension ({q.shape[-1]}) must be even: two int4 a byte")
    u = (q.to(torch.int16) + (INT4_OFFSET if q.dtype == torch.int8 else 0)).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: Tensor, signed: bool) -> Tensor:
    """uint8 [..., K/2] -> int8 values in [-8, 7] (signed) or uint8 codes in [0, 15], [..., K]."""
    lo, hi = p & 0xF, p >> 4
    u = torch.stack([lo, hi], dim=-1).flatten(-2)
    return (u.to(torch.int16) - INT4_OFFSET).to(torch.int8) if signed else u


def check_packed(op: str, w: Tensor, per_byte: int = 2, k: int | None = None) -> None:
    """A clear error when `w` is not a packed weight (uint8 [..., out, K / per_byte]) for K = `k`."""
    what = {2: "int4 weight must be packed two", 4: "int2 weight must be packed four"}[per_byte]
    if w.dtype != torch.uint8:
        raise ValueError(f"graphopt::{op}: the {what} per byte (uint8 [..., out, K/{per_byte}], "
                         f"graphopt.ops.packing), got {w.dtype} {tuple(w.shape)}")
    if k is not None and per_byte * w.shape[-1] != k:
        raise ValueError(f"graphopt::{op}: x has K={k} but the packed weight {tuple(w.shape)} holds "
                         f"K={per_byte * w.shape[-1]} (packed weights are [..., out, K/{per_byte}])")


def pack_int2(q: Tensor) -> Tensor:
    """int2 values [..., K] (uint8 in [0, 3]) -> uint8 [..., K/4], element 4j + i in bits 2i, 2i + 1."""
    u = q.to(torch.uint8)
    return u[..., 0::4] | (u[..., 1::4] << 2) | (u[..., 2::4] << 4) | (u[..., 3::4] << 6)


def unpack_int2(p: Tensor) -> Tensor:
    return torch.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).flatten(-2)
