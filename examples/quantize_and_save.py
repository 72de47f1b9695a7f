"""Quantise the embedded model (W8A8 with SmoothQuant, int8 latent KV cache), save it, load it back and
measure what quantisation cost on held-out text.

    python examples/quantize_and_save.py --out /tmp/tiny-w8a8
    python examples/quantize_and_save.py --quant w4a8 --out /tmp/tiny-w4a8

The same from the command line: `graphopt calibrate --quant w8a8_c8 --out DIR` then
`graphopt eval --quantized DIR`. In a compiled graph: `graphopt.compile(model, quant="w8a8")`.
"""

from __future__ import annotations

import argparse

import torch

from graphopt.models import checkpoint
from graphopt.models.tokenizer import load_tokenizer
from graphopt.quant import (PRESETS, CalibrationConfig, QuantConfig, SmoothQuantConfig, load_quantized,
                            quantize_model, quantized_names, save_quantized)
from graphopt.quant.calibration import heldout_tokens
from graphopt.quant.eval import compare, windows_from


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", help=f"a preset instead of the default config ({', '.join(PRESETS)})")
    p.add_argument("--out", default="/tmp/graphopt-quantized")
    args = p.parse_args()

    model = checkpoint.load(None, dtype=torch.float32)       # the embedded tiny DeepSeek-V3 with MTP
    tokenizer = load_tokenizer()
    config = PRESETS[args.quant] if args.quant else QuantConfig(
        "w8a8", algorithms=(SmoothQuantConfig(alpha=0.5),), kv_cache="int8")
    config = config.replace(calibration=CalibrationConfig(num_samples=8, seq_len=256))

    qmodel = quantize_model(model, config, tokenizer=tokenizer)   # calibrates on the training split
    schemes = quantized_names(qmodel)
    print(f"{len(schemes)} quantised matmuls; kept in 16 bit: {', '.join(config.skip)}")
    save_quantized(qmodel, args.out)
    reloaded = load_quantized(args.out)

    windows = windows_from(heldout_tokens(tokenizer)[0], 256, 8)
    stats = compare(model, {"quantised": qmodel, "reloaded": reloaded}, windows)
    for name, s in stats.items():
        print(f"{name:>10}: ppl {s.ppl:.3f} (16-bit {s.base_ppl:.3f}, {s.ppl_change:+.2%}), KL {s.kl:.5f}, "
              f"top-1 agreement {s.top1:.3f}, MTP acceptance {s.mtp_accept:.3f} (16-bit {s.base_mtp_accept:.3f})")
    assert stats["quantised"].ppl == stats["reloaded"].ppl, "a saved checkpoint reloads bit-exactly"


if __name__ == "__main__":
    main()
