"""`graphopt demo|compile|dump|calibrate|eval|bench|train-tiny` — the command line.

Each subcommand is a thin wrapper: argument parsing here, the work in the library.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):"]


def _load_model(path: str | None, dtype: str = "float32"):
    """The checkpoint at `path`, or the embedded model, or (if that is not built) a random model."""
    import torch
    from graphopt.models import checkpoint
    from graphopt.models.random import random_model

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    try:
        model = checkpoint.load(path, dtype=torch_dtype)
        tokenizer = _tokenizer_for(path)
        return model.eval(), tokenizer, "embedded trained model" if path is None else str(path)
    except FileNotFoundError:
        if path is not None:
            raise
        return random_model().to(torch_dtype), None, "RANDOM weights (the embedded model is not built)"


def _tokenizer_for(path: str | None):
    from graphopt.models.tokenizer import Tokenizer, load_tokenizer
    if path is None:
        return load_tokenizer()
    candidate = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(candidate) if candidate.exists() else None


def cmd_demo(args) -> int:
    import graphopt

    model, tok, what = _load_model(args.model)
    print(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    spec = graphopt.SpecConfig(num_speculative_tokens=args.k) if args.k and len(model.mtp) else None
    t0 = time.perf_counter()
    compiled = graphopt.compile(model, spec=spec, dump_dir=args.dump_dir)
    print(f"compiled in {time.perf_counter() - t0:.1f} s "
          f"(speculative: {'MTP k=%d' % args.k if spec else 'off'}; backend: {compiled.backend})")
    prompts = [tok.encode(p) for p in DEMO_PROMPTS] if tok else [[1, 2, 3], [4, 5], [6]]
    t0 = time.perf_counter()
    outs = compiled.generate(prompts, max_new_tokens=args.max_new_tokens)
    dt = time.perf_counter() - t0
    for prompt, out in zip(prompts, outs):
        text = (tok.decode(prompt), tok.decode(out)) if tok else (prompt, out)
        print("-" * 60)
        print(f"{text[0]}\033[1m{text[1]}\033[0m" if tok and sys.stdout.isatty() else f"{text[0]}{text[1]}")
    print("-" * 60)
    n = sum(len(o) for o in outs)
    print(f"generated {n} tokens for {len(prompts)} prompts in {dt:.2f} s")
    stats = getattr(compiled, "stats", None)
    if stats is not None and spec is not None:
        print(f"speculative decoding: {stats}")
    return 0


def cmd_compile(args, dump_required: bool = False) -> int:
    import graphopt

    model, _, what = _load_model(args.model)
    spec = graphopt.SpecConfig(num_speculative_tokens=args.k) if args.k else None
    compiled = graphopt.compile(model, spec=spec, quant=args.quant, dump_dir=args.dump_dir, verify=args.verify)
    print(f"compiled {what}")
    print(f"{'graph':8} {'phase':10} {'pass':28} {'status':9} {'matches':>7} {'ms':>8} {'nodes':>11}")
    for r in compiled.report.records:
        status = "off" if not r.ran else ("changed" if r.modified else "no match")
        print(f"{r.graph:8} {r.phase:10} {r.name:28} {status:9} {r.matches:>7} {r.seconds * 1e3:>8.1f} "
              f"{r.nodes_before:>5}->{r.nodes_after:<5}")
    for key, note in compiled.report.all_notes().items():   # pass notes, stage times, backend
        print(f"  {key}: {note}")
    if args.dump_dir:
        print(f"dumps and report: {args.dump_dir}/report.md")
    if getattr(args, "out", None):
        compiled.save(args.out)
        print(f"compiled artefact: {args.out} (graphopt.load_compiled({str(args.out)!r}) skips capture and passes)")
    return 0


def cmd_dump(args) -> int:
    return cmd_compile(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile the embedded model and generate completions")
    demo.add_argument("--model", default=None, help="checkpoint directory (default: embedded model)")
    demo.add_argument("--k", type=int, default=1, help="speculative draft tokens (0: off)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--dump-dir", default=None)
    demo.set_defaults(func=cmd_demo)

    for name, helptext in (("compile", "compile a checkpoint and print the pass report"),
                           ("dump", "compile and write every pass's graphs and a report to --dump-dir")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: embedded model)")
        p.add_argument("--k", type=int, default=0, help="speculative draft tokens (0: off)")
        p.add_argument("--quant", default=None, help="quantisation preset (e.g. w8a8)")
        p.add_argument("--dump-dir", default=None if name == "compile" else "graphopt_dump")
        p.add_argument("--verify", action="store_true", help="check every pass's numerics")
        p.add_argument("--out", default=None, help="write the compiled artefact to this directory "
                       "(graphopt.load_compiled reads it)")
        p.set_defaults(func=cmd_compile if name == "compile" else cmd_dump)

    for name, module, fn in (("calibrate", "graphopt.quant.cli", "calibrate_main"),
                             ("eval", "graphopt.quant.cli", "eval_main"),
                             ("train-tiny", "graphopt.models.train_tiny", "main"),
                             ("bench", "graphopt.bench", "main")):
        p = sub.add_parser(name, help=f"see `graphopt {name} --help`", add_help=False)
        p.set_defaults(func=None, module=module, fn=fn)

    args, rest = parser.parse_known_args(argv)
    if args.func is None:  # delegate: the subsystem parses its own arguments
        import importlib
        return int(getattr(importlib.import_module(args.module), args.fn)(rest) or 0)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
