"""Greedy decode speed on the CPU: the inductor and onnx backends against the eager backend and the
eager reference model, through the same runtime Engine, side by side in one process.

    nice python benchmarks/cpu_backends.py --batch 1 4 --new-tokens 32

The embedded model (float32) is compiled once with the eager backend; the inductor executable lowers
that same Program (Inductor C++ / OpenMP code, no CUDA graphs on the CPU), and so does the onnx
executable (onnxruntime sessions, caches bound in place; skipped without the `onnx` extra); the reference is
`Engine.from_model(model)` (the model's own forward per step). Per row: one warm-up generation, then
the best of `--repeats` timed generations; checks that every system emitted the same tokens.
Rows are printed as measured; the table lands in benchmarks/results/cpu_backends.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "cpu_backends.md"
PROMPTS = [[1, 50, 60, 70], [1, 42], [1, 9, 8, 7, 6, 5, 4, 3, 2], [1, 300, 301, 302, 303]]


def timed(generate, prompts, new_tokens: int, repeats: int) -> tuple[list, float]:
    generate(prompts, 4)                                                   # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(prompts, new_tokens)
        best = min(best, time.perf_counter() - t0)
    return out, sum(len(o) for o in out) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import graphopt
    from graphopt.api import CompiledModel
    from graphopt.backends.inductor import InductorExecutable
    from graphopt.models import load
    from graphopt.runtime import Engine, SamplingParams

    model = load(dtype=torch.float32)
    t0 = time.perf_counter()
    eager = graphopt.compile(model, backend="eager", progress=False, max_batch_size=max(args.batch))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ind_exe = InductorExecutable(eager.program, eager.options)
    inductor = CompiledModel(ind_exe, eager.options, eager.spec, eager.quant, "inductor", eager.report)
    inductor.generate(PROMPTS[:1], max_new_tokens=2, ignore_eos=True)          # Inductor compiles here
    lower_s = time.perf_counter() - t0

    def reference(prompts, n):
        engine = Engine.from_model(model, max_batch_size=len(prompts))
        return engine.generate(prompts, SamplingParams(max_new_tokens=n, eos_token_id=None))

    systems = {"reference model": reference,
               "eager backend": lambda p, n: eager.generate(p, max_new_tokens=n, ignore_eos=True),
               "inductor backend": lambda p, n: inductor.generate(p, max_new_tokens=n, ignore_eos=True)}
    onnx_s = None
    try:
        from graphopt.backends.onnx import OnnxExecutable
    except ImportError as e:
        print(f"onnx backend skipped: {e}", flush=True)
    else:
        t0 = time.perf_counter()
        onnx = CompiledModel(OnnxExecutable(eager.program, threads=torch.get_num_threads()), eager.options,
                             eager.spec, eager.quant, "onnx", eager.report)
        onnx_s = time.perf_counter() - t0
        systems["onnx backend"] = lambda p, n: onnx.generate(p, max_new_tokens=n, ignore_eos=True)
    rows = []
    for B in args.batch:
        prompts = (PROMPTS * B)[:B]
        want, speeds = None, {}
        for name, fn in systems.items():
            out, tps = timed(fn, prompts, args.new_tokens, args.repeats)
            want = want or out
            speeds[name] = tps
            rows.append((name, B, tps, tps / speeds["eager backend"] if "eager backend" in speeds else None, out == want))
            print(f"{name:18s} batch {B}: {tps:7.1f} tok/s  same tokens {out == want}", flush=True)
    cmd = f"nice python benchmarks/cpu_backends.py --batch {' '.join(map(str, args.batch))} --new-tokens {args.new_tokens}"
    lines = ["# CPU: inductor backend vs eager backend vs the eager reference model (embedded model, float32, greedy)",
             "", f"`{cmd}` ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"eager compile {compile_s:.0f} s, inductor lowering + first call {lower_s:.0f} s"
             + (f", onnx export + sessions {onnx_s:.0f} s" if onnx_s is not None else "") + f"; best of {args.repeats})",
             "", "| system | batch | tokens/s | x eager backend | same tokens |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {n} | {b} | {t:.1f} | {'-' if x is None else f'{x:.2f}'} | {same} |" for n, b, t, x, same in rows]
    lines += ["", "The machine is shared (2 cores): rerun before quoting small differences.", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
