"""Accuracy of every quantisation scheme x algorithm on the embedded model, against its bf16 original.

    python benchmarks/quant_accuracy.py                 # ~ a few minutes on 2 CPU cores
    python benchmarks/quant_accuracy.py --quick         # fewer rows / windows, for a smoke run

The reference is the model's bf16 weights computed in float32 (CPU bf16 matmuls are slow; a
quantised model then differs from it by quantisation alone). Measures (graphopt.quant.eval): held-out perplexity over non-overlapping windows of the evaluation
slice (first half of graphopt/models/data/heldout.txt, never used for calibration), KL(bf16 || quant)
per token, top-1 agreement with bf16, and the teacher-forced MTP draft acceptance (the MTP module's
draft for token t+2 equal to the same model's main prediction). Calibration: the embedded model's
training split (.cache/corpus/train.bin; the held-out remainder when absent). Writes the table to
benchmarks/results/quant_accuracy.md (docs/quantization.md quotes it).
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
from graphopt.quant import (ClippingConfig, FlexSmoothConfig, HadamardConfig, HQQConfig, LearnableClippingConfig,
                            MixedPrecisionConfig, QuantConfig, SmoothQuantConfig, quantize_model)
from graphopt.quant.calibration import calibration_tokens, heldout_tokens
from graphopt.quant.eval import compare, windows_from

RESULTS = Path(__file__).parent / "results" / "quant_accuracy.md"
SQ, FS, CLIP, LCLIP, HQQ, HAD = (SmoothQuantConfig(0.5), FlexSmoothConfig(), ClippingConfig(),
                                 LearnableClippingConfig(steps=20), HQQConfig(), HadamardConfig())


def rows(quick: bool) -> list[tuple[str, str, QuantConfig]]:
    """(scheme label, algorithm label, config): every scheme with RTN, plus the algorithms that apply."""
    r = [
        ("w8a8", "RTN", QuantConfig("w8a8")),
        ("w8a8", "SmoothQuant a=0.5", QuantConfig("w8a8", algorithms=(SQ,))),
        ("w8a8", "FlexSmooth", QuantConfig("w8a8", algorithms=(FS,))),
        ("w8a8", "clipping (grid)", QuantConfig("w8a8", algorithms=(CLIP,))),
        ("w8a8 + C8", "RTN", QuantConfig("w8a8", kv_cache="int8")),
        ("w8a8_static", "RTN", QuantConfig("w8a8_static")),
        ("w8a8_static", "SmoothQuant a=0.5", QuantConfig("w8a8_static", algorithms=(SQ,))),
        ("w4a8", "RTN", QuantConfig("w4a8")),
        ("w4a8", "SmoothQuant a=0.5", QuantConfig("w4a8", algorithms=(SQ,))),
        ("w4a8", "clipping (grid)", QuantConfig("w4a8", algorithms=(CLIP,))),
        ("w4a8", "FlexSmooth + clipping", QuantConfig("w4a8", algorithms=(FS, CLIP))),
        ("w4a8", "Hadamard + clipping", QuantConfig("w4a8", algorithms=(HAD, CLIP))),
        ("w4a8 + C8", "clipping (grid)", QuantConfig("w4a8", algorithms=(CLIP,), kv_cache="int8")),
        ("w8a16", "RTN", QuantConfig("w8a16")),
        ("w4a16", "RTN", QuantConfig("w4a16")),
        ("w4a16", "HQQ (no data)", QuantConfig("w4a16", algorithms=(HQQ,))),
        ("w4a16", "clipping (grid)", QuantConfig("w4a16", algorithms=(CLIP,))),
        ("w4a16", "learnable clipping", QuantConfig("w4a16", algorithms=(LCLIP,))),
        ("fp8", "RTN", QuantConfig("fp8")),
        ("fp8_block", "RTN", QuantConfig("fp8_block")),
        ("C8 only", "-", QuantConfig("bf16", kv_cache="int8")),
        ("w8a8, MTP w4a8", "clipping", QuantConfig("w8a8", mtp_scheme="w4a8", algorithms=(CLIP,))),
        ("w8a8, MTP w4a16", "clipping", QuantConfig("w8a8", mtp_scheme="w4a16", algorithms=(CLIP,))),
        ("mixed w8a8/w4a8 <= 6 bits", "clipping", QuantConfig("w8a8", algorithms=(CLIP,),
                                                                  mixed_precision=MixedPrecisionConfig(("w8a8", "w4a8"), 6.0))),
    ]
    if quick:
        keep = {"w8a8", "w8a8 + C8", "w4a8", "fp8"}
        r = [x for x in r if x[0] in keep and x[1] in ("RTN", "clipping (grid)")]
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows of --seq-len tokens")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # bf16 weights as stored, computed in float32: CPU bf16 matmuls are ~5x slower here, and the
    # quantised models then differ from the reference by quantisation alone
    model = checkpoint.load(None, dtype=torch.float32)
    tok = load_tokenizer()
    windows = windows_from(heldout_tokens(tok)[0], args.seq_len, 8 if args.quick else args.windows)
    base_cfg = QuantConfig()
    cal = base_cfg.calibration.__class__(num_samples=8 if args.quick else args.calib_samples, seq_len=args.seq_len)
    data = calibration_tokens(cal, model.config.vocab_size, tok)
    models, labels = {}, {}
    for i, (scheme, algo, cfg) in enumerate(rows(args.quick)):
        t0 = time.perf_counter()
        models[str(i)] = quantize_model(model, cfg.replace(calibration=cal), data, progress=False)
        labels[str(i)] = (scheme, algo, time.perf_counter() - t0)
        print(f"quantised {scheme:<28} {algo:<24} {labels[str(i)][2]:6.1f} s", file=sys.stderr, flush=True)
    stats = compare(model, models, windows, progress=True)
    table = _table(stats, labels, windows)
    command = "python benchmarks/quant_accuracy.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = (f"# Quantisation accuracy on the embedded model\n\nCommand: `{command}`  \n"
            f"Host: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"total {time.perf_counter() - start:.0f} s.  \n"
            f"Evaluation: {windows.shape[0]} windows x {windows.shape[1]} tokens of the held-out evaluation slice; "
            f"calibration: {cal.num_samples} windows x {cal.seq_len} tokens of the training split.\n\n{table}\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


def _table(stats, labels, windows) -> str:
    first = next(iter(stats.values()))
    acc = lambda a: "-" if a is None else f"{a:.3f}"
    lines = ["| scheme | algorithm | ppl | d ppl | KL(bf16 \\|\\| q) | top-1 agree | MTP accept | d accept | quantise s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| bf16 | - | {first.base_ppl:.3f} | - | - | - | {acc(first.base_mtp_accept)} | - | - |"]
    for key, s in stats.items():
        scheme, algo, secs = labels[key]
        d_acc = "-" if s.mtp_accept is None else f"{s.mtp_accept - s.base_mtp_accept:+.3f}"
        lines.append(f"| {scheme} | {algo} | {s.ppl:.3f} | {s.ppl_change:+.2%} | {s.kl:.5f} | {s.top1:.4f} | "
                     f"{acc(s.mtp_accept)} | {d_acc} | {secs:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
