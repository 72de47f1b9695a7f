"""Serve many prompts at once and stream their tokens as they come (continuous batching on the CPU).

    python examples/serve_many.py [--prompts 12] [--max-new-tokens 24] [--batch 6] [--temperature 0.8]

Uses the embedded trained tiny model when `graphopt/models/tiny/model.safetensors` exists, else a
random model of the same tokenizer's vocabulary (its text is noise; the serving is the point).
More prompts than batch slots: requests queue, join as others finish, and each streams on its own.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import graphopt.models as models
from graphopt.models.random import random_model
from graphopt.runtime import Engine, SamplingParams

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def", "for i in range(", "# read a file\nwith open(",
           "def fib(n):\n    if", "x = [", "try:\n    import", "def __init__(self", "return {", "while True:",
           "if __name__ =="]


def load_model(tokenizer) -> tuple[torch.nn.Module, str]:
    tiny = Path(models.__file__).parent / "tiny"
    if (tiny / "model.safetensors").exists():
        return models.load(dtype=torch.float32), "the embedded trained tiny model"
    note = "NOTE: no trained model at graphopt/models/tiny/model.safetensors; using a RANDOM model (noise text)"
    return random_model(seed=0, vocab_size=tokenizer.vocab_size, max_position_embeddings=512), note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=6, help="decode batch slots")
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()
    torch.set_num_threads(1)          # tiny models: one thread beats two on a shared CPU

    tok = models.load_tokenizer()
    model, source = load_model(tok)
    print(f"model: {source}")
    engine = Engine.from_model(model, block_size=16, max_batch_size=args.batch, prefill_chunk_size=32,
                               tokenizer=tok)
    streamed: dict[int, list[int]] = {}
    prompts = {}
    for i in range(args.prompts):
        text = PROMPTS[i % len(PROMPTS)]
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=0.95,
                                seed=i, eos_token_id=tok.eos_token_id, stop=("\n\n",))
        prompts[engine.add_request(tok.encode(text), params)] = text

    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        for event in engine.step():
            streamed.setdefault(event.request_id, []).extend(event.new_token_ids)
            if event.new_token_ids:
                print(f"[r{event.request_id}] +{tok.decode(event.new_token_ids)!r}")
        steps += 1
    seconds = time.perf_counter() - start

    total = 0
    for rid, text in prompts.items():
        out = engine.take_output(rid)
        assert streamed.get(rid, []) == out.token_ids, f"r{rid}: streamed tokens differ from the result"
        total += len(out.token_ids)
        print(f"r{rid} ({out.finish_reason.value}, {len(out.token_ids)} tokens): {text!r} -> {out.text!r}")
    print(f"served {len(prompts)} requests, {total} tokens in {steps} steps, {seconds:.2f} s "
          f"({total / seconds:.0f} tok/s); streamed tokens equal every final output")


if __name__ == "__main__":
    main()
