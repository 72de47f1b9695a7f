"""Per-GEMM speed of the quantised kernels against bf16 on one GPU, at the V2-Lite shape's linears.

    python benchmarks/quant_gemm.py                      # writes benchmarks/results/quant_gemm.md

For each weight (out x K) and row count M: bf16 `x @ w.T`, int8 `graphopt::int8_matmul`'s CUDA kernel
(`torch._int_mm`, rows padded to 17 below that) and FP8 `graphopt::fp8_linear`'s (`torch._scaled_mm`,
rowwise scales, bf16 out), its one-row int8 GEMV (`int8_gemv`, M = 1 only), W4A8's few-row GEMV form (`w4a8_gemv`, timed at M <= 4) and W4A8 `graphopt::w4a8_matmul`'s packed-int4 Triton kernel (group 128, 64 for dense down)
beside the op's reference path (unpack + widen to an int8 copy + int8 GEMM, what runs without the
kernel); GPU time per call: 20 calls captured in one CUDA graph, the replay timed
with CUDA events, median of 20 replays / 20 (host launch time left out, as in a replayed step). GB/s counts the weight bytes
plus the activations in and out; "x copy bw" divides it by the device-to-device copy bandwidth
measured in the same run (the floor a bandwidth-bound GEMM approaches). Each int8 / int4 result is
checked bit-identical to the reference op first; FP8 within bf16 rounding.

    python benchmarks/quant_gemm.py --w4a8-sweep        # W4A8 tiles (BLOCK_N x BLOCK_KP x warps) at 1 and 64 rows
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "quant_gemm.md"
# V2-Lite linears (out, K): q_proj, kv_a_proj, o_proj, dense gate+up, dense down, one expert's gate+up, lm_head
SHAPES = [("q_proj", 3072, 2048), ("kv_a_proj", 576, 2048), ("o_proj", 2048, 2048), ("dense gate_up", 21888, 2048),
          ("dense down", 2048, 10944), ("expert gate_up", 2816, 2048), ("lm_head", 102400, 2048)]


def events_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, calls: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return events_ms(graph.replay, reps=20) / calls


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = events_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / (ms * 1e-3)          # read + write bytes per second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--w4a8-sweep", action="store_true", help="time W4A8 tile choices instead (prints, writes --out)")
    args = ap.parse_args()
    from graphopt.backends.inductor.kernels import gemv, quant_gemm, w4a8_gemm
    from graphopt.ops import quant
    from graphopt.ops.packing import pack_int4
    if args.w4a8_sweep:
        return w4a8_sweep(args, quant, w4a8_gemm, pack_int4)

    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    head = ("| weight (out x K) | M | bf16 us | int8 us | int8 gemv us | fp8 us | w4a8 us | w4a8 gemv us | w4a8 ref us | int8 / bf16 | "
            "int8 gemv / bf16 | fp8 / bf16 | w4a8 / bf16 | bf16 x copy bw | int8 x copy bw | int8 gemv x copy bw | "
            "fp8 x copy bw | w4a8 x copy bw | int8 TOPS | fp8 TFLOP/s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    print(head, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, out, k in SHAPES:
        w = torch.randn(out, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        w8 = torch.randint(-127, 128, (out, k), device="cuda", generator=g, dtype=torch.int8)
        ws = (w.float().abs().amax(-1, keepdim=True) / quant.FP8_MAX)
        wf8 = (w.float() / ws).to(quant.FP8_DTYPE)
        w4, s4 = _int4_weight(out, k, g, pack_int4)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
            x8 = torch.randint(-127, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
            xq, xs = quant.quantize_fp8(x, None, 0)
            assert torch.equal(quant_gemm.int8_matmul_cuda(x8, w8), quant.int8_matmul._init_fn(x8, w8))
            ref = quant.fp8_linear._init_fn(xq, xs, wf8, ws, None, torch.float32)
            got = quant_gemm.fp8_linear_cuda(xq, xs, wf8, ws, None, torch.bfloat16).float()
            assert (got - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-3, "fp8 kernel differs from the reference"
            ref4 = quant.w4a8_matmul._init_fn(x8, w4, s4)
            assert torch.equal(w4a8_gemm.w4a8_gemm(x8, w4, s4), ref4), "w4a8 kernel differs from the reference"
            t16 = graph_ms(lambda: x @ w.t())
            t4 = graph_ms(lambda: w4a8_gemm.w4a8_gemm(x8, w4, s4))   # the kernel at every M (the op: <= 16 rows)
            t4ref = graph_ms(lambda: quant.w4a8_matmul._init_fn(x8, w4, s4))
            tg = t4g = None
            if m == 1:     # the one-row int8 GEMV (int8_gemv)
                assert torch.equal(gemv.int8_gemv(x8, w8), quant.int8_matmul._init_fn(x8, w8))
                tg = graph_ms(lambda: gemv.int8_gemv(x8, w8))
            if m <= 4:     # W4A8's few-row GEMV form (w4a8_gemv; the op takes it up to GEMV_MAX_ROWS)
                assert torch.equal(w4a8_gemm.w4a8_gemv(x8, w4, s4), ref4)
                t4g = graph_ms(lambda: w4a8_gemm.w4a8_gemv(x8, w4, s4))
            t8 = graph_ms(lambda: quant_gemm.int8_matmul_cuda(x8, w8))
            tf8 = graph_ms(lambda: quant_gemm.fp8_linear_cuda(xq, xs, wf8, ws, None, torch.bfloat16))
            b16 = 2 * out * k + 2 * m * (k + out)
            b8 = out * k + m * k + 4 * m * out
            bf8 = out * k + m * k + 2 * m * out
            b4 = out * k // 2 + out * (k // group(k)) + m * k + 4 * m * out
            ops = 2 * m * out * k
            gemv_cols = ("-", "-", "-") if tg is None else (f"{tg * 1e3:.1f}", f"{t16 / tg:.2f}x",
                                                           f"{b8 / (tg * 1e-3) / bw:.2f}")
            row = (f"| {name} ({out} x {k}) | {m} | {t16 * 1e3:.1f} | {t8 * 1e3:.1f} | {gemv_cols[0]} | {tf8 * 1e3:.1f} | "
                   f"{t4 * 1e3:.1f} | {'-' if t4g is None else f'{t4g * 1e3:.1f}'} | {t4ref * 1e3:.1f} | {t16 / t8:.2f}x | {gemv_cols[1]} | {t16 / tf8:.2f}x | "
                   f"{t16 / t4:.2f}x | {b16 / (t16 * 1e-3) / bw:.2f} | {b8 / (t8 * 1e-3) / bw:.2f} | {gemv_cols[2]} | "
                   f"{bf8 / (tf8 * 1e-3) / bw:.2f} | {b4 / (t4 * 1e-3) / bw:.2f} | {ops / (t8 * 1e-3) / 1e12:.1f} | "
                   f"{ops / (tf8 * 1e-3) / 1e12:.1f} |")
            print(row, flush=True)
            lines.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(f"Command: `python benchmarks/quant_gemm.py {' '.join(sys.argv[1:])}`\n\n"
                                f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
                                f"{bw / 1e12:.2f} TB/s (read + write)\n\n" + "\n".join(lines) + "\n")


def group(k: int) -> int:
    """W4A8's int8 group scales: one per 128 weights of K, per 64 where 128 does not divide K (dense down)."""
    return 128 if k % 128 == 0 else 64


