"""`graphopt demo|compile|dump|calibrate|eval|bench|serve|train-tiny` — the command line.

Every verb's arguments are declared here, in one place, and this module imports neither torch nor
the rest of graphopt: `graphopt --help`, `graphopt VERB --help` and `graphopt --version` answer at
once. The work lives in the library and is imported only when a verb runs.

Conventions, the same in every verb:
  --model DIR    the checkpoint directory (HF layout: config.json + safetensors); absent: the embedded
                 tiny model. `graphopt compile DIR` (the old positional form) still works, with a
                 deprecation note on stderr.
  --quiet        calibrate, eval, bench, train-tiny: no progress bars (shown only after 2 s of work).
  --debug        a full traceback on error.
  errors         one line on stderr; exit status 2 for bad input (options, paths, checkpoints),
                 1 for anything else.

Options are validated in two steps, both before a model is loaded: argparse types (ranges, paths),
then `_validate` (pass names, quantisation presets: these need the library, hence torch).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "main"]

_CONVENTIONS = __doc__[__doc__.index("Conventions"):__doc__.index("Options are validated")].rstrip() + "\n"
DEMO_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):"]
QUANTISED_MARKER = "quant_model.json"  # graphopt.quant.formats.DESCRIPTION_FILE (imported there, not here)
COMPILED_MARKER = "manifest.json"      # graphopt.passes.program_io.MANIFEST
DUMP_FORMATS = {  # `graphopt dump --format`: what goes into --dump-dir
    "fx": "every pass's graphs as FX code, op counts, final.dot (+ .svg), report.md/html (always written)",
    "onnx": "also every final graph as GRAPH/final.onnx, for Netron (needs `pip install graphopt[onnx]`)",
}


# -- parsing ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: `graphopt VERB: error: ... (see graphopt VERB --help)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    """graphopt/__init__.py's __version__, read from the file: importing the package may pull torch."""
    text = (Path(__file__).parent / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    return match[1] if match else "unknown"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _model_dir(text: str) -> str:
    """A checkpoint directory: exists, holds config.json, and is not a quantised one."""
    root = Path(text)
    if not root.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    if (root / QUANTISED_MARKER).is_file():
        raise argparse.ArgumentTypeError(
            f"{text} is a quantised checkpoint (written by `graphopt calibrate`): pass it as "
            f"`graphopt eval --quantized {text}`, or load it with graphopt.quant.load_quantized")
    if not (root / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} has no config.json: not an HF checkpoint directory")
    return text


def _compiled_dir(text: str) -> str:
    if not (Path(text) / COMPILED_MARKER).is_file():
        raise argparse.ArgumentTypeError(f"{text} has no {COMPILED_MARKER}: not a `graphopt compile --out` artefact")
    return text


def _port(text: str) -> int:
    port = _int_at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1..65535)")
    return port


def _quantised_dir(text: str) -> str:
    if not (Path(text) / QUANTISED_MARKER).is_file():
        raise argparse.ArgumentTypeError(f"{text} has no {QUANTISED_MARKER}: not a `graphopt calibrate` output")
    return text


def _existing_file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return Path(text)


def _output_path(text: str) -> Path:
    """Somewhere to write: anything but an existing file where a directory is wanted is left to the writer."""
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory")
    return Path(text)


def _pass_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _dump_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in DUMP_FORMATS] if formats else [repr(text)]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown format(s) {', '.join(unknown)}; accepted: "
                                         f"{', '.join(DUMP_FORMATS)} (comma-separated)")
    return formats


