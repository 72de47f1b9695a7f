"""Compile the embedded model with speculative decoding, dump every pass, and read the report.

    python examples/dump_and_inspect.py --out dumps

Then open dumps/report.html, or diff dumps/main/NN.<pass>.before.py and .after.py (docs/inspect.md).
"""

import argparse
from pathlib import Path

import torch

import graphopt
from graphopt.models import load

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="graphopt_dumps")
args = parser.parse_args()

model = load(dtype=torch.float32)
compiled = graphopt.compile(model, spec=graphopt.SpecConfig(num_speculative_tokens=2), dump_dir=args.out)

print(Path(args.out, "report.md").read_text())
print("what fuse_moe_routing changed:")
text = Path(args.out, "main", "op_counts.md").read_text()
print(text[text.index("## fuse_moe_routing"):text.index("## fuse_moe_experts")])
step = Path(args.out, "step", "final.py").read_text()
print("graphopt ops in the fused step graph:",
      sorted({line.split("torch.ops.graphopt.")[1].split(".")[0] for line in step.splitlines()
              if "torch.ops.graphopt." in line}))
