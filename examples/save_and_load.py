"""Compile once, save the compiled artefact, load it later without capture or passes.

    python examples/save_and_load.py --out /tmp/tiny-mtp

The same from the command line: `graphopt compile --k 1 --out DIR` writes the artefact.
"""

from __future__ import annotations

import argparse
import time

import graphopt
from graphopt.models import load, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/graphopt-compiled")
    args = p.parse_args()

    model, tok = load(), load_tokenizer()          # the embedded tiny DeepSeek-V3 with its MTP module
    t0 = time.perf_counter()
    compiled = graphopt.compile(model, spec="mtp", progress=False)
    print(f"compiled in {time.perf_counter() - t0:.1f} s")
    compiled.save(args.out)                        # graphs, weights (safetensors), manifest.json

    t0 = time.perf_counter()
    reloaded = graphopt.load_compiled(args.out)    # device="cuda" puts it on a GPU
    print(f"load_compiled in {time.perf_counter() - t0:.2f} s")

    prompt = [tok.encode("def fibonacci(n):")]
    ours, theirs = compiled.generate(prompt, max_new_tokens=24), reloaded.generate(prompt, max_new_tokens=24)
    print(f"same tokens: {ours == theirs}")
    print(tok.decode(prompt[0]) + tok.decode(theirs[0]))


if __name__ == "__main__":
    main()
