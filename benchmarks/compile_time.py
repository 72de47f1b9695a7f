"""Compile time of the embedded model, per stage: capture, then every pass on every graph.

    nice python benchmarks/compile_time.py                       # plain, spec="mtp", spec + quant="w8a8"
    nice python benchmarks/compile_time.py --variants mtp        # one variant
    nice python benchmarks/compile_time.py --profile mtp.prof    # cProfile of the spec="mtp" compile
    nice python benchmarks/compile_time.py --repeat 3            # each variant 3 times, medians

Each variant compiles `graphopt.models.load()` (float32, CPU) with `graphopt.compile` --repeat times
in this process (the variants interleaved; the stage table is the run with the median total), after
one untimed warm-up compile (imports, op registration and torch's first-export
caches are paid there, not in the table). Stage seconds come from `CompiledModel.report`: "capture"
is torch.export of the main step and each MTP module, then one row per pass record (graph, pass).
Writes the table to benchmarks/results/compile_time.md (benchmarks/NOTES.md quotes it).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import statistics
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
    parser.add_argument("--repeat", type=int, default=1, help="compiles per variant (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    model = load(dtype=torch.float32).eval()
    _compile(model, {})   # warm-up, untimed
    command = "python benchmarks/compile_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, model {model.config.num_hidden_layers} layers + "
             f"{len(model.mtp)} MTP, float32 CPU", ""]
    runs: dict[str, list] = {name: [] for name in args.variants}
    for _ in range(max(1, args.repeat)):
        for name in args.variants:
            kwargs = VARIANTS[name]
            if args.profile is not None and name == "mtp" and not runs[name]:
                prof = cProfile.Profile()
                prof.enable()
                compiled, total = _compile(model, kwargs)
                prof.disable()
                prof.dump_stats(str(args.profile))
            else:
                compiled, total = _compile(model, kwargs)
            runs[name].append((total, _stages(compiled, total)))
            print(f"{name}: {total:.2f} s", flush=True)
            del compiled
    totals = {}
    for name, kwargs in ((n, VARIANTS[n]) for n in args.variants):
        ordered = sorted(runs[name], key=lambda r: r[0])
        total, stages = ordered[(len(ordered) - 1) // 2]
        totals[name] = (statistics.median(t for t, _ in ordered), [t for t, _ in runs[name]])
        lines += [f"### {name}: `graphopt.compile(load(), {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})`"
                  f" = {total:.2f} s", "", "| stage | seconds | share |", "| --- | --- | --- |"]
        lines += [f"| {stage} | {s:.2f} | {100 * s / total:.0f}% |" for stage, s in stages]
        lines.append("")
    lines += ["| variant | median compile seconds | runs |", "| --- | --- | --- |"]
    lines += [f"| {n} | {m:.2f} | {', '.join(f'{t:.2f}' for t in ts)} |" for n, (m, ts) in totals.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