def _int4_weight(out: int, k: int, g: torch.Generator, pack_int4) -> tuple[torch.Tensor, torch.Tensor]:
    """A random packed int4 weight uint8 [out, K/2] and its int8 group scales [out, K/G] (1..16)."""
    w4 = torch.randint(-8, 8, (out, k), device="cuda", generator=g, dtype=torch.int8)
    s4 = torch.randint(1, 17, (out, k // group(k)), device="cuda", generator=g, dtype=torch.int8)
    return pack_int4(w4), s4


def w4a8_sweep(args, quant, w4a8_gemm, pack_int4) -> None:
    """W4A8 kernel time per tile choice at the decode shapes: which tiles the row-count rule should pick."""
    bw = copy_bandwidth()
    head = "| weight (out x K) | M | BLOCK_M | BLOCK_N | BLOCK_KP | warps | us | x copy bw |"
    lines = [f"Command: `python benchmarks/quant_gemm.py {' '.join(sys.argv[1:])}`", "",
             f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s",
             "", head, "|" + " --- |" * (head.count("|") - 1)]
    print("\n".join(lines[2:]), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, out, k in [s for s in SHAPES if s[0] in ("q_proj", "dense down")]:
        w4, s4 = _int4_weight(out, k, g, pack_int4)
        for m in (1, 64):
            x8 = torch.randint(-127, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
            ref = quant.w4a8_matmul._init_fn(x8, w4, s4)
            for bm in ((16,) if m <= 16 else (64,)):
                for bn in (16, 32, 64, 128):
                    for bkp in (64, 128, 256):
                        for warps in (4, 8):
                            tiles = (bm, bn, bkp, warps)
                            try:
                                assert torch.equal(w4a8_gemm.w4a8_gemm(x8, w4, s4, tiles=tiles), ref)
                                t = graph_ms(lambda: w4a8_gemm.w4a8_gemm(x8, w4, s4, tiles=tiles))
                            except Exception as exc:       # a tile too big for shared memory: say so, go on
                                print(f"{name} M={m} tiles {tiles}: {type(exc).__name__}", flush=True)
                                continue
                            byt = out * k // 2 + out * (k // group(k)) + m * k + 4 * m * out
                            row = (f"| {name} ({out} x {k}) | {m} | {bm} | {bn} | {bkp} | {warps} | {t * 1e3:.1f} | "
                                   f"{byt / (t * 1e-3) / bw:.2f} |")
                            print(row, flush=True)
                            lines.append(row)
                            args.out.parent.mkdir(parents=True, exist_ok=True)
                            args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
