"""graphopt::linear's GEMV against cuBLAS at decode row counts, on the V2-Lite shape's projections.

    python benchmarks/gemv.py                     # writes benchmarks/results/gemv.md
    python benchmarks/gemv.py --sweep             # also every tile choice, the best per (weight, M)

A decode step reads each weight once, from HBM, so every timed call here reads a cold weight: the
calls cycle over enough copies of it (>= 256 MB, five times the H200's 50 MB L2) and are captured in
one CUDA graph, whose replay is timed with CUDA events (median of 10 replays / calls: the host launch
time left out, as in a replayed step). "x copy bw" divides the bytes (weight + rows in and out) per
second by the device-to-device copy bandwidth measured in the same run. Each GEMV result is checked
against a float64 product first.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant_gemm import copy_bandwidth, events_ms   # noqa: E402  (benchmarks/ is the script's directory)

RESULTS = ROOT / "benchmarks" / "results" / "gemv.md"
# V2-Lite projections (out, K): attention, the shared experts (2 x 1408 wide), the dense layer's MLP, lm_head
SHAPES = [("q_proj", 3072, 2048), ("kv_a_proj", 576, 2048), ("o_proj", 2048, 2048), ("shared gate", 2816, 2048),
          ("shared down", 2048, 2816), ("dense gate", 10944, 2048), ("dense down", 2048, 10944),
          ("lm_head", 102400, 2048)]
COLD_BYTES = 256 << 20


def cold_us(fn, weights: list[torch.Tensor], x: torch.Tensor, rounds: int) -> float:
    """GPU microseconds per call of fn(x, w), each call reading a weight not read since > L2 bytes ago."""
    calls = [(x, w) for _ in range(rounds) for w in weights]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for a, w in calls[:3]:
            fn(a, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a, w in calls:
            fn(a, w)
    return events_ms(graph.replay, reps=10) * 1e3 / len(calls)


def tile_choices(m: int, k: int):
    import triton
    bm = triton.next_power_of_2(m)
    for bn, bk, warps in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (4, 8)):
        if 2048 <= bm * bn * bk <= 16384 and bk <= triton.next_power_of_2(k):
            yield bm, bn, bk, warps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--sweep", action="store_true", help="time every tile choice too")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from graphopt.backends.inductor.kernels import gemv

    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    head = ("| weight (out x K) | M | cuBLAS us | GEMV us | GEMV tiles | speedup | cuBLAS x copy bw | GEMV x copy bw |"
            + (" best tiles (sweep) | best us |" if args.sweep else ""))
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    print(head, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, out, k in SHAPES:
        nbytes = 2 * out * k
        copies = max(1, min(64, -(-COLD_BYTES // nbytes)))
        weights = [torch.randn(out, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
                   for _ in range(copies)]
        rounds = max(1, 64 // copies)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
            ref = x.double() @ weights[0].double().t()
            tiles = gemv.config(m, out, k)
            got = gemv.gemv(x, weights[0], tiles).double()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, f"{name} M={m}: GEMV differs from the float64 product by {err:.2e} (relative)"
            t_blas = cold_us(lambda a, w: F.linear(a, w), weights, x, rounds)
            t_gemv = cold_us(lambda a, w: gemv.gemv(a, w, tiles), weights, x, rounds)
            moved = nbytes + 2 * m * (k + out)
            row = (f"| {name} ({out} x {k}) | {m} | {t_blas:.1f} | {t_gemv:.1f} | {tiles} | {t_blas / t_gemv:.2f}x | "
                   f"{moved / (t_blas * 1e-6) / bw:.2f} | {moved / (t_gemv * 1e-6) / bw:.2f} |")
            if args.sweep:
                best = min(((cold_us(lambda a, w, t=t: gemv.gemv(a, w, t), weights, x, rounds), t)
                            for t in tile_choices(m, k)), key=lambda r: r[0])
                row += f" {best[1]} | {best[0]:.1f} |"
            print(row, flush=True)
            lines.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(f"Command: `python benchmarks/gemv.py {' '.join(sys.argv[1:])}`\n\n"
                                f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
                                f"{bw / 1e12:.2f} TB/s (read + write); tiles = (BLOCK_M, BLOCK_N, BLOCK_K, warps)\n\n"
                                + "\n".join(lines) + "\n")
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
