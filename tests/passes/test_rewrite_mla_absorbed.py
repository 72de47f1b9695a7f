"""rewrite_mla_absorbed: graphopt's reference MLA, transformers' DeepseekV3Attention and an older
transformers layout become graphopt.mla_attention (numerics, op counts); Llama-style attention and an
MLA variant with its own value projection do not."""

import copy

import pytest
import torch
from torch.export import Dim

from graphopt.capture.step import StepInputFactory
from graphopt.passes.base import PassContext, count_ops
from graphopt.passes.invariants import check_invariants
from graphopt.passes.rewrite_mla_absorbed import RewriteMLAAbsorbedPass

transformers = pytest.importorskip("transformers")
MLA_OP = "graphopt.mla_attention.default"


def rewrite(gm):
    gm = copy.deepcopy(gm)
    before = count_ops(gm)
    result = RewriteMLAAbsorbedPass().run(gm, PassContext())
    gm.recompile()
    return gm, result, before, count_ops(gm)


def changed(before, after):
    """Op count differences, leaving out capture's metadata asserts (present or not, by capture version)."""
    keys = (set(before) | set(after)) - {"aten._assert_tensor_metadata.default"}
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if before.get(k, 0) != after.get(k, 0)}


def export(module, args, dynamic=None):
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False).run_decompositions({}).module()


def test_reference_model_graph(main_fp32, run):
    # verify mode: the manager runs the graph before and after on fresh inputs (3 query tokens: the
    # absorbed branch) and compares outputs and written caches with the pass's tolerance
    ran = run(main_fp32, [RewriteMLAAbsorbedPass()])
    rec = ran.record("rewrite_mla_absorbed")
    assert rec.matches == 2 and not rec.notes and rec.max_error < 1e-5
    # per layer: kv_b_proj's linear, its split, two score einsums + add + scale, the mask, softmax and
    # the value einsum become one op, plus two slices of a view of the kv_b weight (W_UK, W_UV; views)
    assert changed(rec.ops_before, rec.ops_after) == {
        MLA_OP: 2, "aten.softmax.int": -2, "aten.einsum.default": -6, "aten.linear.default": -2,
        "aten.split_with_sizes.default": -2, "getitem": -4, "aten.add.Tensor": -2, "aten.mul.Tensor": -2,
        "aten.masked_fill.Scalar": -2, "aten.bitwise_not.default": -2, "aten.slice.Tensor": 4}
    # 12 query tokens: the expanded branch (prefill)
    factory = StepInputFactory(main_fp32.model, 16, batch=3, tokens=12)
    ref_args, got_args = factory.main(7), factory.main(7)
    with torch.no_grad():
        ref, got = main_fp32.fresh()(*ref_args), ran.graph_module(*got_args)
    for a, b in zip([*ref, *ref_args[4]], [*got, *got_args[4]]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_bf16_graph_with_casts(main_bf16, run):
    ran = run(main_bf16, [RewriteMLAAbsorbedPass()])         # verify mode, bf16 tolerance
    rec = ran.record("rewrite_mla_absorbed")
    assert rec.matches == 1 and changed(rec.ops_before, rec.ops_after)[MLA_OP] == 1
    assert changed(rec.ops_before, rec.ops_after)["aten._to_copy.default"] < 0      # the casts went with it


def hf_deepseek():
    cfg = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(cfg).eval()


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids, use_cache=False).logits


def test_transformers_deepseek_v3_attention():
    model = Logits(hf_deepseek())
    gm = export(model, (torch.randint(0, 97, (2, 6)),), ({1: Dim("seq", min=2, max=64)},))
    new, result, before, after = rewrite(gm)
    assert result.matches == 1 and not result.notes
    delta = changed(before, after)
    assert delta[MLA_OP] == 1 and delta["aten.softmax.int"] == -1 and delta["aten.matmul.default"] == -2
    assert delta["aten.linear.default"] == -1 and delta["aten.new_empty.default"] == -1
    check_invariants(new, "after rewrite_mla_absorbed")
    for T in (5, 12):   # absorbed and expanded branches, one graph (the sequence length is symbolic)
        ids = torch.randint(0, 97, (2, T))
        with torch.no_grad():
            torch.testing.assert_close(new(ids), model(ids), rtol=1e-4, atol=1e-5)


class OlderLayoutMLA(torch.nn.Module):
    """MLA as earlier transformers releases wrote it (keys by torch.cat, heads before tokens, additive
    causal mask); `own_values=True` gives values their own projection: not MLA any more."""

    def __init__(self, own_values=False, H=4, dn=16, r=8, dv=12, R=32, D=64):
        super().__init__()
        self.H, self.dn, self.r, self.dv = H, dn, r, dv
        self.q_proj = torch.nn.Linear(D, H * (dn + r), bias=False)
        self.kv_a = torch.nn.Linear(D, R + r, bias=False)
        self.kv_b = torch.nn.Linear(R, H * (dn + dv), bias=False)
        self.v_proj = torch.nn.Linear(R, H * dv, bias=False) if own_values else None

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, -1).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.dn, self.r], dim=-1)
        latent, k_rot = torch.split(self.kv_a(x), [self.kv_b.in_features, self.r], dim=-1)
        kv = self.kv_b(latent).view(B, T, self.H, -1).transpose(1, 2)
        k_pass, v = torch.split(kv, [self.dn, self.dv], dim=-1)
        if self.v_proj is not None:
            v = self.v_proj(latent).view(B, T, self.H, self.dv).transpose(1, 2)
        k_rot = k_rot.view(B, 1, T, self.r).expand(-1, self.H, -1, -1)
        query, key = torch.cat((q_pass, q_rot), dim=-1), torch.cat((k_pass, k_rot), dim=-1)
        mask = torch.full((T, T), float("-inf")).triu(1)
        scores = torch.matmul(query, key.transpose(2, 3)) * 0.2 + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(B, T, -1)


def test_older_transformers_layout_with_cat_keys():
    torch.manual_seed(1)
    module, x = OlderLayoutMLA().eval(), torch.randn(2, 5, 64)
    new, result, before, after = rewrite(export(module, (x,)))
    assert result.matches == 1 and changed(before, after)[MLA_OP] == 1
    with torch.no_grad():
        torch.testing.assert_close(new(x), module(x), rtol=1e-4, atol=1e-5)


def test_llama_attention_is_not_rewritten():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    gm = export(Logits(transformers.LlamaForCausalLM(cfg).eval()), (torch.randint(0, 97, (2, 6)),))
    new, result, before, after = rewrite(gm)
    assert result.matches == 0 and not result.modified and before == after
    assert len(result.notes) == 1 and "is not a concatenation of a no-rope and a rope part" in result.notes[0]


def test_values_with_their_own_projection_are_not_mla():
    gm = export(OlderLayoutMLA(own_values=True).eval(), (torch.randn(2, 5, 64),))
    new, result, before, after = rewrite(gm)
    assert result.matches == 0 and before == after
    assert "is not one half of a split of expanded keys/values" in result.notes[0]   # the values
