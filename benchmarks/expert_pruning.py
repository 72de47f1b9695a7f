"""MoE top-k expert pruning on the embedded model: experts (and weight bytes) read per decoded token
against accuracy, for each threshold.

    python benchmarks/expert_pruning.py --threads 1        # ~1-2 minutes on one CPU thread

A pruned model drops, per token and MoE layer, the routed experts whose share of the token's routing
weight is below the threshold (the top expert always stays; `graphopt.ops.core.prune_routing`, the
rule `graphopt.compile(..., moe_prune_threshold=t)` puts in the decode steps). The eager copy
(`graphopt.quant.expert_pruning.prune_experts`) prunes every position, so each token is scored as if
the whole window had been decoded pruned: an upper bound on the cost of decode-only pruning.

Measures (graphopt.quant.eval.compare, against the unpruned model in float32, on non-overlapping
windows of the held-out evaluation slice, first half of graphopt/models/data/heldout.txt): KL and
top-1 agreement (primary), perplexity change, teacher-forced MTP acceptance change, each with a 95%
bootstrap interval over windows. Bytes: routed experts kept per token per MoE layer (main model,
counted on the same windows) x the bytes of one expert (gate, up and down, bf16), plus the weights
every decode token reads anyway (attention, dense and shared MLPs, router, final norm, lm_head, one
embedding row). Writes benchmarks/results/expert_pruning.md (docs/quantization.md quotes it).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from graphopt.models import checkpoint
from graphopt.models.tokenizer import load_tokenizer
from graphopt.quant.calibration import EVAL_FRACTION, heldout_tokens
from graphopt.quant.eval import compare, windows_from
from graphopt.quant.expert_pruning import count_kept_experts, prune_experts

RESULTS = Path(__file__).parent / "results" / "expert_pruning.md"
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
RESAMPLES, BF16 = 1000, 2


def weight_bytes(model) -> tuple[int, int, int]:
    """(bytes of one routed expert, main-model bytes every token reads besides routed experts, MoE
    layers): bf16, batch 1; the embedding reads one row, the MTP module is not counted."""
    c = model.config
    expert = 3 * c.hidden_size * c.moe_intermediate_size * BF16
    dense = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or ".experts." in name:
            continue
        dense += (p.shape[-1] if name == "model.embed_tokens.weight" else p.numel()) * BF16
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    return expert, dense, moe_layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=32, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = checkpoint.load(None, dtype=torch.float32)     # bf16 weights as stored, computed in float32
    windows = windows_from(heldout_tokens(load_tokenizer())[0], args.seq_len, args.windows)
    models = {t: prune_experts(model, t) for t in THRESHOLDS}
    kept = {t: count_kept_experts(m, windows) for t, m in models.items()}
    stats = compare(model, {str(t): m for t, m in models.items()}, windows, progress=True, resamples=RESAMPLES)
    expert, dense, moe_layers = weight_bytes(model)
    k = model.config.num_experts_per_tok
    full = dense + k * moe_layers * expert

    ci = lambda v, c, f: f.format(v) + f" [{f.format(c[0])}, {f.format(c[1])}]"   # noqa: E731
    lines = ["| threshold | experts kept / token / MoE layer | routed-expert KiB / token | all weights KiB / token "
             "| vs unpruned | KL(full \\|\\| pruned) [95% CI] | top-1 agree [95% CI] | d ppl [95% CI] "
             "| d MTP accept [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| 0 (unpruned) | {k:.3f} of {k} | {k * moe_layers * expert / 1024:.1f} | {full / 1024:.1f} | - | - | - "
             f"| ppl {next(iter(stats.values())).base_ppl:.3f} | accept {next(iter(stats.values())).base_mtp_accept:.3f} |"]
    for t in THRESHOLDS:
        s, kk = stats[str(t)], kept[t]["kept"]
        routed = kk * moe_layers * expert
        lines.append(f"| {t:g} | {kk:.3f} of {k} | {routed / 1024:.1f} | {(dense + routed) / 1024:.1f} "
                     f"| {(dense + routed) / full - 1:+.1%} | {ci(s.kl, s.ci['kl'], '{:.5f}')} "
                     f"| {ci(s.top1, s.ci['top1'], '{:.4f}')} | {ci(s.ppl_change, s.ci['ppl_change'], '{:+.2%}')} "
                     f"| {ci(s.mtp_accept - s.base_mtp_accept, s.ci['mtp_accept_change'], '{:+.3f}')} |")
    command = "python benchmarks/expert_pruning.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    c = model.config
    text = (f"# MoE top-k expert pruning on the embedded model\n\nCommand: `{command}`  \n"
            f"Host: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"total {time.perf_counter() - start:.0f} s.  \n"
            f"Model: the embedded model ({c.num_hidden_layers} layers, {moe_layers} MoE layers of {c.n_routed_experts} "
            f"routed experts, top-{k}, one shared expert; one routed expert is {expert / 1024:.0f} KiB in bf16).  \n"
            f"Evaluation: {windows.shape[0]} windows x {windows.shape[1]} tokens "
            f"({next(iter(stats.values())).tokens} scored) of the held-out evaluation slice (first {EVAL_FRACTION:.0%} "
            f"of graphopt/models/data/heldout.txt); every position pruned (teacher forced). [low, high]: 95% bootstrap "
            f"interval over the windows ({RESAMPLES} resamples, seed 0), paired with the unpruned model.  \n"
            f"Bytes: bf16 weights a batch-1 decode token reads in the main model: the routed experts kept, plus "
            f"{dense / 1024:.1f} KiB read by every token (attention, dense and shared MLPs, routers, lm_head, one "
            f"embedding row); the MTP module is not counted.\n\n" + "\n".join(lines) + "\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
