"""Plot tokens/s against batch size per system from benchmarks/results/decode_<model>.json (written by
benchmarks/decode.py) into docs/images/decode_<model>.png.

    python benchmarks/plot_decode.py --model embedded
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = json.loads((ROOT / "benchmarks" / "results" / f"decode_{args.model}.json").read_text())["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows if "tokens_per_s" in r))
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in systems:
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["system"] == s)
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{args.model} model, bf16, greedy, H200")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    out = ROOT / "docs" / "images" / f"decode_{args.model}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
