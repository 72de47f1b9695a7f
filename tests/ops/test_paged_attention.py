"""graphopt::mla_paged_attention: bit-equal to the model's gather + mla_attention, right in float64,
the fake impl under torch.export, errors that name the argument."""

import pytest
import torch
from torch.export import Dim

import graphopt.ops.paged_attention  # noqa: F401  defines the op (until ops/__init__ imports the module)
from graphopt.ops.paged_attention import mla_paged_attention_reference

ARGS = ("q_nope", "q_pe", "kv_cache", "block_tables", "positions", "kv_b_weight", "w_uk", "w_uv")
H, DN, RP, R, DV = 4, 16, 8, 24, 12          # R not a power of two on purpose
SCALE = (DN + RP) ** -0.5


def inputs(B=3, T=1, bs=4, M=5, dtype=torch.float32, seed=0, num_blocks=32):
    """Random op inputs: block tables take distinct blocks in shuffled order, positions are ragged,
    and row B - 1 is a padding row (all positions 0)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    S = M * bs
    kv_b = r(H * (DN + DV), R) * DN ** -0.5
    w = kv_b.view(H, DN + DV, R)
    last = torch.randint(T - 1, S, (B,), generator=g)                       # each row's last position
    positions = (last[:, None] - T + 1 + torch.arange(T)).clamp(min=0)
    positions[-1] = 0
    return dict(q_nope=r(B, T, H, DN), q_pe=r(B, T, H, RP), kv_cache=r(num_blocks, bs, R + RP),
                block_tables=torch.randperm(num_blocks, generator=g)[:B * M].view(B, M), positions=positions,
                kv_b_weight=kv_b, w_uk=w[:, :DN], w_uv=w[:, DN:])


def op(a, absorb_max_tokens=8):
    return torch.ops.graphopt.mla_paged_attention(*(a[k] for k in ARGS), SCALE, absorb_max_tokens)


def model_gather_then_mla_attention(a):
    """What models/deepseek.py's MLAttention reads from its cache, handed to graphopt::mla_attention."""
    B = a["q_nope"].shape[0]
    context = a["kv_cache"][a["block_tables"]].flatten(1, 2).to(a["q_nope"].dtype)     # [B, S, R + r]
    latent, k_pe = context.split([R, RP], dim=-1)
    key_positions = torch.arange(context.shape[1]).expand(B, -1)
    visible = key_positions[:, None, None, :] <= a["positions"][:, None, :, None]        # [B, 1, T, S]
    return torch.ops.graphopt.mla_attention(a["q_nope"], a["q_pe"], latent, k_pe, a["kv_b_weight"], a["w_uk"],
                                            a["w_uv"], visible, SCALE)


