"""HiFloat8 (HiF8): Huawei Ascend's 8-bit tapered-precision float, as plain torch (encode / decode).

Definition: "Ascend HiFloat8 Format for Deep Learning" (Luo et al., arXiv 2409.16626, 2024). A code is
sign | dot | exponent | mantissa, 1 + 7 bits; the prefix-coded dot field says how wide the exponent is,
so the mantissa keeps whatever bits are left:

    dot    D    exponent bits         exponents E            mantissa bits   codes (sign 0)
    11     4    4: sign + 3 (+ lead)  +-[8, 15]              1               0x60-0x7f
    10     3    3: sign + 2 (+ lead)  +-[4, 7]               2               0x40-0x5f
    01     2    2: sign + 1 (+ lead)  +-[2, 3]               3               0x20-0x3f
    001    1    1: sign               +-1                    3               0x10-0x1f
    0001   0    0                     0                      3               0x08-0x0f
    0000   denormal: 3 bits M, value 2^(M - 23), M = 1..7   (2^-22 .. 2^-16)  0x01-0x07

The exponent is sign-magnitude (exponent sign 1 = negative) with the magnitude's leading 1 implicit,
so the five widths cover [-15, 15] without overlap; normal values are (-1)^s 2^E (1 + m / 2^bits).
Specials: 0x00 is the only zero (no -0), 0x80 the only NaN, 0x6f / 0xef +-Inf (the E = 15, m = 1
slot), so the largest finite magnitude is 2^15 = 32768 and the smallest 2^-22: 38 binades, with
3 mantissa bits for |E| <= 3, 2 for 4..7, 1 for 8..15 and 0 in the denormal range.

Positive values are NOT monotonic in code order (0x17 = 3.75 but 0x18 = 0.5: the exponent's sign bit
sits above its magnitude); order is by (dot, exponent, mantissa) within each exponent's slot.

Rounding (encode): the paper's conversion rounding "TA", round to nearest with ties away from zero,
applied at the precision of the input's binade: |x| is rounded to a multiple of 2^(E - bits(E)) with
floor(|x| / q + 1/2). It is round-to-nearest on the HiF8 grid (ties away) everywhere: at a binade
edge the next grid point 2^(E+1) is exactly one quantum above the last one of the binade, and below
2^-22 the grid is {0, 2^-22}, so [2^-23, 2^-22) goes up and smaller magnitudes go to 0. |x| >= 1.25 *
2^15 (half-way to the Inf slot) and +-Inf encode as +-Inf, NaN as 0x80, -0 and negative underflow as
0x00. (The paper's "hybrid rounding" HR is a training-time choice for gradients; not implemented.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HIF8_MAX", "HIF8_MIN", "HIF8_NAN_CODE", "HIF8_INF_CODE", "hif8_mantissa_bits", "hif8_decode",
           "hif8_encode", "hif8_values"]

HIF8_MAX = 32768.0          # 2^15, the largest finite magnitude
HIF8_MIN = 2.0 ** -22       # the smallest non-zero magnitude (denormal)
HIF8_NAN_CODE = 0x80
HIF8_INF_CODE = 0x6F        # | 0x80 for -Inf

# (code prefix of the dot field, its length in bits, exponent width D, lowest exponent magnitude)
_DOTS = ((0b11, 2, 4, 8), (0b10, 2, 3, 4), (0b01, 2, 2, 2), (0b001, 3, 1, 1), (0b0001, 4, 0, 0))


def hif8_mantissa_bits(e: Tensor) -> Tensor:
    """Mantissa width at exponent e (int tensor): 3 for |e| <= 3, 2 to 7, 1 to 15, 0 in the denormal range."""
    a = e.abs()
    return torch.where(a <= 3, 3, torch.where(a <= 7, 2, torch.where(a <= 15, 1, 0)))


def _decode_codes(codes: Tensor) -> Tensor:
    """uint8 codes -> float64 values, field by field (the definition above)."""
    c = codes.to(torch.int64)
    body = c & 0x7F
    out = torch.full(c.shape, float("nan"), dtype=torch.float64)
    for prefix, plen, width, lead in _DOTS:
        rest = 7 - plen                                            # exponent + mantissa bits
        hit = (body >> rest) == prefix
        mbits = rest - width
        m = body & ((1 << mbits) - 1)
        if width:
            field = (body >> mbits) & ((1 << width) - 1)
            negative = field >> (width - 1)
            e = (lead + (field & ((1 << (width - 1)) - 1))) * (1 - 2 * negative)
        else:
            e = torch.zeros_like(body)
        value = torch.ldexp(1.0 + m.double() / (1 << mbits), e.double())
        out = torch.where(hit, value, out)
    denormal = (body >> 3) == 0
    out = torch.where(denormal, torch.ldexp(torch.ones_like(out), (body & 7).double() - 23), out)
    out = torch.where(body == 0, 0.0, out)                         # 0x00; 0x80 (sign + 0) is NaN
    out = torch.where(body == HIF8_INF_CODE, float("inf"), out)
    out = torch.where((c >> 7) == 1, -out, out)
    return torch.where(c == HIF8_NAN_CODE, float("nan"), out)


_VALUES = _decode_codes(torch.arange(256)).float()                 # [256], exact in float32


def hif8_values(device: torch.device | str | None = None) -> Tensor:
    """The value of every code, float32 [256] (index = code): the decode table."""
    return _VALUES if device is None else _VALUES.to(device)


def hif8_decode(codes: Tensor) -> Tensor:
    """HiF8 codes (uint8, any shape) -> float32 values (NaN / +-Inf for the special codes)."""
    return hif8_values(codes.device)[codes.long()]


def hif8_encode(x: Tensor) -> Tensor:
    """Float tensor -> HiF8 codes (uint8, same shape): round to nearest, ties away from zero."""
    finite = torch.isfinite(x)
    a = torch.where(finite, x.double().abs(), 0.0)
    e = torch.frexp(a).exponent.to(torch.int64) - 1                # a = 1.f * 2^e
    e = torch.where(a > 0, e, -30)
    bits = torch.where(e >= -22, hif8_mantissa_bits(e), -1)        # -1 at e = -23: grid {0, 2^-22}
    q = torch.ldexp(torch.ones_like(a), (e - bits).double())       # quantum of a's binade
    v = torch.floor(a / q + 0.5) * q                               # ties away (on the magnitude)
    v = torch.where(e < -23, 0.0, v)

    # v is on the grid: its fields, then the code
    ve = torch.frexp(v).exponent.to(torch.int64) - 1
    vb = hif8_mantissa_bits(ve)
    m = torch.where(v > 0, (torch.ldexp(v, (-ve).double()) - 1) * torch.ldexp(torch.ones_like(v), vb.double()), 0)
    m = m.round().to(torch.int64)
    mag, neg = ve.abs(), (ve < 0).to(torch.int64)
    code = torch.where(mag == 0, 0x08 | m, 0)
    code = torch.where(mag == 1, 0x10 | (neg << 3) | m, code)
    code = torch.where((mag >= 2) & (mag <= 3), 0x20 | (neg << 4) | ((mag - 2) << 3) | m, code)
    code = torch.where((mag >= 4) & (mag <= 7), 0x40 | (neg << 4) | ((mag - 4) << 2) | m, code)
    code = torch.where((mag >= 8) & (mag <= 15), 0x60 | (neg << 4) | ((mag - 8) << 1) | m, code)
    code = torch.where(ve <= -16, ve + 23, code)                   # denormal: M = e + 23
    code = torch.where(v == 0, 0, code)
    code = torch.where((v > HIF8_MAX) | torch.isinf(x), HIF8_INF_CODE, code)
    code = torch.where((x < 0) & (code != 0), code | 0x80, code)   # no -0: 0x80 is NaN
    code = torch.where(torch.isnan(x), HIF8_NAN_CODE, code)
    return code.to(torch.uint8)
