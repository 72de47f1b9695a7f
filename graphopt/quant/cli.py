"""`graphopt calibrate` and `graphopt eval`: quantise a checkpoint, measure what quantisation cost.

    graphopt calibrate --quant w8a8 --out out/w8a8                          # the embedded tiny model
    graphopt calibrate --model ckpt/ --quant w4a8 --algorithm smoothquant:alpha=0.6 \\
        --data default@0.7 --data text:my_code.txt@0.3 --samples 64 --out out/w4a8
    graphopt eval --quantized out/w8a8                                      # against its 16-bit base
    graphopt eval --model ckpt/ --quant fp8 --windows 32 --json             # quantise on the fly

Data specs are those of CalibrationConfig ("default", "heldout", "text:PATH", "tokens:PATH"), with an
optional "@RATIO" for mixing. Evaluation reads the held-out slice (quant.calibration.heldout_tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .calibration import check_vocab, heldout_tokens, source_tokens
from .config import CalibrationConfig, QuantConfig, parse_algorithm, resolve
from .eval import compare, windows_from
from .formats import load_quantized, save_quantized
from .model_quant import quantize_model, quantized_names

__all__ = ["calibrate_main", "eval_main"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _load(model_path: str | None, dtype: torch.dtype):
    from graphopt.models import checkpoint
    from graphopt.models.tokenizer import load_tokenizer

    model = checkpoint.load(model_path, dtype=dtype)
    tok_file = Path(model_path) / "tokenizer.json" if model_path else None
    tokenizer = load_tokenizer(tok_file if tok_file and tok_file.is_file() else None)
    return model, tokenizer


def _quant_config(args) -> QuantConfig:
    if args.quant.endswith(".json"):
        config = QuantConfig.from_dict(json.loads(Path(args.quant).read_text()))
    else:
        config = resolve(args.quant)
    changes = {}
    if args.algorithm:
        changes["algorithms"] = tuple(parse_algorithm(a) for a in args.algorithm)
    if args.kv_cache:
        changes["kv_cache"] = None if args.kv_cache == "none" else args.kv_cache
    if args.mtp_scheme:
        changes["mtp_scheme"] = args.mtp_scheme
    if args.group_size:
        changes["group_size"] = args.group_size
    cal = config.calibration
    sources = tuple(_source(d) for d in args.data) if args.data else cal.sources
    changes["calibration"] = CalibrationConfig(sources, args.samples or cal.num_samples,
                                               args.seq_len or cal.seq_len, args.seed, cal.max_rows, cal.bins)
    return config.replace(**changes)


def _source(spec: str) -> tuple[str, float]:
    head, sep, tail = spec.rpartition("@")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--quant", default="w8a8", help="preset name or a QuantConfig JSON file")
    p.add_argument("--algorithm", action="append", help="e.g. smoothquant:alpha=0.6, flexsmooth, clipping, "
                   "learnable_clipping:steps=30, hqq, hadamard (repeatable: one transform + one weight method)")
    p.add_argument("--kv-cache", choices=("int8", "none"), help="C8 latent cache (overrides the preset)")
    p.add_argument("--mtp-scheme", help="scheme for the MTP draft module (default: the main scheme)")
    p.add_argument("--group-size", type=int)
    p.add_argument("--data", action="append", help="calibration source SPEC[@RATIO] (repeatable)")
    p.add_argument("--samples", type=int, help="calibration windows")
    p.add_argument("--seq-len", type=int, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="bfloat16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def calibrate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="graphopt calibrate", description="Calibrate and quantise a checkpoint.")
    _common(p)
    p.add_argument("--out", required=True, help="directory for the quantised checkpoint")
    args = p.parse_args(argv)
    model, tokenizer = _load(args.model, _DTYPES[args.dtype])
    qmodel = quantize_model(model, _quant_config(args), tokenizer=tokenizer, progress=not args.quiet)
    save_quantized(qmodel, args.out)
    schemes = quantized_names(qmodel)
    print(f"quantised {len(schemes)} matmuls ({', '.join(sorted(set(schemes.values())))}) -> {args.out}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="graphopt eval", description="Perplexity, KL, top-1 and MTP acceptance "
                                "of a quantised model against its 16-bit original, on held-out text.")
    _common(p)
    p.add_argument("--quantized", help="a directory written by `graphopt calibrate` (else: quantise now)")
    p.add_argument("--eval-data", help="evaluation tokens, a source spec such as tokens:PATH or text:PATH "
                   "(default: the held-out evaluation slice)")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table row")
    args = p.parse_args(argv)
    model, tokenizer = _load(args.model, _DTYPES[args.dtype])
    if args.quantized:
        qmodel = load_quantized(args.quantized)  # tensors keep their saved dtypes (fp8, fp32 scales)
        label = args.quantized
    else:
        qmodel = quantize_model(model, _quant_config(args), tokenizer=tokenizer, progress=not args.quiet)
        label = args.quant
    ids = source_tokens(args.eval_data, tokenizer) if args.eval_data else heldout_tokens(tokenizer)[0]
    check_vocab(ids, model.config.vocab_size, "evaluation data")
    windows = windows_from(ids, args.eval_seq_len, args.windows)
    stats = compare(model, {label: qmodel}, windows, progress=not args.quiet)[label]
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        acc = lambda a: "n/a" if a is None else f"{a:.3f}"
        print(f"{'model':<24} {'ppl':>9} {'d ppl':>8} {'KL':>9} {'top-1':>7} {'MTP acc':>8}")
        print(f"{'16-bit':<24} {stats.base_ppl:9.3f} {'':>8} {'':>9} {'':>7} {acc(stats.base_mtp_accept):>8}")
        print(f"{label:<24} {stats.ppl:9.3f} {stats.ppl_change:+8.2%} {stats.kl:9.5f} {stats.top1:7.3f} "
              f"{acc(stats.mtp_accept):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(calibrate_main())
