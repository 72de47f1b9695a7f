"""Pick a backend and see what it does: `backend="auto"` is inductor (CUDA graphs + Triton kernels) on a GPU
and the eager reference on the CPU.

    python examples/fast_decode.py                     # the model's device: cuda if there is one
    python examples/fast_decode.py --device cpu --backend inductor   # compiled on the CPU (first call ~1-2 min)

Prints the backend chosen, the greedy tokens of a small batch (equal for every backend in float32),
the decode speed, and on CUDA how many decode-step and prefill graphs were captured.
"""

from __future__ import annotations

import argparse
import time

import torch

import graphopt
from graphopt.config import BACKENDS
from graphopt.models import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()

    model = load(dtype=torch.float32, device=args.device)   # the embedded tiny DeepSeek-V3
    compiled = graphopt.compile(model, backend=args.backend, progress=False)
    print(f"backend: {compiled.backend} on {args.device}")
    prompts = [[1, 500, 600, 700], [1, 42], [1, 9, 8, 7, 6, 5, 4, 3, 2]]
    compiled.generate(prompts, max_new_tokens=2)             # first call: compiles / captures
    t0 = time.perf_counter()
    out = compiled.generate(prompts, max_new_tokens=args.new_tokens)
    seconds = time.perf_counter() - t0
    for prompt, tokens in zip(prompts, out):
        print(f"{prompt} -> {tokens}")
    print(f"{sum(map(len, out)) / seconds:.0f} tokens/s over {len(prompts)} rows")
    captures = getattr(compiled.executable, "captures", None)
    if captures is not None:
        print(f"decode step graphs captured: {captures}, prefill graphs: {compiled.executable.prefill_captures} "
              f"(prefill_graph_tokens={compiled.executable.prefill_graph_tokens}; 0 off CUDA)")


if __name__ == "__main__":
    main()
