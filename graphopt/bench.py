"""`graphopt bench`: generation speed of the compiled model against the eager reference, side by side.

Prints a Markdown table (and writes it with --out): tokens/s and ms per decode step for the eager
reference decoding (one sequence at a time), the compiled model without speculation, and the
compiled model with MTP speculation (k drafts), all on the same prompts in one process. On CUDA the
clock is synchronised before each reading. Each compiled variant's compile report (stage times and
the passes' notes, e.g. how calibration ran) is printed under the table, and the variant's row is
added to that report (`CompiledModel.report.notes["bench"]`), so numbers and compile never part.
A progress bar (stderr, after 2 s; --quiet: none) names the variant being measured.

The arguments are declared in graphopt/cli.py (`graphopt bench --help`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from graphopt.models.fileio import write_file_atomically


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def run(model, prompts: list[list[int]], new_tokens: int, ks: list[int], device: torch.device,
        progress: bool = False) -> list[dict]:
    import graphopt
    from graphopt.models.generate import greedy_generate

    rows = []
    bar = tqdm(total=1 + 2 * len(ks), desc="bench", unit="stage", delay=2.0, disable=not progress, leave=False)
    bar.set_postfix_str("eager reference")
    greedy_generate(model, prompts[0], 2)  # warm-up
    dt, outs = _timed(lambda: [greedy_generate(model, p, new_tokens) for p in prompts], device)
    bar.update()
    n = sum(len(o) for o in outs)
    rows.append(dict(variant="eager reference (one sequence at a time)", tokens=n, seconds=dt,
                     steps=n, exact="reference"))
    for k in ks:
        spec = graphopt.SpecConfig(num_speculative_tokens=k) if k else None
        bar.set_postfix_str(f"compile k={k}")
        t0 = time.perf_counter()
        compiled = graphopt.compile(model, spec=spec)
        compile_seconds = time.perf_counter() - t0
        bar.update()
        bar.set_postfix_str(f"generate k={k}")
        compiled.generate(prompts[:1], max_new_tokens=2)  # warm-up
        engine = compiled.engine()
        steps = 0

        def go():
            nonlocal steps
            for p in prompts:
                engine.add_request(p, _params(new_tokens))
            while engine.has_unfinished():
                engine.step()
                steps += 1
            return engine.run_until_done()

        dt, results = _timed(go, device)
        got = [r.token_ids for r in results]
        row = dict(variant=f"graphopt compiled, batch {len(prompts)}, " + (f"MTP k={k}" if k else "no spec"),
                   tokens=sum(len(g) for g in got), seconds=dt, steps=steps,
                   exact="identical" if got == outs else "DIFFERENT", compile_seconds=compile_seconds)
        compiled.report.notes["bench"] = (f"{row['tokens'] / dt:.1f} tokens/s, {1e3 * dt / max(steps, 1):.1f} ms/step, "
                                          f"greedy output {row['exact']}")
        row["report"] = compiled.report.all_notes()
        rows.append(row)
        bar.update()
    bar.close()
    return rows


def _params(new_tokens: int):
    from graphopt.runtime.request import SamplingParams
    return SamplingParams(max_new_tokens=new_tokens)


def render(rows: list[dict], header: str) -> str:
    out = [header, "", "| variant | tokens | seconds | tokens/s | engine steps | ms/step | greedy output |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens'] / r['seconds']:.1f} | "
                   f"{r['steps']} | {1e3 * r['seconds'] / max(r['steps'], 1):.1f} | {r['exact']} |")
    for r in rows:
        if "report" in r:
            out += ["", f"Compile report of {r['variant']} (compiled in {r['compile_seconds']:.1f} s):", ""]
            out += [f"- {k}: {v}" for k, v in r["report"].items()]
    return "\n".join(out) + "\n"


def run_cli(args: argparse.Namespace) -> int:
    """`graphopt bench` with parsed (and validated) arguments."""
    from graphopt.cli import _load_model
    model, tok, what = _load_model(args.model, args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    model.model.rotary_emb.reset_parameters(device)
    text = (Path(__file__).parent / "models" / "data" / "heldout.txt").read_text()
    if tok is not None:
        ids = tok.encode(text[:20000])
        prompts = [ids[i * 97:i * 97 + 24 + 8 * i] for i in range(args.prompts)]
    else:
        prompts = [[(7 * i + j) % model.config.vocab_size for j in range(8 + i)] for i in range(args.prompts)]
    ks = [k for k in args.k if k == 0 or len(model.mtp)]
    with torch.no_grad():
        rows = run(model, prompts, args.new_tokens, ks, device, progress=not args.quiet)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"Model: {what}; device: {name}; dtype: {args.dtype}; {args.prompts} prompts, "
              f"{args.new_tokens} new tokens each; torch {torch.__version__}")
    table = render(rows, header)
    print(table)
    if args.out:
        write_file_atomically(args.out, table.encode("utf-8"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`graphopt bench ARGS`, for scripts that call it as a function."""
    from graphopt.cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
