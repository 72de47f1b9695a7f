"""CUDA checks (skipped without a GPU): the embedded model in bf16 on
the GPU against the float32 CPU reference, and compiled generation (plain and speculative) on the GPU
token-identical to the eager reference decoding on the same device."""

import pytest
import torch

import graphopt
from graphopt.models import load
from graphopt.models.generate import greedy_generate

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def models():
    cpu = load(dtype=torch.float32)
    gpu = load(dtype=torch.float32, device="cuda")
    return cpu, gpu


def test_bf16_gpu_logits_close_to_fp32_cpu(models):
    cpu, _ = models
    gpu16 = load(dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, cpu.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(ids).double()
        got = gpu16(ids.cuda()).double().cpu()
    # bf16 activations through 6 layers + MTP-free head: measured 3.8% on the H200 (torch 2.11)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 5e-2, f"relative error {rel:.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("k", [0, 1, 3])
def test_compiled_generate_on_gpu_is_token_identical(models, k):
    _, gpu = models
    spec = graphopt.SpecConfig(num_speculative_tokens=k) if k else None
    compiled = graphopt.compile(gpu, spec=spec)
    prompts = [[1, 500, 600, 700], [1, 42], [1, 9, 8, 7, 6, 5, 4, 3, 2]]
    out = compiled.generate(prompts, max_new_tokens=24)
    assert out == [greedy_generate(gpu, p, 24) for p in prompts]
    if k:
        assert compiled.stats["acceptance_rate"] > 0.2
