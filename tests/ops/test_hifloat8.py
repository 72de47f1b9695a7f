"""HiFloat8 encode / decode (graphopt/ops/hifloat8.py) against the bit layout of arXiv 2409.16626.

The expected table is rebuilt here from the published definition by parsing each code as a bit
string (prefix-coded dot field, sign-magnitude exponent with an implicit leading 1, mantissa), not
with the implementation's bit arithmetic, plus values the paper states outright.
"""

import math

import pytest
import torch

from graphopt.ops.hifloat8 import HIF8_INF_CODE, HIF8_MAX, HIF8_MIN, HIF8_NAN_CODE, hif8_decode, hif8_encode

# dot field prefix -> exponent width D (the mantissa gets the rest of the 7 bits)
DOTS = (("11", 4), ("10", 3), ("01", 2), ("001", 1), ("0001", 0))


def reference_value(code: int) -> float:
    bits = f"{code:08b}"
    sign, body = (-1.0 if bits[0] == "1" else 1.0), bits[1:]
    if body.startswith("0000"):                                   # denormal: 2^(M - 23); M = 0 is 0 / NaN
        m = int(body[4:], 2)
        if m == 0:
            return 0.0 if sign > 0 else math.nan
        return sign * 2.0 ** (m - 23)
    prefix, width = next((p, d) for p, d in DOTS if body.startswith(p))
    rest = body[len(prefix):]
    exp_bits, man_bits = rest[:width], rest[width:]
    e = 0 if width == 0 else (-1 if exp_bits[0] == "1" else 1) * int("1" + exp_bits[1:], 2)
    m = int(man_bits, 2) / 2 ** len(man_bits)
    if e == 15 and m > 0:                                         # the top slot is Inf
        return sign * math.inf
    return sign * 2.0 ** e * (1 + m)


TABLE = torch.tensor([reference_value(c) for c in range(256)], dtype=torch.float64)
CODES = torch.arange(256, dtype=torch.uint8)
FINITE = torch.isfinite(TABLE)


def test_decode_matches_the_table_built_from_the_definition():
    got = hif8_decode(CODES)
    assert got.dtype == torch.float32
    got = got.double()
    assert torch.equal(torch.isnan(got), torch.isnan(TABLE))
    assert torch.equal(got[~torch.isnan(TABLE)], TABLE[~torch.isnan(TABLE)])


@pytest.mark.parametrize("code, value", [
    (0x00, 0.0), (0x08, 1.0), (0x0F, 1.875), (0x10, 2.0), (0x18, 0.5), (0x20, 4.0), (0x30, 0.25),
    (0x40, 16.0), (0x60, 256.0), (0x88, -1.0),
    (0x6E, 32768.0),                 # max normal: 2^15
    (0x7E, 2.0 ** -15),              # min normal
    (0x07, 2.0 ** -16), (0x01, 2.0 ** -22),   # denormals: 7 extra binades down to 2^-22
    (0x6F, math.inf), (0xEF, -math.inf),
])
def test_values_the_paper_states(code, value):
    assert float(hif8_decode(torch.tensor([code], dtype=torch.uint8))[0]) == value


def test_special_codes_and_structure():
    v = TABLE
    assert math.isnan(float(v[HIF8_NAN_CODE])) and int(torch.isnan(v).sum()) == 1        # one NaN, one zero (no -0)
    assert int((v == 0).sum()) == 1 and float(v[HIF8_INF_CODE]) == math.inf
    pos = v[1:128]
    assert torch.equal(v[129:256], -pos)                                                    # sign symmetry
    finite = pos[torch.isfinite(pos)]
    assert float(finite.max()) == HIF8_MAX == 2.0 ** 15 and float(finite.min()) == HIF8_MIN == 2.0 ** -22
    assert len(set(v[FINITE].tolist())) == 253                                              # 256 - NaN - 2 Inf
    # tapered precision: values per binade [2^E, 2^(E+1)), 38 binades in all
    per_binade = {e: int(((finite >= 2.0 ** e) & (finite < 2.0 ** (e + 1))).sum()) for e in range(-22, 16)}
    for e, n in per_binade.items():
        want = 8 if abs(e) <= 3 else 4 if abs(e) <= 7 else 2 if abs(e) <= 15 else 1
        assert n == (1 if e == 15 else want), e                                             # 1.5 * 2^15 is Inf
    # monotonic inside each (dot, exponent) slot (and along the denormals), not in code order overall
    slots = {}
    for c in range(1, 128):
        if math.isfinite(reference_value(c)):
            slots.setdefault(c >> _mantissa_bits(c), []).append(float(v[c]))
    assert len(slots) == 1 + 1 + 2 + 4 + 8 + 16                  # denormals, then D = 0..4: 2^D exponents each
    assert all(vals == sorted(vals) and len(set(vals)) == len(vals) for vals in slots.values())
    assert v[0x17] > v[0x18]            # 3.75 then 0.5: the exponent's sign bit sits above its magnitude


