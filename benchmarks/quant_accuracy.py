"""Accuracy of every quantisation scheme x algorithm on the embedded model, against its bf16 original.

    python benchmarks/quant_accuracy.py                 # ~ a few minutes on 2 CPU cores
    python benchmarks/quant_accuracy.py --quick         # fewer rows / windows, for a smoke run

The reference is the model's bf16 weights computed in float32 (CPU bf16 matmuls are slow; a
quantised model then differs from it by quantisation alone). Measures (graphopt.quant.eval), on
non-overlapping windows of the evaluation slice (first half of graphopt/models/data/heldout.txt):
KL(bf16 || quant) per token and top-1 agreement with bf16 (the primary measures, first), perplexity
and its change, and the teacher-forced MTP draft acceptance (the MTP module's draft for token t+2
equal to the same model's main prediction), each change with a 95% bootstrap interval over the
evaluation windows (1000 resamples, seeded). Calibration: the "default" source (the embedded
model's training split .cache/corpus/train.bin; the held-out text minus the evaluation slice when
absent); the header says which, and checks that no calibration window shares a 32-token run with
the evaluation slice (the run stops otherwise). Writes the table to
benchmarks/results/quant_accuracy.md (docs/quantization.md quotes it).

With the w8a8 RTN and w4a8 clipping rows selected, a second table scores separate prefill and decode
weights (`QuantConfig("w4a8", prefill_scheme="w8a8")`) as a compiled split model runs them
(quant.eval.PrefillDecode): every window's first half prefilled by one weight set into the paged KV
cache, the second half decoded over it by the other, only the decoded positions scored, beside each
scheme used throughout on the same positions:

    python benchmarks/quant_accuracy.py --threads 1 --only "w8a8 RTN" --only "w4a8 clipping (grid)" \
        --out benchmarks/results/quant_accuracy_prefill_decode.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from graphopt.models import checkpoint
from graphopt.models.tokenizer import load_tokenizer
from graphopt.quant import (ClippingConfig, FlexSmoothConfig, HadamardConfig, HQQConfig, LearnableClippingConfig,
                            MixedPrecisionConfig, QuantConfig, SmoothQuantConfig, quantize_model)
from graphopt.quant.calibration import EVAL_FRACTION, calibration_data, heldout_tokens
from graphopt.quant.eval import PrefillDecode, bootstrap_interval, compare, shared_span_windows, windows_from

RESULTS = Path(__file__).parent / "results" / "quant_accuracy.md"
RESAMPLES, SPAN = 1000, 32        # bootstrap resamples; token run length of the calibration / evaluation check
SQ, FS, CLIP, LCLIP, HQQ, HAD = (SmoothQuantConfig(0.5), FlexSmoothConfig(), ClippingConfig(),
                                 LearnableClippingConfig(steps=20), HQQConfig(), HadamardConfig())
SQ_INPUT = SmoothQuantConfig(0.5, scope="input")    # one factor per norm output: what save_msmodelslim folds


def rows(quick: bool) -> list[tuple[str, str, QuantConfig]]:
    """(scheme label, algorithm label, config): every scheme with RTN, plus the algorithms that apply."""
    r = [
        ("w8a8", "RTN", QuantConfig("w8a8")),
        ("w8a8", "SmoothQuant a=0.5", QuantConfig("w8a8", algorithms=(SQ,))),
        ("w8a8", "SmoothQuant a=0.5 scope=input", QuantConfig("w8a8", algorithms=(SQ_INPUT,))),
        ("w8a8", "FlexSmooth", QuantConfig("w8a8", algorithms=(FS,))),
        ("w8a8", "clipping (grid)", QuantConfig("w8a8", algorithms=(CLIP,))),
        ("w8a8 + C8", "RTN", QuantConfig("w8a8", kv_cache="int8")),
        ("w8a8_static", "RTN", QuantConfig("w8a8_static")),
        ("w8a8_static", "SmoothQuant a=0.5", QuantConfig("w8a8_static", algorithms=(SQ,))),
        ("w8a8_static", "SmoothQuant a=0.5 scope=input", QuantConfig("w8a8_static", algorithms=(SQ_INPUT,))),
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
        ("hif8", "RTN", QuantConfig("hif8")),
        ("nf4", "RTN", QuantConfig("nf4")),
        ("w2a16 (group 16)", "RTN", QuantConfig("w2a16", group_size=16)),
        ("C8 only", "-", QuantConfig("bf16", kv_cache="int8")),
        ("w8a8, MTP w4a8", "clipping", QuantConfig("w8a8", mtp_scheme="w4a8", algorithms=(CLIP,))),
        ("w8a8, MTP w4a16", "clipping", QuantConfig("w8a8", mtp_scheme="w4a16", algorithms=(CLIP,))),
        ("mixed w8a8/w4a8 <= 6 bits", "clipping", QuantConfig("w8a8", algorithms=(CLIP,),
                                                                  mixed_precision=MixedPrecisionConfig(("w8a8", "w4a8"), 6.0))),
        ("mixed w8a8/w4a8 <= 6 bits, per linear", "clipping", QuantConfig(
            "w8a8", algorithms=(CLIP,), mixed_precision=MixedPrecisionConfig(("w8a8", "w4a8"), 6.0, unit="linear"))),
    ]
    if quick:
        keep = {"w8a8", "w8a8 + C8", "w4a8", "fp8"}
        r = [x for x in r if x[0] in keep and x[1] in ("RTN", "clipping (grid)")]
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--windows", type=int, default=32, help="evaluation windows")
    p.add_argument("--only", action="append", default=[],
                   help="keep rows whose 'scheme algorithm' label contains this text (repeatable): a reduced run")
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
    eval_ids = heldout_tokens(tok)[0]
    windows = windows_from(eval_ids, args.seq_len, 8 if args.quick else args.windows)
    base_cfg = QuantConfig()
    cal = base_cfg.calibration.__class__(num_samples=8 if args.quick else args.calib_samples, seq_len=args.seq_len)
    calibration = calibration_data(cal, model.config.vocab_size, tok)
    data = calibration.tokens
    shared = shared_span_windows(data, eval_ids, SPAN)
    if shared:
        sys.exit(f"{shared} of {len(data)} calibration windows share a {SPAN}-token run with the evaluation slice")
    selected = [r for r in rows(args.quick) if not args.only or any(o in f"{r[0]} {r[1]}" for o in args.only)]
    models, labels = {}, {}
    for i, (scheme, algo, cfg) in enumerate(selected):
        t0 = time.perf_counter()
        models[str(i)] = quantize_model(model, cfg.replace(calibration=cal), data, progress=False)
        labels[str(i)] = (scheme, algo, time.perf_counter() - t0)
        print(f"quantised {scheme:<28} {algo:<24} {labels[str(i)][2]:6.1f} s", file=sys.stderr, flush=True)
    stats = compare(model, models, windows, progress=True, resamples=RESAMPLES, seed=0)
    table = _table(stats, labels)
    total_rows = len(rows(args.quick))
    reduced = "" if len(selected) == total_rows else f"Reduced row set: {len(selected)} of {total_rows} rows.  \n"
    command = "python benchmarks/quant_accuracy.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = (f"# Quantisation accuracy on the embedded model\n\nCommand: `{command}`  \n"
            f"Host: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"total {time.perf_counter() - start:.0f} s.  \n"
            f"{reduced}"
            f"Evaluation: {windows.shape[0]} windows x {windows.shape[1]} tokens ({next(iter(stats.values())).tokens} scored) of the "
            f"held-out evaluation slice (first {EVAL_FRACTION:.0%} of graphopt/models/data/heldout.txt).  \n"
            f"Calibration: {calibration.origin}.  \n"
            f"Held out: the evaluation slice is not calibration data; {shared} of {len(data)} calibration windows share a "
            f"run of {SPAN} tokens with it (checked by content).  \n"
            f"[low, high]: 95% bootstrap interval over the {windows.shape[0]} evaluation windows ({RESAMPLES} resamples "
            f"of the windows with replacement, seed 0, percentile interval; paired with the bf16 reference on the same "
            f"windows). Rows whose intervals overlap may still differ: the paired table below compares two rows on the "
            f"same resampled windows, and a difference whose interval contains 0 is within noise.\n\n{table}\n\n"
            f"{_pairs_table(stats, labels)}\n{_prefill_decode_section(model, models, labels, windows)}")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


def _with_ci(value: float, ci: tuple[float, float] | None, fmt: str) -> str:
    return fmt.format(value) + ("" if ci is None else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]")


def _table(stats, labels) -> str:
    first = next(iter(stats.values()))
    acc = lambda a: "-" if a is None else f"{a:.3f}"
    lines = ["| scheme | algorithm | KL(bf16 \\|\\| q) [95% CI] | top-1 agree [95% CI] | ppl | d ppl [95% CI] | "
             "MTP accept | d accept [95% CI] | quantise s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| bf16 | - | - | - | {first.base_ppl:.3f} | - | {acc(first.base_mtp_accept)} | - | - |"]
    for key, s in stats.items():
        scheme, algo, secs = labels[key]
        d_acc = "-" if s.mtp_accept is None else _with_ci(s.mtp_accept - s.base_mtp_accept,
                                                          s.ci.get("mtp_accept_change"), "{:+.3f}")
        lines.append(f"| {scheme} | {algo} | {_with_ci(s.kl, s.ci.get('kl'), '{:.5f}')} | "
                     f"{_with_ci(s.top1, s.ci.get('top1'), '{:.4f}')} | {s.ppl:.3f} | "
                     f"{_with_ci(s.ppl_change, s.ci.get('ppl_change'), '{:+.2%}')} | {acc(s.mtp_accept)} | {d_acc} | "
                     f"{secs:.1f} |")
    return "\n".join(lines)


# (a, b) rows compared on the same windows: the claims docs/quantization.md makes about algorithms
PAIRS = [(("w8a8", "SmoothQuant a=0.5"), ("w8a8", "RTN")), (("w8a8", "FlexSmooth"), ("w8a8", "RTN")),
         (("w8a8", "clipping (grid)"), ("w8a8", "RTN")), (("w8a8 + C8", "RTN"), ("w8a8", "RTN")),
         (("w8a8_static", "SmoothQuant a=0.5"), ("w8a8_static", "RTN")),
         (("w8a8", "SmoothQuant a=0.5 scope=input"), ("w8a8", "SmoothQuant a=0.5")),
         (("w8a8_static", "SmoothQuant a=0.5 scope=input"), ("w8a8_static", "SmoothQuant a=0.5")),
         (("w8a8", "SmoothQuant a=0.5 scope=input"), ("w8a8", "RTN")),
         (("w8a8_static", "SmoothQuant a=0.5 scope=input"), ("w8a8_static", "RTN")),
         (("w4a8", "SmoothQuant a=0.5"), ("w4a8", "RTN")), (("w4a8", "clipping (grid)"), ("w4a8", "RTN")),
         (("w4a8", "Hadamard + clipping"), ("w4a8", "clipping (grid)")),
         (("w4a8", "FlexSmooth + clipping"), ("w4a8", "clipping (grid)")),
         (("w4a16", "clipping (grid)"), ("w4a16", "RTN")), (("w4a16", "HQQ (no data)"), ("w4a16", "RTN")),
         (("w4a16", "learnable clipping"), ("w4a16", "clipping (grid)")),
         (("w8a8, MTP w4a8", "clipping"), ("w8a8", "clipping (grid)")),
         (("w8a8, MTP w4a16", "clipping"), ("w8a8", "clipping (grid)"))]
PAIRED = {  # measures of row a against row b, from both rows' window sums (a_*, b_*)
    "KL change": (lambda s: s["a_kl"] / s["b_kl"] - 1, "{:+.1%}"),
    "top-1 change": (lambda s: (s["a_agree"] - s["b_agree"]) / s["a_tokens"], "{:+.4f}"),
    "ppl change": (lambda s: torch.exp((s["a_nll"] - s["b_nll"]) / s["a_tokens"]) - 1, "{:+.2%}"),
    "accept change": (lambda s: (s["a_hits"] - s["b_hits"]) / s["a_drafts"], "{:+.3f}"),
}


SPLIT = (("w8a8", "RTN"), ("w4a8", "clipping (grid)"))      # (prefill row, decode row)
SPLIT_PAIRS = [(("prefill w8a8, decode w4a8", "RTN / clipping"), ("w4a8 throughout", "clipping (grid)")),
               (("prefill w8a8, decode w4a8", "RTN / clipping"), ("w8a8 throughout", "RTN"))]


def _prefill_decode_section(base, models, labels, windows) -> str:
    """Separate prefill / decode weights against each scheme alone, on the decoded half of every window."""
    key = {labels[k][:2]: k for k in models}
    if not all(row in key for row in SPLIT):
        return ""
    prefix = windows.shape[1] // 2
    prefill, decode = (models[key[row]] for row in SPLIT)
    split = {"w8a8": prefill, "w4a8": decode, "split": PrefillDecode(prefill, decode, prefix)}
    split_labels = {"w8a8": ("w8a8 throughout", "RTN", labels[key[SPLIT[0]]][2]),
                    "w4a8": ("w4a8 throughout", "clipping (grid)", labels[key[SPLIT[1]]][2]),
                    "split": ("prefill w8a8, decode w4a8", "RTN / clipping",
                              labels[key[SPLIT[0]]][2] + labels[key[SPLIT[1]]][2])}
    stats = compare(base, split, windows, progress=True, resamples=RESAMPLES, seed=0, score_from=prefix)
    tokens = next(iter(stats.values())).tokens
    return (f"\n## Separate prefill and decode weights\n\n"
            f"Each window's first {prefix} tokens prefilled into the paged KV cache by the prefill weights, the other "
            f"{windows.shape[1] - prefix} decoded over it by the decode weights (one chunk: per-token activation "
            f"scales make it equal to one token at a time); only the decoded positions are scored ({tokens} "
            f"predictions), for every row and the bf16 reference alike, so these figures are not the main table's. "
            f"The split row's quantise time is its two rows' sum.\n\n{_table(stats, split_labels)}\n\n"
            f"{_pairs_table(stats, split_labels, SPLIT_PAIRS)}\n")


def _pairs_table(stats, labels, pairs=PAIRS) -> str:
    key = {labels[k][:2]: k for k in stats}
    lines = ["Paired: row a against row b on the same windows (95% bootstrap interval of the difference, "
             f"{RESAMPLES} resamples).", "",
             "| a | b | " + " | ".join(f"{m} [95% CI]" for m in PAIRED) + " |", "| --- | --- |" + " --- |" * len(PAIRED)]
    for a, b in pairs:
        if a not in key or b not in key:
            continue
        sa, sb = stats[key[a]], stats[key[b]]
        cols = {**{f"a_{c}": v for c, v in sa.per_window.items()}, **{f"b_{c}": v for c, v in sb.per_window.items()}}
        total = {c: v.sum() for c, v in cols.items()}
        cells = [_with_ci(float(f(total)), bootstrap_interval(f, cols, RESAMPLES, seed=0), fmt)
                 for f, fmt in PAIRED.values()]
        lines.append(f"| {' '.join(a)} | {' '.join(b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 4 else ""


if __name__ == "__main__":
    sys.exit(main())
