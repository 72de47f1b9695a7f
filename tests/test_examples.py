"""Every example runs end to end (so none rots) and prints what it promises."""

import subprocess
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_plug_into_transformers():
    out = run("plug_into_transformers.py")
    err = float(out.split("logits: ")[1].split()[0])
    assert err < 1e-4
    assert "parameters shared with the HF model: True" in out
    assert "greedy continuation: [" in out


def test_dump_and_inspect(tmp_path):
    out = run("dump_and_inspect.py", "--out", str(tmp_path))
    assert "| step | step | fuse_spec_step | changed | 1 |" in out
    assert "graphopt.moe_route.default | 0 |" in out
    for op in ("mla_paged_attention", "kv_cache_write", "moe_experts", "rejection_accept", "rms_norm"):
        assert op in out.split("fused step graph:")[1]


def test_quantize_and_save(tmp_path):
    out = run("quantize_and_save.py", "--out", str(tmp_path / "q"))
    assert (tmp_path / "q").exists()
    assert "quantised matmuls" in out


def test_save_and_load(tmp_path):
    out = run("save_and_load.py", "--out", str(tmp_path / "compiled"))
    assert "same tokens: True" in out
    assert (tmp_path / "compiled" / "manifest.json").is_file()


def test_fast_decode():
    out = run("fast_decode.py", "--device", "cpu", "--new-tokens", "6")
    assert "backend: eager on cpu" in out                     # "auto" on the CPU
    assert out.count(" -> [") == 3 and "tokens/s over 3 rows" in out


def test_serve_compiled():
    out = run("serve_compiled.py", "--max-new-tokens", "12")
    assert out.count("--- ") == 3 and "tokens/s over 3 prompts" in out
    assert out.index("[0] ") < out.index("--- ")                  # streamed before the summary


def test_openai_client():
    out = run("openai_client.py", "--max-tokens", "12")
    assert "completion (" in out and "streamed: '" in out and "chat reply: " in out
    assert "graphopt_generated_tokens_total " in out and "graphopt_cache_blocks_used 0" in out


def test_tensor_parallel():
    # starts its own 2 gloo ranks (as torchrun would) and decodes what the unsharded model decodes
    out = run("tensor_parallel.py", "--ranks", "2", "--new-tokens", "6")
    assert "ranks: 2, tp=2 ep=2" in out
    assert out.count("(same as unsharded: True)") == 2
    assert "'all_reduce': 20, 'all_gather': 2" in out


def test_prefill_decode_weights(tmp_path):
    out = run("prefill_decode_weights.py", "--out", str(tmp_path / "compiled"))
    prefill, step = (line for line in out.splitlines() if line.startswith(("prefill graph:", "step graph:")))
    assert "'int8_matmul'" in prefill and "'int8_matmul'" not in step and "'w4a8_matmul'" in step
    assert "reloaded quant: w4a8 decode, w8a8 prefill" in out and "same tokens: True" in out
    assert (tmp_path / "compiled" / "manifest.json").is_file()


def test_expert_pruning():
    out = run("expert_pruning.py", "--threshold", "0.3", "--windows", "2")
    kept = float(out.split("experts kept per token per MoE layer: ")[1].split()[0])
    assert 1.0 <= kept < 2.0                                     # top-2 routing, some experts dropped
    assert "top-1 agreement" in out and "2.5, 0.3)" in out       # the step graph's router has the threshold