def _mantissa_bits(code: int) -> int:
    """Width of the mantissa field of a positive code (the denormals' 3-bit M counts as one)."""
    body = f"{code & 0x7F:07b}"
    if body.startswith("0000"):
        return 3
    return next(7 - len(p) - d for p, d in DOTS if body.startswith(p))


def test_encode_inverts_decode_on_every_code():
    keep = FINITE | torch.isinf(TABLE)
    assert torch.equal(hif8_encode(TABLE[keep].float()), CODES[keep])
    assert torch.equal(hif8_encode(TABLE[keep]), CODES[keep])                               # float64 input too


def _nearest_ties_away(x: torch.Tensor) -> torch.Tensor:
    """Brute force over the table: the closest finite value, a tie going to the larger magnitude."""
    grid = TABLE[FINITE & (TABLE >= 0)].sort().values                                        # [127]
    a = x.double().abs()
    d = (a[:, None] - grid[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    pick = torch.where(d == best, grid[None, :], -1.0).max(dim=1).values
    pick = torch.where(a >= 1.25 * HIF8_MAX, math.inf, pick)                                 # half-way to the Inf slot
    return torch.copysign(pick, x.double())


def test_encode_rounds_to_nearest_with_ties_away_from_zero():
    g = torch.Generator().manual_seed(0)
    mags = torch.exp2(torch.empty(20000, dtype=torch.float64).uniform_(-25, 16.5, generator=g))
    x = (mags * torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)).float()
    grid = TABLE[FINITE & (TABLE >= 0)].sort().values
    mids = ((grid[1:] + grid[:-1]) / 2).float()                                                # exact ties
    x = torch.cat([x, mids, -mids, torch.nextafter(mids, torch.zeros(1)), torch.tensor([1.25 * HIF8_MAX])])
    got = hif8_decode(hif8_encode(x)).double()
    want = _nearest_ties_away(x)
    bad = got != want
    assert not bad.any(), list(zip(x[bad][:5].tolist(), got[bad][:5].tolist(), want[bad][:5].tolist()))
    assert float(hif8_decode(hif8_encode(torch.tensor([2.0 ** -23])))[0]) == 2.0 ** -22    # tie to 0 / 2^-22


def test_encode_special_inputs():
    x = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, -1e-30, 1e30, -40960.0, 40959.0])
    assert hif8_encode(x).tolist() == [0x80, 0x6F, 0xEF, 0x00, 0x00, 0x00, 0x6F, 0xEF, 0x6E]
    y = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(hif8_encode(y), hif8_encode(y.float()))                              # any float dtype


def test_dequantize_lut_with_the_hif8_table_decodes_and_scales_per_group():
    from graphopt.ops import quant  # noqa: F401  registers graphopt::dequantize_lut
    from graphopt.ops.hifloat8 import hif8_values

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 0x6E, (2, 3, 8), generator=g, dtype=torch.uint8)          # finite positives
    scale = torch.rand(2, 3, 2, generator=g) + 0.5                                       # 2 groups of 4
    y = torch.ops.graphopt.dequantize_lut(codes, hif8_values(), scale, torch.bfloat16)
    want = hif8_decode(codes) * scale.repeat_interleave(4, dim=-1)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.to(torch.bfloat16))
    torch.library.opcheck(torch.ops.graphopt.dequantize_lut.default, (codes, hif8_values(), scale, torch.float32))
