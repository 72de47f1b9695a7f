"""The MoE alignment (assignments grouped by expert into padded blocks) three ways, on one GPU:
torch (`_align_to_blocks`, ~30 small kernels), one Triton program with stable ranks by comparison,
and the same program with ranks from atomic increments (a benchmark, not a test).

    python benchmarks/moe_align.py

Each variant is captured in a CUDA graph of 20 calls (as the decode step replays it), timed with CUDA
events after warm-up; the table gives the median us per call over 7 replays. M = tokens x top-k.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt.backends.inductor.kernels import moe  # noqa: E402

CASES = [(64, 6, 1), (64, 6, 8), (64, 6, 64), (64, 6, 256), (256, 8, 8), (256, 8, 64), (256, 8, 256)]  # E, k, N


def time_us(fn, calls: int = 20) -> float:
    fn()                                                   # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    out = ROOT / "benchmarks" / "results" if len(sys.argv) < 2 else Path(sys.argv[1])
    lines = [f"# MoE alignment on {torch.cuda.get_device_name()} (torch {torch.__version__})", "",
             "Command: `python benchmarks/moe_align.py`", "",
             "| E | k | tokens | M | block_m | torch us | triton stable us | triton atomic us |", "|---|---|---|---|---|---|---|---|"]
    for E, k, N in CASES:
        M = N * k
        block_m = moe._block_m(M, E)
        ids = torch.randint(0, E, (M,), device="cuda")
        row = [time_us(lambda: moe._align_to_blocks(ids, E, block_m)),
               time_us(lambda: moe._align_triton(ids, E, block_m)),
               time_us(lambda: moe._align_triton(ids, E, block_m, atomic=True))]
        lines.append(f"| {E} | {k} | {N} | {M} | {block_m} | " + " | ".join(f"{t:.1f}" for t in row) + " |")
        print(lines[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_align.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
