"""Prefill speed on one GPU: one prompt chunk per row through the inductor executable, replayed as a
CUDA graph per (rows, tokens, table width) bucket against the same compiled graph run without one.

    python benchmarks/prefill.py --model v2lite --shapes 1x16 8x16 1x128 8x128 1x512 --profile

For each shape B x T (B rows of T prompt tokens, greedy, the last chunk): wall time of one call
(synchronised, median of 5 after warm-up), the GPU's busy time inside it and the kernels it launched
(profiler trace, device events only), for both paths, and whether their first tokens agree. The
first graph call of a bucket captures it (its time is the `capture s` column). --profile adds a
cProfile of one un-captured call of the first shape: where the host time of a compiled prefill goes.
Rows go to `prefill_<model><suffix>.md` / `.json` under --out as they are measured.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode import build_model, gpu_trace, wall   # noqa: E402  (benchmarks/ is the script's directory)


def chunk_inputs(ex, caches, rows: int, tokens: int, seed: int = 0):
    """SpecPrefillInputs of `rows` random prompts of `tokens` tokens, row b in its own blocks."""
    from graphopt.step.contract import IDLE_SAMPLING, SAMPLING_FIELDS, SpecPrefillInputs
    from graphopt.step.paged import blocks_for
    kv, mtp = caches
    per_row = blocks_for(tokens + 2, ex.block_size)
    g = torch.Generator().manual_seed(seed)
    dev = ex.device
    tables = (1 + torch.arange(rows * per_row, device=dev)).view(rows, per_row)
    params = {n: torch.full((rows,), IDLE_SAMPLING[n], dtype=d, device=dev) for n, d in SAMPLING_FIELDS}
    params["max_pos"].fill_(tokens + 64)
    return SpecPrefillInputs(ids=torch.randint(3, ex.config.vocab_size, (rows, tokens), generator=g).to(dev),
                             lengths=torch.full((rows,), tokens, dtype=torch.int64, device=dev),
                             start_pos=torch.zeros(rows, dtype=torch.int64, device=dev), block_tables=tables,
                             **params, is_last_chunk=True, kv_caches=kv, mtp_caches=mtp)


def measure(fn, reps: int = 5) -> tuple[float, dict]:
    for _ in range(2):
        fn()
    ms = statistics.median(1e3 * wall(fn) for _ in range(reps))
    trace = gpu_trace(fn)
    return ms, trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("embedded", "v2lite"), default="v2lite")
    ap.add_argument("--shapes", nargs="+", default=["1x16", "8x16", "1x128", "8x128", "1x512"])
    ap.add_argument("--k", type=int, default=0, help="MTP draft tokens (the prefill also drafts)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--suffix", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import graphopt
    from graphopt.backends.inductor import prefill_shape
    from graphopt.step.spec_step import as_outputs, prefill_args

    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
    torch.set_grad_enabled(False)                  # as the executable's prefill runs (one compiled graph)
    torch.manual_seed(0)
    model = build_model(args.model)
    spec = graphopt.SpecConfig(num_speculative_tokens=args.k) if args.k else None
    t0 = time.perf_counter()
    compiled = graphopt.compile(model, spec=spec, progress=False, max_batch_size=max(b for b, _ in shapes),
                                prefill_chunk_size=max(t for _, t in shapes))
    compile_s = time.perf_counter() - t0
    ex = compiled.executable
    caches = ex.new_caches(1 + sum(b * (-(-(t + 2) // ex.block_size)) for b, t in shapes))
    command = "python benchmarks/prefill.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"compile {compile_s:.1f} s", flush=True)
    for B, T in shapes:
        inputs = chunk_inputs(ex, caches, B, T)
        t0 = time.perf_counter()
        plain = as_outputs(ex._prefill(*prefill_args(inputs)))      # compiles this shape's kernels if new
        first_s = time.perf_counter() - t0
        if args.profile and (B, T) == shapes[0]:
            prof = cProfile.Profile()
            prof.enable()
            ex._prefill(*prefill_args(inputs))
            torch.cuda.synchronize()
            prof.disable()
            print("PROFILE one compiled prefill call, top functions by own time:", flush=True)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        plain_ms, plain_trace = measure(lambda: ex._prefill(*prefill_args(inputs)))
        t0 = time.perf_counter()
        graphed = ex.prefill(inputs)
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0
        same = bool(torch.equal(graphed.out_tokens, plain.out_tokens))
        graph_ms, graph_trace = measure(lambda: ex.prefill(inputs))
        row = dict(rows=B, tokens=T, plain_ms=plain_ms, plain_busy_ms=plain_trace["busy_us"] / 1e3,
                   plain_kernels=plain_trace["kernels"], graph_ms=graph_ms, graph_busy_ms=graph_trace["busy_us"] / 1e3,
                   graph_kernels=graph_trace["kernels"], first_call_s=first_s, capture_s=capture_s,
                   same_first_tokens=same, bucket=prefill_shape(B, T, inputs.block_tables.shape[1], ex.buckets,
                                                                ex.width, ex.prefill_graph_tokens))
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        (out / f"prefill_{args.model}{args.suffix}.json").write_text(json.dumps(
            {"rows": rows, "command": command, "compile_s": compile_s}, indent=1))
        (out / f"prefill_{args.model}{args.suffix}.md").write_text(render(rows, args.model, command, compile_s))
    print(render(rows, args.model, command, compile_s))


def render(rows: list[dict], model: str, command: str, compile_s: float) -> str:
    lines = [f"# Prefill speed, {model} model, bf16, greedy, last chunk", "",
             f"Command (one {torch.cuda.get_device_name() if torch.cuda.is_available() else 'GPU'} run): `{command}`; compile {compile_s:.1f} s", "",
             "| rows x tokens | compiled ms (wall) | GPU busy ms | kernels | CUDA graph ms (wall) | GPU busy ms | "
             "kernels | speedup | bucket | capture s | same first tokens |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['rows']} x {r['tokens']} | {r['plain_ms']:.2f} | {r['plain_busy_ms']:.2f} | "
                     f"{r['plain_kernels']} | {r['graph_ms']:.2f} | {r['graph_busy_ms']:.2f} | {r['graph_kernels']} | "
                     f"{r['plain_ms'] / r['graph_ms']:.2f}x | {r['bucket']} | {r['capture_s']:.1f} | {r['same_first_tokens']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
