"""`graphopt calibrate` and `graphopt eval`: quantise a checkpoint, measure what quantisation cost.

    graphopt calibrate --quant w8a8 --out out/w8a8                          # the embedded tiny model
    graphopt calibrate --model ckpt/ --quant w4a8 --algorithm smoothquant:alpha=0.6 \\
        --data default@0.7 --data text:my_code.txt@0.3 --samples 64 --out out/w4a8
    graphopt eval --quantized out/w8a8                                      # against its 16-bit base
    graphopt eval --model ckpt/ --quant fp8 --windows 32 --json             # quantise on the fly

Data specs are those of CalibrationConfig ("default", "heldout", "text:PATH", "tokens:PATH"), with an
optional "@RATIO" for mixing. Evaluation reads the held-out slice (quant.calibration.heldout_tokens).
Text (the "default", "heldout" and "text:" sources, and the held-out evaluation text) is tokenised with
the model's own tokenizer: --tokenizer PATH, else the checkpoint's tokenizer.json (eval: else the --quantized directory's), else the embedded
tokenizer only when --model's config is the embedded model's (graphopt.models.tokenizer.tokenizer_for).
A model with none and text to tokenise is an error before its weights are loaded; token ids
("tokens:PATH") need no tokenizer. `calibrate` writes that tokenizer beside the quantised weights, so
the output directory is complete on its own.

The arguments are declared in graphopt/cli.py with every other verb's (so `--help` needs no torch);
this module does the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from .calibration import TEXT_KINDS, check_vocab, heldout_tokens, source_tokens
from .config import QuantConfig, parse_algorithm, resolve
from .eval import compare, windows_from
from .formats import load_quantized, save_quantized
from .model_quant import quantize_model, quantized_names
from .schemes import QuantError

__all__ = ["calibrate", "evaluate", "quant_config"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _tokenizer_file(args: argparse.Namespace) -> Path | None:
    """The tokenizer.json to use as given: --tokenizer, else the one in the --model directory, else (eval)
    the one `graphopt calibrate` saved in the --quantized directory, if any."""
    if getattr(args, "tokenizer", None):
        return Path(args.tokenizer)
    for directory in (args.model, getattr(args, "quantized", None)):
        candidate = Path(directory) / "tokenizer.json" if directory else None
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _model_tokenizer(args: argparse.Namespace, text: list[tuple[str, str]]):
    """--model's tokenizer (see the module docstring), or None when it has none and there is no `text`:
    (what would be tokenised, the option that takes token ids instead). Reads only config.json, so a
    missing tokenizer is reported before the weights are loaded."""
    from graphopt.models.config import DeepseekV3Config
    from graphopt.models.tokenizer import load_tokenizer, tokenizer_for

    given = _tokenizer_file(args)
    if args.model is None:                       # the embedded model: its own tokenizer unless one is given
        return load_tokenizer(given)
    config = DeepseekV3Config.from_json(Path(args.model) / "config.json")
    tokenizer = tokenizer_for(config, given)
    if tokenizer is None and text:
        ids = " or ".join(dict.fromkeys(f"{option} tokens:PATH" for _, option in text))
        raise QuantError(
            f"--model {args.model}: no tokenizer for {' and '.join(what for what, _ in text)}: the directory has "
            f"no tokenizer.json and its config (vocab_size {config.vocab_size}) is not the embedded model's, so "
            f"the embedded tokenizer does not apply; accepted: --tokenizer PATH (a tokenizer.json), a "
            f"tokenizer.json in {args.model}, or token ids ({ids})")
    return tokenizer


def _text_sources(config: QuantConfig | None) -> list[tuple[str, str]]:
    """The calibration sources that quantize_model would tokenise: none when it reads no data
    (QuantConfig.reads_data, the condition quantize_model uses) or is given token ids."""
    cal = config.calibration if config else None
    if cal is None or cal.tokens is not None or not config.reads_data:
        return []
    return [(f"calibration source {spec!r}", "--data") for spec, _ in cal.sources
            if spec.partition(":")[0] in TEXT_KINDS]


def _load(model_path: str | None, dtype: torch.dtype):
    from graphopt.models import checkpoint

    return checkpoint.load(model_path, dtype=dtype)


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig the options ask for; a QuantError (a ValueError) names the bad option."""
    if args.quant.endswith(".json"):
        try:
            config = QuantConfig.from_dict(json.loads(Path(args.quant).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--quant {args.quant}: not valid JSON ({e})") from None
    else:
        config = resolve(args.quant)
    changes = {}
    if args.algorithm:
        changes["algorithms"] = tuple(parse_algorithm(a) for a in args.algorithm)
    if args.kv_cache:
        changes["kv_cache"] = None if args.kv_cache == "none" else args.kv_cache
    if args.mtp_scheme:
        changes["mtp_scheme"] = args.mtp_scheme
    if args.group_size:
        changes["group_size"] = args.group_size
    cal = config.calibration
    data = dict(sources=tuple(_source(d) for d in args.data), tokens=None) if args.data else {}   # --data wins
    changes["calibration"] = dataclasses.replace(cal, num_samples=args.samples or cal.num_samples,
                                                 seq_len=args.seq_len or cal.seq_len, seed=args.seed, **data)
    return config.replace(**changes)


def _source(spec: str) -> tuple[str, float]:
    head, sep, tail = spec.rpartition("@")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def calibrate(args: argparse.Namespace) -> int:
    """`graphopt calibrate`: quantise --model and write it (with its tokenizer) to --out."""
    config = getattr(args, "quant_config", None) or quant_config(args)
    tokenizer = _model_tokenizer(args, _text_sources(config))
    model = _load(args.model, _DTYPES[args.dtype])
    qmodel = quantize_model(model, config, tokenizer=tokenizer, progress=not args.quiet)
    save_quantized(qmodel, args.out, tokenizer=_tokenizer_file(args) or tokenizer)   # the file as given
    schemes = quantized_names(qmodel)
    print(f"quantised {len(schemes)} matmuls ({', '.join(sorted(set(schemes.values())))}) -> {args.out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """`graphopt eval`: the quantised model (--quantized, or quantised now) against its 16-bit original."""
    config = None if args.quantized else (getattr(args, "quant_config", None) or quant_config(args))
    text = []                                    # what would be tokenised, and the option taking ids instead
    if args.eval_data is None:
        text.append(("the held-out evaluation text", "--eval-data"))
    elif args.eval_data.partition(":")[0] in TEXT_KINDS:
        text.append((f"--eval-data {args.eval_data!r}", "--eval-data"))
    tokenizer = _model_tokenizer(args, text + _text_sources(config))   # the same one tokenises both
    model = _load(args.model, _DTYPES[args.dtype])
    if args.quantized:
        qmodel = load_quantized(args.quantized)  # tensors keep their saved dtypes (fp8, fp32 scales)
        label = args.quantized
    else:
        qmodel = quantize_model(model, config, tokenizer=tokenizer, progress=not args.quiet)
        label = args.quant
    ids = source_tokens(args.eval_data, tokenizer) if args.eval_data else heldout_tokens(tokenizer)[0]
    check_vocab(ids, model.config.vocab_size, "evaluation data")
    windows = windows_from(ids, args.eval_seq_len, args.windows)
    stats = compare(model, {label: qmodel}, windows, progress=not args.quiet)[label]
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        print(_eval_table(label, stats))
    return 0


def _eval_table(label: str, stats) -> str:
    """KL and top-1 agreement first (the sharper measures), perplexity beside them, each quantised figure
    with its bootstrap interval over the evaluation windows."""
    ci = stats.ci
    span = lambda key, fmt: f"[{fmt.format(ci[key][0])}, {fmt.format(ci[key][1])}]" if key in ci else ""  # noqa: E731
    acc = lambda a: "n/a" if a is None else f"{a:.3f}"                                                  # noqa: E731
    rows = [f"{'model':<24} {'KL(16-bit || q)':<27} {'top-1 agree':<21} {'ppl':>8} {'d ppl':<25} {'MTP accept':<19}",
            f"{'16-bit':<24} {'':<27} {'':<21} {stats.base_ppl:8.3f} {'':<25} {acc(stats.base_mtp_accept):<19}",
            f"{label:<24} {stats.kl:.5f} {span('kl', '{:.5f}'):<19} {stats.top1:.3f} {span('top1', '{:.3f}'):<15} "
            f"{stats.ppl:8.3f} {stats.ppl_change:+.2%} {span('ppl_change', '{:+.2%}'):<18} "
            f"{acc(stats.mtp_accept)} {span('mtp_accept', '{:.3f}')}"]
    if ci:
        rows.append(f"[low, high]: {stats.level:.0%} bootstrap interval over the {stats.windows} evaluation windows "
                    f"({stats.tokens} tokens), windows resampled with replacement")
    return "\n".join(r.rstrip() for r in rows)
