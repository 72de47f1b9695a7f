"""MTP acceptance on the embedded model for each (main scheme, draft scheme) pair, on held-out text.

    python benchmarks/quant_spec_acceptance.py                 # 3 main x 4 draft schemes, ~6 min on one core
    python benchmarks/quant_spec_acceptance.py --prompts 4     # a quicker run

The draft scheme is `QuantConfig.mtp_scheme`: "bf16" keeps the MTP module (its own weights: eh_proj,
its decoder layer) unquantised; the embedding and the head it shares with the main model are in 16 bit
under every scheme (QuantConfig.skip). Every config is RTN, calibration-free: no text is used for
calibration, so all of graphopt/models/data/heldout.txt is unseen, and the figures come from its
evaluation slice (the first half, quant.calibration.heldout_tokens) only. The reference is the
model's bf16 weights computed in float32. Two measures, on the same slice:

  teacher-forced  graphopt.quant.eval: the first draft for token t+2 equals the same model's main
                  argmax, over windows of the slice, with a 95% bootstrap interval over windows
                  (1000 resamples) and the change against the unquantised model (paired);
  decoding        greedy MTP speculative decoding through the eager SpecStep (k drafts a step) on
                  prompts from the slice: accepted / proposed drafts, tokens per step, and how many
                  prompts' outputs equal plain greedy decoding of the same quantised model; for one
                  that does not, the main model's top-2 logit gap at the first differing token (a
                  full forward over the greedy prefix): the verify step (k + 1 query tokens) and the
                  one-token decode step are different float computations, and under per-token
                  dynamic int8 activations a rounding difference can move an int8 code and flip a
                  near-tied argmax.

Writes the table to benchmarks/results/quant_spec_acceptance.md (docs/quantization.md quotes it).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from graphopt.models import load, load_tokenizer
from graphopt.models.evaluate import heldout_prompts
from graphopt.models.generate import greedy_generate
from graphopt.quant import QuantConfig, quantize_model
from graphopt.quant.calibration import EVAL_FRACTION, heldout_tokens
from graphopt.quant.eval import compare, windows_from
from graphopt.step.provider import SpecStepProvider, speculative_generate

RESULTS = Path(__file__).parent / "results" / "quant_spec_acceptance.md"
MAIN = ("bf16", "w8a8", "w4a8")
DRAFT = ("bf16", "w8a8", "w4a8", "w4a16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=32, help="teacher-forced: evaluation windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompts", type=int, default=16, help="decoding: prompts from the evaluation slice")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--k", type=int, default=2, help="decoding: drafts per step")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)   # batch-1 sized matmuls: threads only add synchronisation on a small CPU
    start = time.perf_counter()

    model = load(dtype=torch.float32).eval()
    eval_ids = heldout_tokens(load_tokenizer())[0]
    windows = windows_from(eval_ids, args.seq_len, args.windows)
    prompts = heldout_prompts(eval_ids, args.prompts, args.prompt_len)
    pairs = {(m, d): model if m == d == "bf16" else quantize_model(model, QuantConfig(m, mtp_scheme=d), progress=False)
             for m in MAIN for d in DRAFT}
    stats = compare(model, {f"{m}/{d}": q for (m, d), q in pairs.items()}, windows, progress=True)

    lines = ["| main | draft | teacher-forced accept [95% CI] | d accept vs bf16 [95% CI] | "
             f"decoding: accepted / proposed (k = {args.k}) | tokens / step | prompts identical to greedy | "
             "top-2 logit gap where not |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    identical = True
    for (m, d), q in pairs.items():
        s = stats[f"{m}/{d}"]
        greedy = [greedy_generate(q, prompt, args.new_tokens) for prompt in prompts]
        provider = SpecStepProvider.from_model(q, args.k, sampling=False)
        spec = speculative_generate(provider, prompts, args.new_tokens)
        gaps = [_divergence_gap(q, prompt, g, o) for prompt, g, o in zip(prompts, greedy, spec) if g != o]
        identical &= not gaps
        dec = provider.stats.summary()
        lo, hi = s.ci["mtp_accept"]
        dlo, dhi = s.ci["mtp_accept_change"]
        lines.append(f"| {m} | {d} | {s.mtp_accept:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{s.mtp_accept - s.base_mtp_accept:+.3f} [{dlo:+.3f}, {dhi:+.3f}] | "
                     f"{dec['acceptance_rate']:.3f} ({dec['accepted']} / {dec['proposed']}) | "
                     f"{dec['mean_accepted_length']:.3f} | {len(prompts) - len(gaps)} / {len(prompts)} | "
                     f"{', '.join(f'{g:.4f}' for g in gaps) or '-'} |")
        print(lines[-1], file=sys.stderr, flush=True)

    command = " ".join(["python benchmarks/quant_spec_acceptance.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        "# MTP acceptance under quantisation: (main scheme, draft scheme) on the embedded model",
        "",
        f"Command: `{command}`  ",
        f"Host: {platform.machine()}, torch {torch.__version__}, 1 thread; total {time.perf_counter() - start:.0f} s.  ",
        f"Held-out text only: every config is RTN (no calibration data); teacher-forced on {windows.shape[0]} windows x "
        f"{windows.shape[1]} tokens of the evaluation slice (first {EVAL_FRACTION:.0%} of "
        f"graphopt/models/data/heldout.txt), decoding on {len(prompts)} prompts of {args.prompt_len} tokens from the "
        f"same slice, {args.new_tokens} greedy tokens each.  ",
        "Draft `bf16`: `QuantConfig(main, mtp_scheme=\"bf16\")`, the MTP module's own weights unquantised. "
        "Row bf16 / bf16 is the unquantised model. [low, high]: 95% bootstrap interval over the windows (1000 "
        "resamples, seed 0); d accept is paired with the unquantised model on the same windows. The decoding "
        "acceptance has no interval (one run over the prompts).",
        "",
        *lines,
        "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if identical else 1


@torch.no_grad()
def _divergence_gap(model, prompt: list[int], greedy: list[int], spec: list[int]) -> float:
    """Top-1 minus top-2 logit of `model` (a full forward over prompt + the greedy prefix) at the first
    token where the two continuations differ."""
    j = next(j for j, (a, b) in enumerate(zip(greedy, spec)) if a != b)
    top = model(torch.tensor([prompt + greedy[:j]]))[0, -1].topk(2).values
    return float(top[0] - top[1])


if __name__ == "__main__":
    sys.exit(main())
