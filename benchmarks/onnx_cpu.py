"""Greedy decode speed on the CPU: onnxruntime (the onnx backend) beside the eager backend.

    nice python benchmarks/onnx_cpu.py                    # the embedded model, plain decoding
    nice python benchmarks/onnx_cpu.py --spec mtp         # with MTP k = 1
    nice python benchmarks/onnx_cpu.py --threads 2 --new-tokens 32

The embedded model (`graphopt.models.load()`, float32) is compiled ONCE with the eager backend; the
onnx executable lowers that same Program once and runs it with both cache bindings (docs/onnx.md),
so every row runs the same graphs. Per row: one untimed warm-up generation, then `--repeats` timed generations of
`--new-tokens` tokens for a batch of `--batch` prompts through the runtime Engine. tokens/s counts
generated tokens of the whole batch; ms/step is wall time per decode call (prefill included in
the total, it is one call). Also checks that every backend emitted the same tokens.
Writes the table to benchmarks/results/onnx_cpu.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import onnxruntime
import torch
from tqdm import tqdm

import graphopt
from graphopt.backends.onnx import OnnxExecutable
from graphopt.api import CompiledModel
from graphopt.models import load

RESULTS = Path(__file__).parent / "results" / "onnx_cpu.md"
PROMPTS = [[1, 50, 60, 70], [1, 42], [1, 9, 8, 7, 6, 5, 4, 3, 2], [1, 300, 301, 302, 303]]


def _counting(exe):
    """Wrap exe.decode to count decode calls (the steps of the table)."""
    calls = [0]
    decode = exe.decode

    def counted(inputs):
        calls[0] += 1
        return decode(inputs)
    exe.decode = counted
    return calls


def _measure(compiled: CompiledModel, prompts, new_tokens: int, repeats: int):
    compiled.generate(prompts, max_new_tokens=4)                        # warm-up: sessions, engine, caches
    calls = _counting(compiled.executable)
    best, out = float("inf"), None
    for _ in range(repeats):
        calls[0] = 0
        t0 = time.perf_counter()
        out = compiled.generate(prompts, max_new_tokens=new_tokens)
        best = min(best, time.perf_counter() - t0)
    steps = calls[0] + 1                                                # + the prefill call
    tokens = sum(len(o) for o in out)
    return out, tokens / best, 1e3 * best / steps, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=None, help='None (plain decoding) or "mtp"')
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = (PROMPTS * args.batch)[: args.batch]

    t0 = time.perf_counter()
    eager = graphopt.compile(load(dtype=torch.float32), backend="eager", spec=args.spec)   # phases on a terminal
    compile_s = time.perf_counter() - t0
    rows, reference = [], None
    t0 = time.perf_counter()
    onnx_exe = OnnxExecutable(eager.program, threads=args.threads)
    lower_s = time.perf_counter() - t0
    onnx = CompiledModel(onnx_exe, eager.options, eager.spec, eager.quant, "onnx", eager.report)
    for label, compiled, binding in tqdm((("eager", eager, None), ("onnx (alias)", onnx, "alias"),
                                          ("onnx (copy)", onnx, "copy")), desc="measure", unit="variant"):
        if binding is not None:
            onnx_exe.cache_binding = binding
        out, tps, ms, steps = _measure(compiled, prompts, args.new_tokens, args.repeats)
        reference = reference or out
        lower = lower_s if binding is not None else 0.0
        rows.append((label, tps, ms, steps, lower, out == reference))
        tqdm.write(f"{label:14s} {tps:8.1f} tok/s {ms:8.2f} ms/step  steps {steps}  lower {lower:.1f} s  "
                   f"same tokens {out == reference}")

    cmd = "nice python benchmarks/onnx_cpu.py" + (f" --spec {args.spec}" if args.spec else "") + \
        (f" --batch {args.batch}" if args.batch != 1 else "") + f" --new-tokens {args.new_tokens}" + \
        f" --threads {args.threads}"
    lines = [
        "# onnxruntime CPU vs eager: greedy decode of the embedded model",
        "",
        f"`{cmd}` ({platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; spec={args.spec}, batch {args.batch}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}; eager compile {compile_s:.0f} s)",
        "",
        "| backend | tokens/s | ms/step | steps | lower (s) | same tokens as eager |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        *(f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} | {r[3]} | {r[4]:.0f} | {r[5]} |" for r in rows),
        "",
        "ms/step = best wall time of one generation / (decode calls + 1 prefill call). lower = exporting",
        "prefill and step_greedy to ONNX and building their sessions (one torch.export per graph). The",
        "machine is shared (2 cores, other jobs running): rerun before quoting small differences.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS.exists() and args.spec is not None:          # keep the plain table, append this one
        lines = RESULTS.read_text().splitlines() + [""] + lines
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
