"""Host time of the serving loop in steady decode: wall time per `Engine.step()` against the GPU time
of the replayed step, and a cProfile of the host side (where the Python time goes).

    python benchmarks/host_profile.py --batch 1 --k 0 --steps 200

Prints the median wall time per step over `--steps` steady decode steps (no prefill, no admission),
the CUDA-event time of one replayed step, and the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    import graphopt
    from graphopt.models import load
    from graphopt.runtime.request import SamplingParams

    model = load(dtype=torch.bfloat16, device="cuda")
    spec = graphopt.SpecConfig(num_speculative_tokens=args.k) if args.k else None
    compiled = graphopt.compile(model, spec=spec, progress=False, max_batch_size=max(args.batch))
    for B in args.batch:
        engine = compiled.engine(max_batch_size=B)
        for b in range(B):
            engine.add_request([1 + b, 5, 9, 11], SamplingParams(max_new_tokens=4 * args.steps))
        for _ in range(20):                       # prefill, captures, settle
            engine.step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        graphs = [g for g in compiled.executable._bound.values() if g.rows >= B]
        replay = graphs[0].graph.replay if graphs else None
        gpu_ms = None
        if replay is not None:
            a, b_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                replay()
            b_.record()
            b_.synchronize()
            gpu_ms = a.elapsed_time(b_) / 20
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            engine.step()
        prof.disable()
        print(f"batch {B} k {args.k}: wall per step median {1e3 * statistics.median(times):.3f} ms, "
              f"GPU per replay {gpu_ms if gpu_ms is None else round(gpu_ms, 3)} ms, bound graphs "
              f"{len(compiled.executable._bound)}, captures {compiled.executable.captures}", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        while engine.has_unfinished():
            engine.step()


if __name__ == "__main__":
    main()
