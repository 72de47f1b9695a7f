"""MoE top-k expert pruning at decode time: routed experts that get a small share of a token's
routing weight are dropped in the decode steps, so their weights are never read.

    python examples/expert_pruning.py --threshold 0.3

Eager figures first (the pruned model against the full one on held-out text: experts kept per token,
KL and top-1 agreement), then the compiled model: `graphopt.compile(..., moe_prune_threshold=t)`
gives every router of the decode step graphs the threshold (visible in the dumps); prefill routes in
full. The table over thresholds: `python benchmarks/expert_pruning.py`.
"""

from __future__ import annotations

import argparse

import torch

import graphopt
from graphopt.models import load, load_tokenizer
from graphopt.quant.calibration import heldout_tokens
from graphopt.quant.eval import compare, windows_from
from graphopt.quant.expert_pruning import count_kept_experts, prune_experts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--windows", type=int, default=4, help="held-out windows of 256 tokens for the eager figures")
    args = p.parse_args()

    model, tok = load(dtype=torch.float32), load_tokenizer()
    windows = windows_from(heldout_tokens(tok)[0], 256, args.windows)
    pruned = prune_experts(model, args.threshold)
    kept = count_kept_experts(pruned, windows)
    stats = compare(model, {"pruned": pruned}, windows, resamples=0)["pruned"]
    print(f"experts kept per token per MoE layer: {kept['kept']:.3f} of {kept['top_k']}")
    print(f"KL(full || pruned) {stats.kl:.5f}, top-1 agreement {stats.top1:.4f} over {stats.tokens} tokens")

    compiled = graphopt.compile(model, moe_prune_threshold=args.threshold, progress=False)
    route = next(n for n in compiled.graphs["step"].graph.nodes if "moe_route" in str(n.target))
    print(f"step graph router: {route.format_node()}")
    prompt = [tok.encode("def fibonacci(n):")]
    out = compiled.generate(prompt, max_new_tokens=24)
    print(tok.decode(prompt[0]) + tok.decode(out[0]))


if __name__ == "__main__":
    main()
