"""Host memory of loading one rank: the whole checkpoint (models.load) against only this rank's slices
(models.shard_load.load_shard, safetensors get_slice), each in a fresh process.

    nice python benchmarks/shard_load_memory.py                      # a 4-layer random model, 32 experts (~0.5 GB fp32)
    nice python benchmarks/shard_load_memory.py --checkpoint DIR     # any bf16 / fp32 DeepSeek checkpoint

A process imports everything first, then reads VmRSS, loads, and reads VmRSS and VmHWM (peak) again
from /proc/self/status: the table's "resident" is what the load added and stayed, "peak" the high-water
mark above the start. "slices" is the bytes of this rank's sharded tensors. No process group is
needed to load (the rank is an argument). Writes benchmarks/results/shard_load_memory.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "shard_load_memory.md"


def _status(key: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024


def _measure(checkpoint: str, tp: int, ep: int, rank: int) -> dict:
    import torch
    from graphopt.models import load
    from graphopt.models.shard_load import load_shard
    start = _status("VmRSS")
    if tp == ep == 1:
        model, sliced = load(checkpoint, dtype=torch.float32), 0
    else:
        model, shards = load_shard(checkpoint, tp=tp, ep=ep, rank=rank, dtype=torch.float32)
        sliced = shards.nbytes()
    params = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    return {"resident": _status("VmRSS") - start, "peak": _status("VmHWM") - start, "slices": sliced, "params": params}


def _random_checkpoint(directory: str) -> str:
    from graphopt.models import save
    from graphopt.models.random import random_model
    model = random_model(0, vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, n_routed_experts=32, n_group=4, topk_group=2)
    save(model, directory)
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        checkpoint, tp, ep, rank = args.child[0], *map(int, args.child[1:])
        print(json.dumps(_measure(checkpoint, tp, ep, rank)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or _random_checkpoint(tmp)
        rows = []
        for tp, ep in ((1, 1), (2, 2), (4, 4), (2, 1)):
            out = subprocess.run([sys.executable, __file__, "--child", checkpoint, str(tp), str(ep), "0"],
                                 capture_output=True, text=True, check=True)
            rows.append((tp, ep, json.loads(out.stdout.strip().splitlines()[-1])))
    mb = lambda b: f"{b / 2**20:.1f}"
    lines = [f"checkpoint: {args.checkpoint or 'random 4-layer model, 32 experts, hidden 512 (float32)'}; "
             f"model parameters {mb(rows[0][2]['params'])} MB", "",
             "| load | tp | ep | rank | resident MB | peak MB | slices MB |", "|---|---|---|---|---|---|---|"]
    for tp, ep, r in rows:
        how = "models.load (whole)" if tp == ep == 1 else "load_shard"
        lines.append(f"| {how} | {tp} | {ep} | 0 | {mb(r['resident'])} | {mb(r['peak'])} | {mb(r['slices'])} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.write_text("# Host memory of loading one rank\n\nCommand: `nice python benchmarks/shard_load_memory.py`\n\n"
                       + table + "\n")


if __name__ == "__main__":
    main()
