"""Reference model: parity with transformers, cache path == plain path, export-ability, bad input."""

import pytest
import torch

from graphopt.models.config import ConfigError, DeepseekV3Config
from graphopt.models.deepseek import DeepseekV3ForCausalLM
from graphopt.models.generate import greedy_generate
from graphopt.models.hf_interop import from_transformers
from graphopt.models.random import random_config, random_model

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
HF_CASES = [  # q_lora_rank, n_group, topk_group, first_k_dense_replace, yarn, norm_topk_prob
    (None, 1, 1, 1, False, True),
    (32, 4, 2, 1, True, False),
    (32, 2, 1, 2, True, True),
    (None, 4, 2, 2, True, False),
]


def _hf_model(q_lora, n_group, topk_group, first_dense, yarn, norm, seed):
    torch.manual_seed(seed)
    rope = YARN if yarn else {"rope_type": "default", "rope_theta": 10000.0}
    cfg = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=q_lora, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=n_group,
        topk_group=topk_group, first_k_dense_replace=first_dense, norm_topk_prob=norm,
        max_position_embeddings=256, rope_parameters=rope, routed_scaling_factor=2.5)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # make routing input-dependent and the bias matter
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if name.endswith("mlp.gate.weight"):
                t.normal_(0, 0.5)
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.05)
    return hf


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_transformers(case):
    hf = _hf_model(*case, seed=len(str(case)))
    ours = from_transformers(hf)
    ids = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert got.shape == (2, 37, 97)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_from_transformers_shares_parameters():
    hf = _hf_model(32, 4, 2, 1, False, True, seed=0)
    ours = from_transformers(hf)
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.data_ptr() == theirs[name].data_ptr(), name
    with torch.no_grad():  # an in-place change on the HF side is seen by ours
        hf.lm_head.weight.mul_(0)
    with torch.no_grad():
        assert float(ours(torch.tensor([[1, 2, 3]])).abs().max()) == 0.0


def test_from_transformers_rejects_other_models():
    with pytest.raises(TypeError, match="DeepseekV3ForCausalLM"):
        from_transformers(torch.nn.Linear(2, 2))


