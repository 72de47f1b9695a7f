"""Separate prefill and decode weights: W8A8 for the compute-bound prefill, W4A8 (half the weight
bytes) for the bandwidth-bound decode steps, in one compiled model, saved and loaded together.

    python examples/prefill_decode_weights.py --out /tmp/tiny-w8a8-prefill-w4a8-decode

`QuantConfig(scheme, prefill_scheme=...)`: the decode steps (and `compiled(input_ids)`) use `scheme`,
the prefill graph `prefill_scheme`; skip, overrides and mtp_scheme apply to both.
"""

from __future__ import annotations

import argparse

import graphopt
from graphopt.models import load, load_tokenizer
from graphopt.passes.base import count_ops
from graphopt.quant import ClippingConfig, QuantConfig


def matmuls(gm) -> dict[str, int]:
    """The quantised matmul ops of a graph, by name."""
    return {op.split(".")[1]: n for op, n in count_ops(gm).items() if op.endswith("_matmul.default")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/graphopt-prefill-decode")
    args = p.parse_args()

    model, tok = load(), load_tokenizer()          # the embedded tiny DeepSeek-V3 with its MTP module
    config = QuantConfig("w4a8", prefill_scheme="w8a8", algorithms=(ClippingConfig(),))
    compiled = graphopt.compile(model, quant=config, spec="mtp", progress=False)
    for name in ("prefill", "step"):
        print(f"{name} graph: {matmuls(compiled.graphs[name])}")   # w4a8 in prefill: the MTP draft (scheme)

    compiled.save(args.out)                        # both weight sets in one artefact
    reloaded = graphopt.load_compiled(args.out)
    print(f"reloaded quant: {reloaded.quant.scheme} decode, {reloaded.quant.prefill_scheme} prefill")
    print(f"reloaded prefill graph: {matmuls(reloaded.graphs['prefill'])}")

    prompt = [tok.encode("def fibonacci(n):")]
    ours, theirs = compiled.generate(prompt, max_new_tokens=24), reloaded.generate(prompt, max_new_tokens=24)
    print(f"same tokens: {ours == theirs}")
    print(tok.decode(prompt[0]) + tok.decode(theirs[0]))


if __name__ == "__main__":
    main()
