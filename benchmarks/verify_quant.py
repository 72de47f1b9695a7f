"""What verify mode measures for quant_insert on the embedded model, per quantisation preset.

    nice python benchmarks/verify_quant.py                    # every preset, ~6 min on 2 CPU cores
    nice python benchmarks/verify_quant.py --presets w8a8 c8

Each preset compiles `graphopt.models.load(dtype=torch.float32)` with `graphopt.compile(model,
spec="mtp", quant=preset, verify=True)` (spec=None quantises the same main graph on the same verify
inputs, so its main row is this one). Verify mode compares each graph after quant_insert with the float
graph before it on 8 draws of its random valid inputs (6 positions each); the pass record's notes give
the next-token KL and the top-1 agreement, next to the preset's budget (graphopt/passes/verify.py,
QUANT_BUDGETS), and the worst relative error of the other float values (hidden states, caches). Writes the
table to benchmarks/results/verify_quant.md (docs/passes.md quotes it).
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from pathlib import Path

import torch

import graphopt
import graphopt.models
from graphopt.passes.verify import quant_budget
from graphopt.quant import PRESETS

RESULTS = Path(__file__).parent / "results" / "verify_quant.md"
NOTE = re.compile(r"next-token KL (\S+), top-1 agreement (\S+)%.*relative error (\S+) \(bound")


def measure(model, preset: str) -> list[str]:
    compiled = graphopt.compile(model, spec="mtp", quant=preset, verify=True, progress=False)
    _, budget = quant_budget(preset)
    rows = []
    for graph in ("main", "mtp0"):
        kl, top1, rel = NOTE.search(compiled.report.notes[f"{graph}/quant_insert"]).groups()
        rows.append(f"| {preset} | {graph} | {float(kl):.2e} | {float(top1):.1f}% | {budget.kl:g} | "
                    f"{budget.top1:.0%} | {float(rel):.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    args = parser.parse_args()
    model = graphopt.models.load(dtype=torch.float32)
    start, rows = time.perf_counter(), []
    for preset in args.presets:
        rows += measure(model, preset)
        print(rows[-2], rows[-1], sep="\n", flush=True)
    lines = ["# Verify mode on quant_insert: the embedded model, float32", "",
             "Command: `python benchmarks/verify_quant.py`  ",
             f"Host: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"total {time.perf_counter() - start:.0f} s.  ",
             "Inputs: verify mode's random valid steps (random token ids over random cache contents), "
             "8 draws x 6 positions per graph.", "",
             "| preset | graph | next-token KL | top-1 agreement | KL budget | top-1 floor | "
             "other values: rel. error (bound 1) |",
             "| --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
