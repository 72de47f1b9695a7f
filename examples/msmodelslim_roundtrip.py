"""Quantise the embedded model with graphopt, export it in msModelSlim's (Ascend) layout, import it back
and check that the imported model computes the same logits, for W8A8_DYNAMIC, W8A8 (static) and W4A8_DYNAMIC;
then W8A8 with SmoothQuant, its factors folded into the norms on export (close logits, not equal ones).

    python examples/msmodelslim_roundtrip.py --out /tmp/graphopt-msmodelslim

Each export is a directory MindIE / vLLM Ascend read (config.json, quant_model_description.json,
quant_model_weight_<type>.safetensors); docs/quantization.md (msModelSlim) lists the layout and its limits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from graphopt.models import checkpoint
from graphopt.models.tokenizer import load_tokenizer
from graphopt.quant import QuantConfig, SmoothQuantConfig, load_msmodelslim, quantize_model, save_msmodelslim
from graphopt.quant.calibration import heldout_tokens

CONFIGS = {"W8A8_DYNAMIC": QuantConfig("w8a8"),                  # data-free: RTN weights, per-token activations
           "W8A8": QuantConfig("w8a8_static"),                   # calibrated per-tensor activation scales
           "W4A8_DYNAMIC": QuantConfig("w4a8", group_size=16)}   # int4 weights, int8 scale per 16 channels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/graphopt-msmodelslim")
    args = p.parse_args()

    model = checkpoint.load(None, dtype=torch.float32)          # the embedded tiny DeepSeek-V3 with MTP
    evaluation, calibration = heldout_tokens(load_tokenizer())
    calib = calibration[: 4 * 128].reshape(4, 128)               # 4 windows of 128 tokens
    ids = evaluation[:64].reshape(1, 64)
    for qtype, config in CONFIGS.items():
        qmodel = quantize_model(model, config, calib, progress=False)
        out = Path(args.out) / qtype.lower()
        save_msmodelslim(qmodel, out)
        desc = json.loads((out / "quant_model_description.json").read_text())
        imported = load_msmodelslim(out, dtype=torch.float32)
        with torch.no_grad():
            same = torch.equal(imported(ids), qmodel(ids))
        n = sum(v == qtype for k, v in desc.items() if k.endswith(".weight"))
        print(f"{qtype}: {n} quantised weights in {out}; imported logits equal graphopt's: {same}")
        assert same, "an export re-imports bit-exactly"

    # one SmoothQuant factor per norm output (scope="input"), which the export folds into the norm weights:
    # exact in real arithmetic, but float rounding moves a few int8 roundings by one step
    config = QuantConfig("w8a8_static", algorithms=(SmoothQuantConfig(0.5, scope="input"),))
    qmodel = quantize_model(model, config, calib, progress=False)
    out = Path(args.out) / "w8a8_smoothquant"
    save_msmodelslim(qmodel, out)
    imported = load_msmodelslim(out, dtype=torch.float32)
    with torch.no_grad():
        ref, mine, theirs = model(ids), qmodel(ids), imported(ids)
    export, quant = (float((b - a).norm() / a.norm()) for a, b in ((mine, theirs), (ref, mine)))
    top1 = float((mine.argmax(-1) == theirs.argmax(-1)).double().mean())
    print(f"W8A8 + SmoothQuant: folded into the norms in {out}; the export changes the logits by {export:.2g} "
          f"(relative), quantisation by {quant:.2g}; top-1 agreement {top1:.3f}")
    assert export < 0.5 * quant, "the folded export stays far closer to graphopt's model than quantisation is"


if __name__ == "__main__":
    main()
