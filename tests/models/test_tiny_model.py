"""The shipped default model (graphopt/models/tiny): loads, is a genuine small DeepSeek-V3, works."""

import json
from pathlib import Path

import pytest
import torch

import graphopt.models
from graphopt.models.checkpoint import load
from graphopt.models.evaluate import HELDOUT_TEXT, perplexity
from graphopt.models.generate import greedy_generate
from graphopt.models.tokenizer import load_tokenizer

TINY_DIR = Path(graphopt.models.__file__).parent / "tiny"
# float32 CPU perplexity of the first 4 windows of 256 held-out tokens, measured when the model shipped
SLICE_PERPLEXITY = 36.38


@pytest.fixture(scope="module")
def model():
    return load(dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_default_load_is_bf16_with_float32_routers():
    model = load()
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0  # balancing moved it


def test_is_a_genuine_small_deepseek_v3(model):
    c = model.config
    assert c.model_type == "deepseek_v3" and c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid"
    assert c.num_hidden_layers >= 4 and c.first_k_dense_replace == 1
    assert c.q_lora_rank is not None and c.kv_lora_rank > 0 and c.qk_rope_head_dim > 0
    assert c.n_routed_experts >= 8 and c.num_experts_per_tok >= 2 and c.n_shared_experts == 1
    assert c.n_group >= 2 and 1 <= c.topk_group < c.n_group
    assert c.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    assert c.vocab_size == 8192 and c.max_position_embeddings >= 2048
    # the MTP module shares the main embedding and head, as in DeepSeek-V3
    assert model.mtp[0].embed_tokens is model.model.embed_tokens
    assert model.mtp[0].shared_head.head is model.lm_head
    assert 12e6 <= sum(p.numel() for p in model.parameters()) <= 16e6


def test_files_fit_the_size_budget():
    names = {p.name for p in TINY_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.json"} <= names
    assert sum(p.stat().st_size for p in TINY_DIR.iterdir() if p.is_file()) <= 32_000_000
    log = json.loads((TINY_DIR / "train_log.json").read_text())
    config = json.loads((TINY_DIR / "config.json").read_text())
    assert config.pop("torch_dtype") == "bfloat16"     # what save() records: the weights' dtype, not the log's
    assert log["config"] == config
    assert "H200" in log["device"] and log["train_seconds"] <= 360


def test_heldout_perplexity_slice(model, tokenizer):
    ids = tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8"))[: 4 * 256]
    assert perplexity(model, ids, window=256, batch_size=4) == pytest.approx(SLICE_PERPLEXITY, rel=0.03)


def test_greedy_completion_is_deterministic_text(model, tokenizer):
    prompt = tokenizer.encode("def fibonacci(n):")
    first = greedy_generate(model, prompt, 24, eos_token_id=tokenizer.eos_token_id)
    second = greedy_generate(model, prompt, 24, eos_token_id=tokenizer.eos_token_id)
    assert first == second and len(first) > 0
    text = tokenizer.decode(first)
    assert isinstance(text, str) and text.strip()
    assert all(0 <= t < model.config.vocab_size for t in first)