def _paged_forward(model, ids_chunks, block_size=4):
    """Feed chunks through the paged cache with a shuffled block table; return all logits."""
    total = sum(len(c) for c in ids_chunks)
    n_blocks = -(-total // block_size)
    caches = model.new_kv_caches(n_blocks + 3, block_size)
    blocks = torch.randperm(n_blocks + 2, generator=torch.Generator().manual_seed(0))[:n_blocks] + 1
    outs, start = [], 0
    for chunk in ids_chunks:
        pos = torch.arange(start, start + len(chunk))
        slots = blocks[pos // block_size] * block_size + pos % block_size
        outs.append(model(torch.tensor([chunk]), pos[None], caches, slots[None], blocks[None]))
        start += len(chunk)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunks", [[20], [7, 1, 1, 1], [5, 3, 4, 1, 1]])
def test_paged_cache_matches_plain_forward(model, chunks):
    ids = torch.randint(0, 97, (sum(chunks),), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        plain = model(torch.tensor([ids]))
        it = iter(ids)
        paged = _paged_forward(model, [[next(it) for _ in range(n)] for n in chunks])
    torch.testing.assert_close(paged, plain, rtol=1e-5, atol=1e-5)


def test_padding_tokens_write_only_to_the_sink(model):
    """A batch where sequence 1 has one real token and one pad (slot 0) must leave its context alone."""
    bs = 4
    caches = model.new_kv_caches(4, bs)
    tables = torch.tensor([[1], [2]])
    ids = torch.tensor([[5, 6], [7, 0]])
    pos = torch.tensor([[0, 1], [0, 0]])
    slots = torch.tensor([[4, 5], [8, 0]])
    with torch.no_grad():
        batched = model(ids, pos, caches, slots, tables)
        alone = model(torch.tensor([[7]]))
    torch.testing.assert_close(batched[1, 0], alone[0, 0], rtol=1e-5, atol=1e-5)
    assert caches[0][2, 1:].abs().sum() == 0  # nothing but position 0 written in sequence 1's block


def test_greedy_generate_with_cache_equals_recompute(model):
    prompt = [3, 14, 15, 92, 65]
    got = greedy_generate(model, prompt, 12)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_mtp_forward_uses_hidden_and_next_token(model):
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        _, hidden = model(ids, return_hidden=True)
        logits, h = model.mtp_forward(0, ids[:, 1:], hidden[:, :-1])
        other, _ = model.mtp_forward(0, (ids[:, 1:] + 1) % 97, hidden[:, :-1])
    assert logits.shape == (2, 8, 97) and h.shape == (2, 8, 64)
    assert not torch.allclose(logits, other)
    with pytest.raises(ValueError, match="MTP depth 1"):
        model.mtp_forward(1, ids[:, 1:], hidden[:, :-1])


def test_mtp_is_causal(model):
    """Changing a later token must not change earlier MTP predictions."""
    ids = torch.randint(0, 97, (1, 10))
    ids2 = ids.clone()
    ids2[0, -1] = (ids2[0, -1] + 1) % 97
    with torch.no_grad():
        a = model.mtp_forward(0, ids[:, 1:], model(ids, return_hidden=True)[1][:, :-1])[0]
        b = model.mtp_forward(0, ids2[:, 1:], model(ids2, return_hidden=True)[1][:, :-1])[0]
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


@pytest.mark.parametrize("method,scoring", [("greedy", "softmax"), ("group_limited_greedy", "softmax"),
                                            ("noaux_tc", "sigmoid")])
def test_routing_methods_pick_valid_groups(method, scoring):
    m = random_model(topk_method=method, scoring_func=scoring, n_group=4, topk_group=2)
    gate = m.model.layers[1].mlp.gate
    weights, ids = gate(torch.randn(50, 64))
    assert ids.shape == (50, 2) and weights.shape == (50, 2)
    if method != "greedy":  # the chosen experts lie in at most topk_group groups
        groups = ids // 2
        assert all(len(set(g.tolist())) <= 2 for g in groups)


def test_v2_lite_style_config_runs():
    cfg = random_config(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy",
                        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                        n_group=1, topk_group=1, num_nextn_predict_layers=0)
    m = DeepseekV3ForCausalLM(cfg).init_weights(0).eval()
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, 97)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        DeepseekV3Config.from_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="unknown config key.*hiden_size"):
        DeepseekV3Config.from_dict({"hiden_size": 4})
    with pytest.raises(ConfigError, match="topk_method.*supported"):
        random_config(topk_method="aux_free")
    with pytest.raises(ConfigError, match="n_group"):
        random_config(n_group=3)
    with pytest.raises(ConfigError, match="hidden_act"):
        random_config(hidden_act="gelu")


def test_config_reads_hf_json_spellings():
    cfg = DeepseekV3Config.from_dict({**random_config().to_dict(), "rope_scaling": None,
                                      "rope_parameters": dict(YARN), "transformers_version": "5.0"})
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 4.0
    assert DeepseekV3Config.from_dict(cfg.to_dict()) == cfg


def test_prompt_longer_than_max_positions_is_refused(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        greedy_generate(model, [1] * 250, 10)


def test_cache_argument_shapes_are_checked(model):
    caches = model.new_kv_caches(4, 4)
    with pytest.raises(ValueError, match="slot_mapping: expected shape"):
        model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), caches, torch.tensor([[4]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="kv_caches: expected 3"):
        model(torch.tensor([[1]]), torch.tensor([[0]]), caches[:2], torch.tensor([[4]]), torch.tensor([[1]]))


def test_model_exports_without_graph_breaks(model):
    caches = model.new_kv_caches(6, 4)
    args = (torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), caches, torch.tensor([[4, 5, 6]]),
            torch.tensor([[1, 2]]))
    ep = torch.export.export(model, args).run_decompositions({})  # functional form
    mutated = [s for s in ep.graph_signature.output_specs if s.kind.name == "USER_INPUT_MUTATION"]
    assert len(mutated) == 3  # every layer's cache is updated in place


def test_token_ids_outside_the_vocabulary_are_refused(model):
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids hold token ids in \[0, {V}\]; .* \[0, {V}\)"):
        model(torch.tensor([[0, 5, V]]))
    with pytest.raises(ValueError, match=rf"input_ids hold token ids in \[-1, 5\]; .* \[0, {V}\)"):
        model(torch.tensor([[-1, 5]]))
    hidden = model.hidden_states(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=rf"next_ids hold token ids in \[2, {V + 3}\]"):
        model.mtp_forward(0, torch.tensor([[2, V + 3]]), hidden)
    assert model(torch.tensor([[0, V - 1]])).shape == (1, 2, V)    # both ends of the range are fine


def test_deep_copying_a_captured_graph_is_silent_but_leafspec_still_warns():
    # torch 2.13 deprecates pytree.LeafSpec; deepcopy of export's graph meta rebuilds them (copyreg).
    # A subprocess, because pytest's own filterwarnings setting already hides the warning here.
    import subprocess
    import sys

    code = ("import copy, graphopt.models\n"
            "from torch.utils._pytree import tree_flatten, LeafSpec\n"
            "copy.deepcopy(tree_flatten(1)[1])\n"
            "print('deepcopy: silent', flush=True)\n"
            "LeafSpec()\n")
    run = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert "deepcopy: silent" in run.stdout, run.stderr
    assert run.returncode != 0 and "FutureWarning" in run.stderr   # the filter is that narrow
