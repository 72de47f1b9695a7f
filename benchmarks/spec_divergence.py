"""Where greedy speculative decoding departs from greedy plain decoding in bf16 on the GPU.

    python benchmarks/spec_divergence.py --prompts 64 --new-tokens 64 --out benchmarks/results

In float32 the two are token-identical (tests/backends/test_inductor.py checks it for k = 1..3);
in bf16 the verify step scores 1 + k positions in one call while plain decoding scores one, so
matmul reductions round differently and a near-tie between two tokens can flip. This measures how
often that happens: for each k, over held-out prompts of the embedded model, the number of prompts
whose continuation equals plain greedy decoding and the first differing position of the others.
Every row is printed as soon as it is measured and the table lands in spec_divergence.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import graphopt
    from graphopt.models import load, load_tokenizer
    from graphopt.models.evaluate import HELDOUT_TEXT, heldout_prompts

    model = load(dtype=torch.bfloat16, device="cuda")
    ids = load_tokenizer().encode(HELDOUT_TEXT.read_text(encoding="utf-8")[:400_000])
    prompts = heldout_prompts(ids, args.prompts, args.prompt_len)
    run = lambda spec: graphopt.compile(model, spec=spec, progress=False, max_batch_size=len(prompts)).generate(  # noqa: E731
        prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    plain = run(None)
    lines = ["# Greedy speculative vs greedy plain decoding, bf16, embedded model, H200", "",
             f"Command: `python benchmarks/spec_divergence.py --prompts {args.prompts} --prompt-len {args.prompt_len} "
             f"--new-tokens {args.new_tokens}`", "",
             f"{len(prompts)} held-out prompts of {args.prompt_len} tokens, {args.new_tokens} greedy tokens each "
             "(eos ignored); plain = graphopt.compile(model) (inductor, CUDA graphs), spec = the same with MTP k drafts.", "",
             "| k | prompts identical | prompts differing | first differing position: min / median / max |",
             "|---|---|---|---|"]
    print(f"plain decoding: {time.perf_counter() - t0:.1f} s", flush=True)
    for k in args.ks:
        spec = run(graphopt.SpecConfig(num_speculative_tokens=k))
        where = [d for d in (first_difference(a, b) for a, b in zip(spec, plain)) if d is not None]
        span = f"{min(where)} / {statistics.median(where):.0f} / {max(where)}" if where else "-"
        lines.append(f"| {k} | {len(prompts) - len(where)} | {len(where)} | {span} |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec_divergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