def reference64(a):
    """Textbook attention in float64: key j of row b is cache[block_tables[b, j // bs], j % bs], expanded
    to per-head keys [latent W_UK^T ; k_pe] and values latent W_UV^T, visible iff j <= position."""
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in a.items()}
    B, M = d["block_tables"].shape
    bs = d["kv_cache"].shape[1]
    j = torch.arange(M * bs)
    entries = d["kv_cache"][d["block_tables"][:, j // bs], j % bs]                        # [B, S, R + r]
    latent, k_pe = entries[..., :R], entries[..., R:]
    keys = torch.cat([torch.einsum("bsr,hdr->bshd", latent, d["w_uk"]),
                      k_pe[:, :, None].expand(-1, -1, H, -1)], dim=-1)
    values = torch.einsum("bsr,hvr->bshv", latent, d["w_uv"])
    scores = torch.einsum("bthd,bshd->bhts", torch.cat([d["q_nope"], d["q_pe"]], dim=-1), keys) * SCALE
    visible = j[None, None, None, :] <= d["positions"][:, None, :, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshv->bthv", probs, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, bs, M", [(1, 4, 5), (3, 4, 5), (12, 8, 3), (3, 16, 2)])
def test_bit_equal_to_model_gather_and_mla_attention(T, bs, M, dtype):
    for seed in range(3):
        a = inputs(T=T, bs=bs, M=M, dtype=dtype, seed=seed)
        got = op(a)
        assert got.shape == (3, T, H, DV) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, model_gather_then_mla_attention(a))
        assert torch.equal(got, mla_paged_attention_reference(*(a[k] for k in ARGS), SCALE))


@pytest.mark.parametrize("T", [1, 3, 12])           # absorbed, absorbed, expanded
def test_float64_matches_textbook_attention_over_the_pages(T):
    a = inputs(B=4, T=T, bs=4, M=5, dtype=torch.float64)
    # mla_attention soft-maxes in float32 whatever the input dtype: float32-sized differences remain
    torch.testing.assert_close(op(a), reference64(a), rtol=1e-5, atol=1e-6)


def test_keys_after_a_rows_positions_do_not_matter():
    a = inputs(B=3, T=2, dtype=torch.float64)
    b = {**a, "kv_cache": a["kv_cache"].clone()}
    bs = a["kv_cache"].shape[1]
    for row in range(3):
        for j in range(int(a["positions"][row].max()) + 1, a["block_tables"].shape[1] * bs):
            b["kv_cache"][a["block_tables"][row, j // bs], j % bs] = 1e4
    assert torch.equal(op(a), op(b))
    c = {**a, "kv_cache": a["kv_cache"].clone()}
    c["kv_cache"][a["block_tables"][0, 0], 0] += 1.0          # key 0 is seen by every query
    assert not torch.allclose(op(a)[0], op(c)[0])


def test_threshold_picks_the_form():
    a = inputs(T=3)
    absorbed, expanded = op(a, absorb_max_tokens=8), op(a, absorb_max_tokens=2)
    assert not torch.equal(absorbed, expanded)                # the two forms round differently
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)


def test_fake_impl_under_export_with_dynamic_batch():
    class Paged(torch.nn.Module):
        def forward(self, q_nope, q_pe, kv_cache, block_tables, positions, kv_b, w_uk, w_uv):
            return torch.ops.graphopt.mla_paged_attention(q_nope, q_pe, kv_cache, block_tables, positions,
                                                          kv_b, w_uk, w_uv, SCALE)

    a = inputs(B=3, T=2)
    B = Dim("B", min=1, max=64)
    ep = torch.export.export(Paged(), tuple(a[k] for k in ARGS), strict=False,
                             dynamic_shapes=({0: B}, {0: B}, None, {0: B}, {0: B}, None, None, None))
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.graphopt.mla_paged_attention.default)
    shape = node.meta["val"].shape
    assert isinstance(shape[0], torch.SymInt) and tuple(shape[1:]) == (2, H, DV)
    b = inputs(B=5, T=2, seed=1)
    assert torch.equal(ep.module()(*(b[k] for k in ARGS)), op(b))


@pytest.mark.parametrize("arg, bad, message", [
    ("kv_cache", lambda a: a["kv_cache"][..., :-1], r"kv_cache must be \[num_blocks, block_size, R \+ r\] "
                                                    r"with R \+ r = 24 \+ 8 = 32"),
    ("block_tables", lambda a: a["block_tables"].int(), r"block_tables must be int64, got torch.int32"),
    ("block_tables", lambda a: a["block_tables"][:2], r"block_tables must be \[B, max_blocks\] = \[3, M\]"),
    ("positions", lambda a: a["positions"][:, None], r"positions must be \[B, T\] = \[3, 1\]"),
    ("q_pe", lambda a: a["q_pe"].half(), r"q_pe must have q_nope's dtype torch.float32"),
    ("w_uv", lambda a: a["w_uv"][..., :-1], r"w_uv must be \[H, dv, R\] = \[4, dv, 24\]"),
    ("q_nope", lambda a: a["q_nope"].int(), r"q_nope must be float32, bfloat16, float16 or float64"),
])
def test_bad_inputs_name_the_argument(arg, bad, message):
    a = inputs()
    a[arg] = bad(a)
    with pytest.raises(ValueError, match=message):
        op(a)
