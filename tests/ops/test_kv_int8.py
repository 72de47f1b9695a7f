"""C8 cache storage (graphopt/ops/kv_int8.py) and graphopt::mla_paged_attention_int8: the int8 entry
decodes to exactly what the C8-emulated float cache held, and attention over it is bit-equal to
mla_paged_attention over that float cache; bad input is a clear error."""

import pytest
import torch

from graphopt.ops.kv_int8 import decode_kv_int8, encode_kv_int8, int8_kv_dim

from test_paged_attention import ARGS, R, RP, SCALE, inputs, op

OPS = torch.ops.graphopt


def _scale(seed=1):
    return torch.rand(R, generator=torch.Generator().manual_seed(seed)) * 0.02 + 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entry_layout_and_round_trip_equal_the_emulated_float_cache(dtype):
    entry = (torch.randn(5, 7, R + RP, generator=torch.Generator().manual_seed(0)) * 0.5).to(dtype)
    scale = _scale()
    stored = encode_kv_int8(entry, scale, dtype)
    assert stored.dtype == torch.int8 and stored.shape == (5, 7, int8_kv_dim(R, RP, dtype))
    assert int8_kv_dim(512, 64, torch.bfloat16) == 640                     # V3: 1152 bytes in bf16
    codes = OPS.quantize_kv(entry[..., :R], scale)
    assert torch.equal(stored[..., :R], codes)                             # the latent: its int8 codes
    emulated = torch.cat([OPS.dequantize_kv(codes, scale, dtype), entry[..., R:]], dim=-1)
    back = decode_kv_int8(stored, scale, dtype)
    assert back.dtype == dtype and torch.equal(back, emulated)             # the rope part: bit for bit


def test_entry_refuses_float_codes():
    with pytest.raises(ValueError, match="int8 codes of quantize_kv"):
        OPS.kv_int8_entry(torch.zeros(2, R), torch.zeros(2, RP), torch.float32)


@pytest.mark.parametrize("T", [1, 3, 12])                                  # absorbed (T <= 8) and expanded
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_the_int8_cache_equals_the_float_cache_it_encodes(T, dtype):
    a = inputs(T=T, dtype=dtype, seed=T)
    scale = _scale(T)
    stored = encode_kv_int8(a["kv_cache"], scale, dtype)
    emulated = dict(a, kv_cache=decode_kv_int8(stored, scale, dtype))     # what a C8 float cache holds
    args = [a[k] for k in ARGS]
    args[2] = stored
    got = OPS.mla_paged_attention_int8(*args[:3], scale, dtype, *args[3:], SCALE, 8)
    assert got.dtype == dtype and torch.equal(got, op(emulated))
    assert not torch.equal(got, op(a))                                     # the codes are coarser than floats


def test_int8_attention_errors_name_the_argument():
    a = inputs()
    args = [a[k] for k in ARGS]
    with pytest.raises(ValueError, match="kv_cache must be int8"):
        OPS.mla_paged_attention_int8(*args[:3], _scale(), torch.float32, *args[3:], SCALE, 8)
    args[2] = encode_kv_int8(a["kv_cache"], _scale(), torch.float32)
    with pytest.raises(ValueError, match=r"kv_scale must be the latent's per-channel scales \[R = 24\]"):
        OPS.mla_paged_attention_int8(*args[:3], torch.ones(RP), torch.float32, *args[3:], SCALE, 8)
    with pytest.raises(ValueError, match=r"kv_cache must be int8 \[num_blocks, block_size, R \+ r \* rope itemsize\]"):
        OPS.mla_paged_attention_int8(*args[:3], _scale(), torch.bfloat16, *args[3:], SCALE, 8)   # 40 != 24 + 16