def _common(debug_default) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=debug_default, help="full traceback on error")
    return p


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=_model_dir, metavar="DIR",
                   help="checkpoint directory (config.json + safetensors; default: the embedded tiny model)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_compile_options(p: argparse.ArgumentParser, k_default: int) -> None:
    p.add_argument("--k", type=_int_at_least(0), default=k_default, help="speculative draft tokens (0: off)")
    p.add_argument("--disable-passes", type=_pass_names, default=[], metavar="NAME[,NAME...]",
                   help="passes to switch off, by name (see docs/passes.md)")
    p.add_argument("--dump-dir", type=_output_path, metavar="DIR",
                   help="write every pass's graphs and a report here")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Compile, inspect, quantise, evaluate, benchmark and train DeepSeek-V3-family "
                                 "models.",
                     epilog=_CONVENTIONS + "\n`graphopt VERB --help` lists a verb's options; docs/cli.md has "
                            "examples.", parents=[_common(False)])
    parser.add_argument("--version", action="version", version=f"graphopt {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=_Parser)
    common = [_common(argparse.SUPPRESS)]  # `graphopt VERB --debug` as well as `graphopt --debug VERB`

    p = sub.add_parser("demo", parents=common, help="compile the embedded model and generate completions")
    _add_model(p)
    _add_compile_options(p, k_default=1)
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=48)
    p.set_defaults(run=cmd_demo)

    for name, helptext in (("compile", "compile a checkpoint and print the pass report"),
                           ("dump", "compile and write every pass's graphs and a report to --dump-dir")):
        p = sub.add_parser(name, parents=common, help=helptext)
        _add_model(p)
        p.add_argument("legacy_model", nargs="?", type=_model_dir, metavar="MODEL",
                       help="deprecated: the checkpoint directory; use --model DIR")
        _add_compile_options(p, k_default=0)
        p.add_argument("--quant", help="quantisation preset (e.g. w8a8; see docs/quantization.md)")
        p.add_argument("--verify", action="store_true", help="check every pass's numerics")
        p.add_argument("--out", type=_output_path, metavar="DIR",
                       help="write the compiled artefact here (graphopt.load_compiled reads it)")
        if name == "dump":
            p.set_defaults(dump_dir=Path("graphopt_dump"))
            p.add_argument("--format", type=_dump_formats, default=["fx"], metavar="FORMAT[,FORMAT...]",
                           help="; ".join(f"{k}: {v}" for k, v in DUMP_FORMATS.items()).replace("%", "%%"))
        p.set_defaults(run=cmd_compile)

    for name, helptext in (("calibrate", "calibrate and quantise a checkpoint"),
                           ("eval", "perplexity, KL, top-1 and MTP acceptance of a quantised model against "
                                    "its 16-bit original, on held-out text")):
        p = sub.add_parser(name, parents=common, help=helptext, description=helptext)
        _add_model(p)
        p.add_argument("--tokenizer", type=_existing_file, metavar="PATH",
                       help="tokenizer.json for --model's text (default: the checkpoint's tokenizer.json, for "
                            "eval then the --quantized directory's; the embedded tokenizer only for the embedded "
                            "model; token ids need none)")
        _add_quant_options(p)
        _add_quiet(p)
        if name == "calibrate":
            p.add_argument("--out", type=_output_path, required=True, metavar="DIR",
                           help="directory for the quantised checkpoint (and the tokenizer)")
            p.set_defaults(run="graphopt.quant.cli:calibrate")
        else:
            p.add_argument("--quantized", type=_quantised_dir, metavar="DIR",
                           help="a directory written by `graphopt calibrate` (else: quantise now)")
            p.add_argument("--eval-data", help="evaluation tokens, a source spec such as tokens:PATH or "
                           "text:PATH (default: the held-out evaluation slice)")
            p.add_argument("--windows", type=_int_at_least(1), default=32)
            p.add_argument("--eval-seq-len", type=_int_at_least(2), default=256)
            p.add_argument("--json", action="store_true", help="print JSON instead of a table row")
            p.set_defaults(run="graphopt.quant.cli:evaluate")

    p = sub.add_parser("bench", parents=common, help="generation speed: compiled vs the eager reference")
    _add_model(p)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=_int_at_least(1), default=4)
    p.add_argument("--new-tokens", type=_int_at_least(1), default=32)
    p.add_argument("--k", type=_int_at_least(0), nargs="+", default=[0, 1],
                   help="draft counts to compare (0 = no spec)")
    p.add_argument("--out", type=_output_path, help="also write the table to this Markdown file")
    _add_quiet(p)
    p.set_defaults(run="graphopt.bench:run_cli")

    p = sub.add_parser("serve", parents=common, help="an OpenAI-compatible HTTP server (docs/serving.md)")
    _add_model(p)
    p.add_argument("--compiled", type=_compiled_dir, metavar="DIR",
                   help="serve a compiled artefact (`graphopt compile --out DIR`) instead of compiling --model")
    p.add_argument("--k", type=_int_at_least(0), default=1, help="speculative draft tokens (0: off)")
    p.add_argument("--quant", help="quantisation preset (e.g. w8a8; see docs/quantization.md)")
    p.add_argument("--backend", default="auto", help="auto, eager, inductor, onnx or ascend (docs/backends.md)")
    p.add_argument("--device", help="where the model runs: cuda, cuda:N or cpu (default: cuda if available; "
                                    "with --compiled: where it was compiled)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on the CPU; not with --compiled)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="serve at once: the first requests of each batch size then wait for their compiles "
                        "(default: warm up every batch bucket before listening, on CUDA)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the `model` clients send (default: graphopt-embedded, or the directory name)")
    p.add_argument("--max-batch-size", type=_int_at_least(1), default=16, help="requests decoded together")
    p.add_argument("--max-waiting", type=_int_at_least(1), default=64,
                   help="requests queued beyond the batch; more get HTTP 429")
    p.set_defaults(run=cmd_serve, disable_passes=[], dump_dir=None)

    _add_train_tiny(sub.add_parser("train-tiny", parents=common, help="train the embedded tiny model"))
    return parser


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", default="w8a8", help="preset name or a QuantConfig JSON file")
    p.add_argument("--algorithm", action="append", help="e.g. smoothquant:alpha=0.6, flexsmooth, clipping, "
                   "learnable_clipping:steps=30, hqq, hadamard (repeatable: one transform + one weight method)")
    p.add_argument("--kv-cache", choices=("int8", "none"), help="C8 latent cache (overrides the preset)")
    p.add_argument("--mtp-scheme", help="scheme for the MTP draft module (default: the main scheme)")
    p.add_argument("--group-size", type=_int_at_least(1))
    p.add_argument("--data", action="append", help="calibration source SPEC[@RATIO] (repeatable)")
    p.add_argument("--samples", type=_int_at_least(1), help="calibration windows")
    p.add_argument("--seq-len", type=_int_at_least(2), help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")


def _add_train_tiny(p: argparse.ArgumentParser) -> None:
    p.description = ("Train the embedded default model (graphopt.models.train_tiny). Writes only --out "
                     "(default: out/tiny under the current directory), never into the installed package.")
    p.add_argument("--corpus", type=Path, default=Path(".cache/corpus"),
                   help="train.bin, heldout.bin, tokenizer.json (python -m graphopt.models.corpus)")
    p.add_argument("--out", type=_output_path, default=Path("out/tiny"), help="checkpoint directory to write")
    p.add_argument("--plot", type=_output_path, help="loss curve PNG (default: OUT/tiny_loss.png)")
    p.add_argument("--micro", action="store_true", help="toy-size model (CPU smoke runs)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_int_at_least(1), default=1450)
    p.add_argument("--batch-size", type=_int_at_least(1), default=32)
    p.add_argument("--seq-len", type=_int_at_least(2), default=512)
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=_int_at_least(0), default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-depths", type=_int_at_least(0), default=2, help="D: chained MTP depths in the loss")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="lambda of the MTP loss")
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="router bias update speed")
    p.add_argument("--seq-aux-alpha", type=float, default=1e-4, help="sequence-wise balance loss weight")
    p.add_argument("--log-every", type=_int_at_least(1), default=10)
    p.add_argument("--eval-every", type=_int_at_least(1), default=50)
    p.add_argument("--eval-windows", type=_int_at_least(1), help="held-out windows per evaluation (default: all)")
    p.add_argument("--accept-prompts", type=_int_at_least(1), default=32)
    p.add_argument("--accept-new-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds for the training steps; after --probe-steps the step count is cut to fit (0: off)")
    p.add_argument("--probe-steps", type=_int_at_least(1), default=20)
    _add_quiet(p)
    p.set_defaults(run="graphopt.models.train_tiny:run_cli")


# -- validation that needs the library (after argparse, before any model is loaded) -----------
class UsageError(ValueError):
    """Bad input found before the work started."""


def _validate(args: argparse.Namespace) -> None:
    if args.command in ("compile", "dump"):
        if args.legacy_model is not None:
            if args.model is not None and args.model != args.legacy_model:
                raise UsageError(f"two models given: --model {args.model} and {args.legacy_model}")
            print(f"graphopt {args.command}: note: the positional MODEL is deprecated; "
                  f"use --model {args.legacy_model}", file=sys.stderr)
            args.model = args.legacy_model
    if getattr(args, "disable_passes", None):
        _check_pass_names(args.disable_passes)
    if "onnx" in getattr(args, "format", ()):
        try:
            importlib.import_module("graphopt.backends.onnx")
        except ImportError as e:                               # the message says `pip install graphopt[onnx]`
            raise UsageError(f"--format onnx: {e}") from None
    if args.command == "serve":
        try:
            importlib.import_module("graphopt.serve")
        except ImportError as e:                               # the message says `pip install graphopt[serve]`
            raise UsageError(str(e)) from None
        from graphopt.config import resolve_backend
        resolve_backend(args.backend)                          # a ValueError naming the backends
        if args.compiled and (args.model or args.quant or args.dtype):
            raise UsageError("--compiled serves a finished artefact: it takes no --model, --quant or --dtype")
        args.device = _serve_device(args.device)
    if args.command in ("compile", "dump", "serve") and args.quant:
        from graphopt.quant.config import resolve
        resolve(args.quant)                                    # a QuantError naming the presets
    if args.command in ("calibrate", "eval"):
        from graphopt.quant.cli import quant_config
        args.quant_config = quant_config(args)                 # every quantisation option, checked
    if args.command == "train-tiny":
        missing = [f for f in ("train.bin", "heldout.bin", "tokenizer.json") if not (args.corpus / f).is_file()]
        if missing:
            raise UsageError(f"--corpus {args.corpus} lacks {', '.join(missing)}; build it with "
                             f"`python -m graphopt.models.corpus --out {args.corpus}`")


def _check_pass_names(names: list[str]) -> None:
    from graphopt.passes.pipeline import build_pipeline

    known = {p.name for phase in build_pipeline(quant=True, int8_cache=True) for p in phase.passes}
    unknown = sorted(set(names) - known)
    if unknown:
        raise UsageError(f"--disable-passes: unknown pass(es) {', '.join(unknown)}; passes: {', '.join(sorted(known))}")


# -- demo, compile, dump ----------------------------------------------------------------------
def _serve_device(device: str | None) -> str:
    """`--device` checked before any loading: cuda when available and none is given."""
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; accepted: cpu, cuda, cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: graphopt serve runs on cpu or cuda[:N]")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch sees no CUDA device; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _load_model(path: str | None, dtype: str = "float32", device: str = "cpu"):
    """The checkpoint at `path`, or the embedded model, or (if that is not built) a random model."""
    import torch
    from graphopt.models import checkpoint
    from graphopt.models.random import random_model

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    try:
        model = checkpoint.load(path, dtype=torch_dtype, device=device)
        tokenizer = _tokenizer_for(path)
        return model.eval(), tokenizer, "embedded trained model" if path is None else str(path)
    except FileNotFoundError:
        if path is not None:
            raise
        model = random_model().to(device=device, dtype=torch_dtype)
        model.model.rotary_emb.reset_parameters(device)
        return model, None, "RANDOM weights (the embedded model is not built)"


def _tokenizer_for(path: str | None):
    from graphopt.models.tokenizer import Tokenizer, load_tokenizer
    if path is None:
        return load_tokenizer()
    candidate = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(candidate) if candidate.exists() else None


def _compile(args, model, k: int):
    import graphopt

    spec = graphopt.SpecConfig(num_speculative_tokens=k) if k and len(model.mtp) else None
    dump_dir = str(args.dump_dir) if args.dump_dir else None
    options = {"disable_passes": tuple(args.disable_passes)} if args.disable_passes else {}
    compiled = graphopt.compile(model, spec=spec, quant=getattr(args, "quant", None), dump_dir=dump_dir,
                                verify=getattr(args, "verify", False), **options)
    return compiled, spec


def cmd_demo(args) -> int:
    from tqdm import tqdm

    model, tok, what = _load_model(args.model)
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    print(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}")
    t0 = time.perf_counter()
    compiled, spec = _compile(args, model, args.k)
    print(f"compiled in {time.perf_counter() - t0:.1f} s "
          f"(speculative: {'MTP k=%d' % args.k if spec else 'off'}; backend: {compiled.backend})")
    prompts = [tok.encode(p) for p in DEMO_PROMPTS] if tok else [[1, 2, 3], [4, 5], [6]]
    outs = [[] for _ in prompts]
    # streamed, so a tokens/s bar shows on stderr once generation takes 2 s (it stops short at eos)
    t0 = time.perf_counter()
    with tqdm(total=len(prompts) * args.max_new_tokens, desc="generate", unit="tok", delay=2.0, leave=False) as bar:
        for i, new_ids in compiled.stream(prompts, max_new_tokens=args.max_new_tokens):
            outs[i] += new_ids
            bar.update(len(new_ids))
    dt = time.perf_counter() - t0
    for prompt, out in zip(prompts, outs):
        text = (tok.decode(prompt), tok.decode(out)) if tok else (prompt, out)
        print("-" * 60)
        print(f"{text[0]}\033[1m{text[1]}\033[0m" if tok and sys.stdout.isatty() else f"{text[0]}{text[1]}")
    print("-" * 60)
    n = sum(len(o) for o in outs)
    print(f"generated {n} tokens for {len(prompts)} prompts in {dt:.2f} s ({n / dt:.1f} tokens/s)")
    layout = compiled.program.cache
    print(f"KV cache: {layout.bytes_per_token(spec is not None)} bytes per token "
          f"({str(layout.storage_dtype).removeprefix('torch.')}, width {layout.kv_cache_dim})")
    stats = getattr(compiled, "stats", None)
    if stats is not None and spec is not None:
        print(f"speculative decoding: {stats}")
    return 0


def cmd_compile(args) -> int:
    model, _, what = _load_model(args.model)
    compiled, _ = _compile(args, model, args.k)
    print(f"compiled {what}")
    print(f"{'graph':8} {'phase':10} {'pass':28} {'status':9} {'matches':>7} {'ms':>8} {'nodes':>11}")
    for r in compiled.report.records:
        status = "off" if not r.ran else ("changed" if r.modified else "no match")
        print(f"{r.graph:8} {r.phase:10} {r.name:28} {status:9} {r.matches:>7} {r.seconds * 1e3:>8.1f} "
              f"{r.nodes_before:>5}->{r.nodes_after:<5}")
    for key, note in compiled.report.all_notes().items():   # pass notes, stage times, backend
        print(f"  {key}: {note}")
    if args.dump_dir:
        if "onnx" in getattr(args, "format", ()):
            for path in _write_onnx(compiled, args.dump_dir):
                print(f"onnx (open in Netron): {path}")
        print(f"dumps and report: {args.dump_dir}/report.md")
    if args.out:
        compiled.save(args.out)
        print(f"compiled artefact: {args.out} (graphopt.load_compiled({str(args.out)!r}) skips capture and passes)")
    return 0


def cmd_serve(args) -> int:
    import graphopt
    import graphopt.serve
    if args.compiled:
        compiled = graphopt.load_compiled(args.compiled, device=args.device,
                                          backend=None if args.backend == "auto" else args.backend)
        name = args.served_model_name or Path(args.compiled).resolve().name
        what = f"compiled artefact {args.compiled}"
    else:
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        model, tok, what = _load_model(args.model, dtype, args.device)
        what = f"{what} ({dtype})"
        spec = graphopt.SpecConfig(num_speculative_tokens=args.k) if args.k and len(model.mtp) else None
        compiled = graphopt.compile(model, spec=spec, quant=args.quant, backend=args.backend, tokenizer=tok,
                                    max_batch_size=args.max_batch_size)
        name = args.served_model_name or ("graphopt-embedded" if args.model is None else Path(args.model).resolve().name)
    spec = "off" if compiled.spec is None else f"MTP k={compiled.executable.num_speculative_tokens}"
    print(f"serving {what} as {name!r} on {args.device} (backend {compiled.backend}, speculative {spec}) "
          f"at http://{args.host}:{args.port}/v1", file=sys.stderr)
    graphopt.serve.run(compiled, host=args.host, port=args.port, model_name=name, warmup=args.warmup,
                       max_batch_size=args.max_batch_size, max_waiting=args.max_waiting)
    return 0


def _write_onnx(compiled, dump_dir: Path) -> list[Path]:
    """The final graphs as GRAPH/final.onnx in the dump, then the report again, now linking them."""
    from graphopt.backends.onnx import export_program
    from graphopt.passes.dump import ONNX_LAYOUT, Dumper

    print(f"exporting {len(compiled.program.names)} graphs to ONNX (one torch.export each)...", flush=True)
    paths = export_program(compiled.program, dump_dir, layout=ONNX_LAYOUT)
    Dumper(dump_dir).write_report(compiled.report.records, compiled.report.all_notes())
    return paths


# -- entry point ------------------------------------------------------------------------------
_BAD_INPUT = (ValueError, LookupError, FileNotFoundError, FileExistsError, IsADirectoryError,
              NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _validate(args)
        run = args.run
        if isinstance(run, str):                 # "module:function", imported only now
            module, _, fn = run.partition(":")
            run = getattr(importlib.import_module(module), fn)
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"graphopt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the one place errors become exit codes
        if args.debug or os.environ.get("GRAPHOPT_DEBUG"):
            raise
        bad_input = isinstance(e, _BAD_INPUT)
        message = " ".join(str(e).split()) or type(e).__name__
        hint = "" if bad_input else f" ({type(e).__name__}; run with --debug for the traceback)"
        print(f"graphopt {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
