"""Loading a compiled artefact versus compiling: the embedded model, `spec="mtp"` by default.

    nice python benchmarks/load_compiled.py                      # spec="mtp"
    nice python benchmarks/load_compiled.py --variants plain mtp mtp+w8a8

Per variant: compile `graphopt.models.load()` (float32, CPU) once and time it, `save` it, then in a
FRESH process (python -c) time `import graphopt` (with its lazily imported api, so torch is in it),
`graphopt.load_compiled(dir)` and one generate,
and check that process's greedy tokens equal the compiling process's. "load" is `load_compiled`
alone (manifest and checksums, graphs rebuilt, weights read, eager lowering). Writes the table to
benchmarks/results/load_compiled.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import graphopt
from graphopt.models import load

RESULTS = Path(__file__).parent / "results" / "load_compiled.md"
VARIANTS = {"plain": {}, "mtp": {"spec": "mtp"}, "mtp+w8a8": {"spec": "mtp", "quant": "w8a8"}}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
NEW_TOKENS = 24

# what the fresh process runs: times import, load and generate, prints JSON
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import graphopt
load_compiled = graphopt.load_compiled     # graphopt imports lazily: this imports torch and the api
t1 = time.perf_counter()
compiled = load_compiled(sys.argv[1])
t2 = time.perf_counter()
out = compiled.generate(json.loads(sys.argv[2]), max_new_tokens=int(sys.argv[3]))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "generate": t3 - t2, "tokens": out}))
"""


def _variant(name: str, kwargs: dict, work: Path) -> dict:
    model = load()
    bar = tqdm(total=4, desc=f"{name}: compile", unit="stage", leave=False)   # the four timed stages
    t0 = time.perf_counter()
    compiled = graphopt.compile(model, progress=False, **kwargs)
    compile_s = time.perf_counter() - t0
    bar.update()
    bar.set_description(f"{name}: generate")
    t0 = time.perf_counter()
    expected = compiled.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    generate_s = time.perf_counter() - t0
    bar.update()
    bar.set_description(f"{name}: save")
    out = work / name
    t0 = time.perf_counter()
    compiled.save(out)
    save_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.iterdir())
    bar.update()
    bar.set_description(f"{name}: fresh process")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), json.dumps(PROMPTS), str(NEW_TOKENS)],
                          capture_output=True, text=True, check=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    bar.close()
    return {"variant": name, "compile": compile_s, "save": save_s, "MB": size / 1e6, "compiled generate": generate_s,
            **child, "same tokens": child["tokens"] == expected}


def render(rows: list[dict], header: str) -> str:
    lines = [header, "", "| variant | compile s | generate s | save s | artefact MB | fresh process: import s "
             "| load_compiled s | generate s | same tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['compile']:.1f} | {r['compiled generate']:.2f} | {r['save']:.2f} "
                     f"| {r['MB']:.1f} | {r['import']:.2f} | **{r['load']:.2f}** | {r['generate']:.2f} "
                     f"| {r['same tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["mtp"], choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        rows = [_variant(v, VARIANTS[v], Path(work)) for v in args.variants]
    command = "nice python benchmarks/load_compiled.py" + (
        f" --variants {' '.join(args.variants)}" if args.variants != ["mtp"] else "")
    header = (f"# load_compiled vs compile\n\nCommand: `{command}`\n\nEmbedded model (float32, CPU: "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
              f"graphopt {graphopt.__version__}; generate: {len(PROMPTS)} prompts x {NEW_TOKENS} greedy tokens.")
    text = render(rows, header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    if not all(r["same tokens"] for r in rows):
        print("a reloaded artefact generated other tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
