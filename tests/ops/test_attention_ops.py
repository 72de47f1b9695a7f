"""graphopt::mla_attention: both forms against a float64 reference, the branch choice, masks, fake impl."""

import pytest
import torch
from torch.export import Dim

from graphopt.ops.attention import ABSORB_MAX_TOKENS, mla_attention_absorbed, mla_attention_expanded


H, DN, R, RP, DV = 4, 16, 32, 8, 12
SCALE = (DN + RP) ** -0.5


def inputs(B=2, T=3, S=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    kv_b = r(H * (DN + DV), R) * 0.2
    w = kv_b.view(H, DN + DV, R)
    return dict(q_nope=r(B, T, H, DN), q_pe=r(B, T, H, RP), latent=r(B, S, R), k_pe=r(B, S, RP), kv_b_weight=kv_b,
                w_uk=w[:, :DN], w_uv=w[:, DN:])


def causal(B, T, S, start):
    """Queries at positions start .. start+T-1 see keys at positions <= their own: [B, 1, T, S] bool."""
    q = start[:, None] + torch.arange(T)[None, :]
    return (torch.arange(S)[None, None, :] <= q[:, :, None])[:, None]


def reference64(a, mask):
    """Textbook MLA in float64: expand full per-head keys [nope ; rope] and values, then attend."""
    d = {k: v.double() for k, v in a.items()}
    B, S = d["latent"].shape[:2]
    kv = (d["latent"] @ d["kv_b_weight"].T).view(B, S, H, DN + DV)
    keys = torch.cat([kv[..., :DN], d["k_pe"][:, :, None].expand(B, S, H, RP)], dim=-1)
    query = torch.cat([d["q_nope"], d["q_pe"]], dim=-1)
    scores = torch.einsum("bthd,bshd->bhts", query, keys) * SCALE
    scores = scores.masked_fill(~mask, float("-inf")) if mask is not None else scores
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), kv[..., DN:])


def op(a, mask, threshold=ABSORB_MAX_TOKENS):
    return torch.ops.graphopt.mla_attention(a["q_nope"], a["q_pe"], a["latent"], a["k_pe"], a["kv_b_weight"],
                                            a["w_uk"], a["w_uv"], mask, SCALE, threshold)


@pytest.mark.parametrize("T", [1, 4, 12])
def test_both_forms_match_float64_reference(T):
    S = T + 6
    a = inputs(T=T, S=S)
    mask = causal(2, T, S, torch.tensor([S - T, 3]))
    ref = reference64(a, mask)
    expanded = mla_attention_expanded(a["q_nope"], a["q_pe"], a["latent"], a["k_pe"], a["kv_b_weight"], mask, SCALE)
    absorbed = mla_attention_absorbed(a["q_nope"], a["q_pe"], a["latent"], a["k_pe"], a["w_uk"], a["w_uv"], mask, SCALE)
    for got in (expanded, absorbed):
        assert got.shape == (2, T, H, DV) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_op_picks_absorbed_up_to_threshold_and_expanded_above():
    for T, form in ((ABSORB_MAX_TOKENS, "absorbed"), (ABSORB_MAX_TOKENS + 1, "expanded")):
        a = inputs(T=T, S=T + 4)
        mask = causal(2, T, T + 4, torch.tensor([4, 2]))
        args = (a["q_nope"], a["q_pe"], a["latent"], a["k_pe"])
        absorbed = mla_attention_absorbed(*args, a["w_uk"], a["w_uv"], mask, SCALE)
        expanded = mla_attention_expanded(*args, a["kv_b_weight"], mask, SCALE)
        assert not torch.equal(absorbed, expanded)       # the two forms round differently ...
        got = op(a, mask)
        assert torch.equal(got, absorbed if form == "absorbed" else expanded)   # ... so the branch shows
    a = inputs(T=3)
    assert torch.equal(op(a, None, threshold=0), mla_attention_expanded(
        a["q_nope"], a["q_pe"], a["latent"], a["k_pe"], a["kv_b_weight"], None, SCALE))


def test_bool_and_additive_masks_agree_and_mask_future_keys():
    a = inputs(T=3, S=9)
    visible = causal(2, 3, 9, torch.tensor([3, 6]))
    additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(op(a, visible), op(a, additive))
    b = {**a, "latent": a["latent"].clone(), "k_pe": a["k_pe"].clone()}
    b["latent"][0, 6:] += 100.0        # keys after the last query of row 0 (position 5) must not matter
    b["k_pe"][0, 6:] -= 50.0
    torch.testing.assert_close(op(b, visible)[0], op(a, visible)[0])
    assert not torch.allclose(op(b, None)[0], op(a, None)[0])


def test_bf16_close_to_reference():
    a = inputs(T=2, dtype=torch.bfloat16)
    mask = causal(2, 2, 11, torch.tensor([8, 3]))
    got = op(a, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), reference64(a, mask), rtol=0.05, atol=0.05)


def test_fake_impl_keeps_batch_and_tokens_symbolic():
    class Attn(torch.nn.Module):
        def forward(self, q_nope, q_pe, latent, k_pe, kv_b, w_uk, w_uv):
            return torch.ops.graphopt.mla_attention(q_nope, q_pe, latent, k_pe, kv_b, w_uk, w_uv, None, SCALE)

    a = inputs(B=3, T=4, S=6)
    B, T, S = Dim("B"), Dim("T"), Dim("S")
    ep = torch.export.export(Attn(), tuple(a.values()), strict=False, dynamic_shapes=(
        {0: B, 1: T}, {0: B, 1: T}, {0: B, 1: S}, {0: B, 1: S}, None, None, None))
    node = next(n for n in ep.graph.nodes if n.target is torch.ops.graphopt.mla_attention.default)
    shape = node.meta["val"].shape
    assert all(isinstance(s, torch.SymInt) for s in shape[:2]) and tuple(shape[2:]) == (H, DV)
    assert ep.module()(*inputs(B=1, T=9, S=9).values()).shape == (1, 9, H, DV)


@pytest.mark.parametrize("bad, message", [
    ("w_uk", r"w_uk must be \[H, dn, R\]"),
    ("k_pe", r"q_pe \[B, T, H, r\] and k_pe \[B, S, r\] disagree"),
    ("kv_b_weight", r"kv_b_weight must be \[H \* \(dn \+ dv\), R\]"),
])
def test_bad_shapes_name_the_argument(bad, message):
    a = inputs()
    a[bad] = {"w_uk": a["w_uk"][:, :-1], "k_pe": a["k_pe"][..., :-2], "kv_b_weight": a["kv_b_weight"][:-1]}[bad]
    with pytest.raises(ValueError, match=message):
        op(a, None)
