"""Compile time of the embedded model, per stage: capture, then every pass on every graph.

    nice python benchmarks/compile_time.py                       # plain, spec="mtp", spec + quant="w8a8"
    nice python benchmarks/compile_time.py --variants mtp        # one variant
    nice python benchmarks/compile_time.py --profile mtp.prof    # cProfile of the spec="mtp" compile

Each variant compiles `graphopt.models.load()` (float32, CPU) with `graphopt.compile` once in this
process, after one untimed warm-up compile (imports, op registration and torch's first-export
caches are paid there, not in the table). Stage seconds come from `CompiledModel.report`: "capture"
is torch.export of the main step and each MTP module, then one row per pass record (graph, pass).
Writes the table to benchmarks/results/compile_time.md (benchmarks/NOTES.md quotes it).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import sys
import time
from pathlib import Path

import torch

import graphopt
from graphopt.models import load

RESULTS = Path(__file__).parent / "results" / "compile_time.md"
VARIANTS = {"plain": {}, "mtp": {"spec": "mtp"}, "mtp+w8a8": {"spec": "mtp", "quant": "w8a8"}}


def _compile(model, kwargs):
    t0 = time.perf_counter()
    compiled = graphopt.compile(model, **kwargs)
    return compiled, time.perf_counter() - t0


def _stages(compiled, total: float) -> list[tuple[str, float]]:
    """(stage, seconds): capture, each pass that took >= 10 ms, the rest (lowering, bookkeeping)."""
    rep = compiled.report
    rows = [("capture", rep.seconds.get("capture", 0.0))]
    small = 0.0
    for r in rep.records:
        if not r.ran:
            continue
        if r.seconds >= 0.01:
            rows.append((f"{r.graph}: {r.name}", r.seconds))
        else:
            small += r.seconds
    rows.append(("passes under 10 ms, together", small))
    rows.append(("other (lowering, calibration inputs, bookkeeping)", total - sum(s for _, s in rows)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the spec='mtp' compile into this file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    model = load(dtype=torch.float32).eval()
    _compile(model, {})   # warm-up, untimed
    command = "python benchmarks/compile_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, model {model.config.num_hidden_layers} layers + "
             f"{len(model.mtp)} MTP, float32 CPU", ""]
    totals = {}
    for name in args.variants:
        kwargs = VARIANTS[name]
        if args.profile is not None and name == "mtp":
            prof = cProfile.Profile()
            prof.enable()
            compiled, total = _compile(model, kwargs)
            prof.disable()
            prof.dump_stats(str(args.profile))
        else:
            compiled, total = _compile(model, kwargs)
        totals[name] = total
        lines += [f"### {name}: `graphopt.compile(load(), {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})`"
                  f" = {total:.2f} s", "", "| stage | seconds | share |", "| --- | --- | --- |"]
        lines += [f"| {stage} | {s:.2f} | {100 * s / total:.0f}% |" for stage, s in _stages(compiled, total)]
        lines.append("")
        del compiled
    lines += ["| variant | compile seconds |", "| --- | --- |"] + [f"| {n} | {s:.2f} |" for n, s in totals.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
