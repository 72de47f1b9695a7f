"""Weight memory per quantisation scheme on the embedded model: the eager quantised model and the
compiled Program, on the CPU.

    python benchmarks/quant_memory.py            # writes benchmarks/results/quant_memory.md

For each preset the embedded model (bf16 weights as stored) is quantised with `quantize_model`
(calibrated on a few windows of the default source where the preset's algorithms need data) and
compiled with `graphopt.compile(..., quant=preset, backend="eager")`. Bytes are counted per distinct
tensor storage (the MTP module shares the embedding and head):

  * quantised weights: the `weight` tensors of the quantised linears and expert stacks, the values
    only (int4 two a byte, fp8, int8, codes); "bits / weight" divides them by the float weights'
    element count;
  * scales etc.: their scales, group scales, zero points, smoothing vectors, codebooks;
  * float: what stays 16-bit (embedding, norms, router, lm_head, kv_b_proj, rope tables);
  * Program: every tensor the compiled Program's graphs read (get_attr), each storage once: what
    a backend keeps in memory and `CompiledModel.save` writes;
  * cache bytes / token: the compiled Program's KV cache (`CacheLayout.bytes_per_token`, main layers):
    C8 presets store int8 caches (passes/store_int8_kv_cache.py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphopt  # noqa: E402
from graphopt.models import checkpoint  # noqa: E402
from graphopt.quant import PRESETS, CalibrationConfig, quantize_model  # noqa: E402
from graphopt.quant.calibration import calibration_data  # noqa: E402
from graphopt.quant.qlinear import QuantExperts, QuantLinear  # noqa: E402
from graphopt.models.tokenizer import load_tokenizer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quant_memory.md"
DEFAULT_PRESETS = ("w8a8", "w8a8_static", "w4a8", "w8a16", "w4a16", "fp8", "fp8_block", "hif8", "nf4", "w2a16",
                   "c8", "w8a8_c8", "w4a8_c8")
CALIBRATION = CalibrationConfig(num_samples=4, seq_len=64)   # memory does not depend on the data: a few windows
MB = 1e6


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{"weights", "scales", "float", "elements"}: bytes of quantised weight values, of their other
    tensors and of the float remainder (each storage once); elements = the quantised weights' count."""
    quantised: dict[tuple, str] = {}
    elements = 0
    for mod in model.modules():
        holders = [mod] if isinstance(mod, QuantLinear) else \
            [h for h in (mod.gate_up, mod.down) if h is not None] if isinstance(mod, QuantExperts) else []
        for h in holders:
            for name, t in h.tensors().items():
                quantised[_storage_key(t)] = "weights" if name == "weight" else "scales"
            shape = h.q.shape
            elements += int(torch.Size(shape).numel())
    out = {"weights": 0, "scales": 0, "float": 0, "elements": elements}
    seen = set()
    for t in (*model.parameters(), *model.buffers()):
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        out[quantised.get(key, "float")] += _bytes(t)
    return out


def program_bytes(compiled) -> int:
    """Bytes of every distinct tensor the Program's graphs read."""
    seen, total = set(), 0
    for gm in compiled.program.graphs.values():
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor) and _storage_key(value) not in seen:
                seen.add(_storage_key(value))
                total += _bytes(value)
    return total


def measure(model, preset: str | None, data) -> dict:
    t0 = time.perf_counter()
    if preset is None:
        sizes = model_bytes(model)
        compiled = graphopt.compile(model, backend="eager")
    else:
        cfg = PRESETS[preset].replace(calibration=CALIBRATION)
        sizes = model_bytes(quantize_model(model, cfg, data, progress=False))
        compiled = graphopt.compile(model, quant=cfg, backend="eager")
    sizes["program"] = program_bytes(compiled)
    sizes["cache"] = compiled.program.cache.bytes_per_token(with_mtp=False)
    sizes["seconds"] = time.perf_counter() - t0
    return sizes


def table(rows: dict[str, dict], float_elements: int) -> str:
    base = rows["bf16"]
    lines = ["| preset | quantised weights MB | bits / weight | scales etc. MB | float MB | model MB | "
             "Program MB | Program vs bf16 | cache bytes / token | cache vs bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        total = r["weights"] + r["scales"] + r["float"]
        weights, rest = r["weights"], r["float"]
        if not r["elements"]:                    # bf16, c8: the same linears in 16 bit, what the schemes replace
            weights, rest = 2 * float_elements, r["float"] - 2 * float_elements
        bits = f"{8 * weights / float_elements:.2f}" if float_elements else "-"
        lines.append(f"| {name} | {weights / MB:.2f} | {bits} | {r['scales'] / MB:.2f} | {rest / MB:.2f} | "
                     f"{total / MB:.2f} | {r['program'] / MB:.2f} | {r['program'] / base['program']:.3f} | "
                     f"{r['cache']} | {r['cache'] / base['cache']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=list(DEFAULT_PRESETS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = checkpoint.load(None)                                  # bf16, as stored
    data = calibration_data(CALIBRATION, model.config.vocab_size, load_tokenizer()).tokens
    rows = {"bf16": measure(model, None, data)}
    for preset in args.presets:
        rows[preset] = measure(model, preset, data)
        print(f"{preset:<12} {rows[preset]['weights'] / MB:7.2f} MB weights, Program {rows[preset]['program'] / MB:7.2f} MB "
              f"({rows[preset]['seconds']:.1f} s)", file=sys.stderr, flush=True)
    float_elements = rows[args.presets[0]]["elements"] if args.presets else 0
    command = "python benchmarks/quant_memory.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = (f"# Weight memory per quantisation scheme (embedded model)\n\nCommand: `{command}`  \n"
            f"Host: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"total {time.perf_counter() - start:.0f} s.  \n"
            f"Model: the embedded model, bf16 weights; {float_elements:,} weights in the quantised linears and "
            f"expert stacks (the rest stays 16-bit: embedding, norms, router, lm_head, kv_b_proj).  \n"
            "MB = 10^6 bytes, each tensor storage counted once. Program: every tensor the compiled Program's "
            "graphs read (backend eager, spec none). Cache: bytes one token position costs in the compiled "
            "Program's KV caches over the main layers.\n\n" + table(rows, float_elements) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
