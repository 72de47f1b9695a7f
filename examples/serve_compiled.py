"""Compile the embedded model and serve several text prompts through it, streaming the text.

    python examples/serve_compiled.py [--max-new-tokens 32] [--spec 1]

`graphopt.compile` finds the embedded model's tokenizer, so prompts and results are plain text;
`compiled.stream` yields (prompt index, new text) as each step produces it, stopping each prompt at
the model's eos or at a blank line.
"""

from __future__ import annotations

import argparse
import time

import torch

import graphopt
from graphopt.models import load

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(", "class Stack:\n    def push(self, item):\n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--spec", type=int, default=1, help="MTP draft tokens per step (0: plain decoding)")
    args = parser.parse_args()

    spec = graphopt.SpecConfig(num_speculative_tokens=args.spec) if args.spec else None
    compiled = graphopt.compile(load(dtype=torch.float32), spec=spec)
    texts = [""] * len(PROMPTS)
    start = time.perf_counter()
    for i, piece in compiled.stream(PROMPTS, max_new_tokens=args.max_new_tokens, stop="\n\n"):
        print(f"[{i}] {piece!r}", flush=True)          # each piece as it arrives
        texts[i] += piece
    seconds = time.perf_counter() - start
    tokens = sum(len(compiled.tokenizer.encode(t)) for t in texts)
    for prompt, text in zip(PROMPTS, texts):
        print(f"--- {prompt!r} ->\n{prompt}{text}")
    print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s over {len(PROMPTS)} prompts")


if __name__ == "__main__":
    main()
