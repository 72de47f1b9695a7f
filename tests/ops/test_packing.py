"""graphopt/ops/packing.py: the byte layout of packed int4 / int2 weights, round trips and bad input."""

import pytest
import torch

from graphopt.ops.packing import pack_int2, pack_int4, unpack_int2, unpack_int4


def test_int4_layout_is_low_nibble_first_with_signed_values_offset_by_8():
    v = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    p = pack_int4(v)
    # nibbles v + 8 = 0, 15, 8, 7: byte 0 = 0 | 15 << 4, byte 1 = 8 | 7 << 4
    assert p.dtype == torch.uint8 and p.tolist() == [[0xF0, 0x78]]
    codes = torch.tensor([[3, 12]], dtype=torch.uint8)               # unsigned codes kept as they are
    assert pack_int4(codes).tolist() == [[0xC3]]


@pytest.mark.parametrize("signed", [True, False])
def test_int4_round_trip_over_every_value_and_stacked_shapes(signed):
    lo, hi, dtype = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    v = torch.randint(lo, hi, (3, 5, 64), generator=torch.Generator().manual_seed(0), dtype=dtype)
    p = pack_int4(v)
    assert p.shape == (3, 5, 32)
    assert torch.equal(unpack_int4(p, signed), v)
    assert torch.equal(unpack_int4(p[1], signed), v[1])               # expert slices of the packed tensor
    assert torch.equal(unpack_int4(p[:, 2:4], signed), v[:, 2:4])     # row slices (tensor parallelism)


def test_int4_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="must be even"):
        pack_int4(torch.zeros(2, 7, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8 .* or uint8"):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))


def test_int2_round_trip():
    v = torch.randint(0, 4, (4, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert pack_int2(v).shape == (4, 8)
    assert torch.equal(unpack_int2(pack_int2(v)), v)
