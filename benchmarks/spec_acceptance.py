"""Greedy MTP speculative decoding on the embedded model, measured through the real step (SpecStep).

    python benchmarks/spec_acceptance.py                  # 32 held-out prompts, 64 tokens, k = 1, 2, 3
    python benchmarks/spec_acceptance.py --prompts 8      # a quicker run

Prompts: `graphopt.models.evaluate.heldout_prompts` (evenly spaced 64-token snippets of
graphopt/models/data/heldout.txt, code the model never saw). Each k runs the eager SpecStep /
SpecPrefill provider over the whole batch (`step.provider.speculative_generate`) and reads the
acceptance from `SpecStats`: a row-step counts while the row is generating (its last, possibly cut,
step is left out). The output is also compared with plain greedy decoding (it must be identical).
Writes the table to benchmarks/results/spec_acceptance.md (docs/speculative.md quotes it).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from graphopt.step.provider import SpecStepProvider, speculative_generate
from graphopt.models import load, load_tokenizer
from graphopt.models.evaluate import HELDOUT_TEXT, heldout_prompts
from graphopt.models.generate import greedy_generate

RESULTS = Path(__file__).parent / "results" / "spec_acceptance.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)   # batch-1 sized matmuls: threads only add synchronisation on a small CPU
    model = load(dtype=torch.float32).eval()
    ids = load_tokenizer().encode(HELDOUT_TEXT.read_text(encoding="utf-8"))
    prompts = heldout_prompts(ids, args.prompts, args.prompt_len)
    t0 = time.perf_counter()
    greedy = [greedy_generate(model, p, args.new_tokens) for p in tqdm(prompts, desc="greedy", unit="prompt")]
    greedy_s = time.perf_counter() - t0

    header = ("| k | row-steps | acceptance rate (accepted / proposed) | tokens / step | per-position acceptance "
              "| accepted drafts histogram | identical to greedy | seconds |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in tqdm(args.k, desc="speculative", unit="k"):
        provider = SpecStepProvider.from_model(model, k, args.block_size, sampling=False)
        t0 = time.perf_counter()
        out = speculative_generate(provider, prompts, args.new_tokens)
        seconds = time.perf_counter() - t0
        s = provider.stats.summary()
        per_pos = " / ".join(f"{p:.3f}" for p in s["per_position_acceptance"])
        lines.append(f"| {k} | {s['steps']} | {s['acceptance_rate']:.3f} | {s['mean_accepted_length']:.3f} | "
                     f"{per_pos} | {s['accepted_histogram']} | {'yes' if out == greedy else 'NO'} | {seconds:.1f} |")

    command = " ".join(["python benchmarks/spec_acceptance.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        "# Greedy MTP speculative decoding: acceptance on the embedded model",
        "",
        f"Command: `{command}` (torch {torch.__version__}, {platform.machine()} CPU, float32).",
        f"{len(prompts)} held-out prompts of {args.prompt_len} tokens, {args.new_tokens} greedy tokens each, one "
        f"batch, block size {args.block_size}. Seconds: the eager step on this CPU, one thread (plain greedy "
        f"decoding, one sequence at a time: {greedy_s:.1f} s); not a speed benchmark, the GPU one is.",
        "Per-position acceptance j: the fraction of steps whose drafts 1..j were all accepted.",
        "",
        *lines,
        "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if all("| NO |" not in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
