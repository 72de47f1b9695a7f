"""Every quantisation preset x {plain, MTP k=1} compiled and generated on one device.

    python benchmarks/quant_sweep.py --device cuda --dtype bfloat16 --out benchmarks/results/quant_sweep_cuda_bf16.md

Per row: compile seconds (capture excluded: each worker captures the model once and every preset
compiles copies of those graphs), 16 greedy tokens for 3 prompts, whether the MTP output equals the
plain output under the same preset, and ||logits - reference|| / ||reference|| and top-1 agreement
against the same preset compiled on the CPU in float32 (one 12-token window). Rows print as they are measured. Each device runs in a worker
process; a worker that dies (a crash, not an exception) is restarted after the preset it died on,
which is reported as crashed, so one crash cannot take the table with it.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
import traceback

PROMPTS = [[1, 500, 600, 700], [1, 42], [1, 9, 8, 7, 6, 5, 4, 3, 2]]
LOGIT_IDS = [[1, 9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13]]
NEW_TOKENS = 16


def _worker(presets, device, dtype, with_spec, q) -> None:
    import torch
    import graphopt
    from graphopt import api
    from graphopt.capture.step import capture_main, capture_mtp
    from graphopt.models import load
    model = load(dtype=getattr(torch, dtype), device=device)
    main, mtp = capture_main(model, 16), capture_mtp(model, 0, 16)
    # every preset starts from the same captured graphs (capture is most of a compile's time)
    api.capture_main = lambda m, bs: copy.deepcopy(main)
    api.capture_mtp = lambda m, d, bs: copy.deepcopy(mtp)
    ids = torch.tensor(LOGIT_IDS, device=device)
    for preset in presets:
        q.put(("start", preset))
        for spec in ((False, True) if with_spec else (False,)):
            try:
                t0 = time.perf_counter()
                compiled = graphopt.compile(model, quant=preset, spec="mtp" if spec else None, progress=False)
                seconds = time.perf_counter() - t0
                out = compiled.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
                logits = compiled(ids).double().cpu().tolist()   # plain lists cross processes safely
                q.put(("row", preset, spec, {"ok": True, "seconds": seconds, "tokens": out, "logits": logits}))
            except Exception as e:
                q.put(("row", preset, spec, {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200],
                                             "trace": traceback.format_exc()[-2500:]}))
    q.put(("done",))


def run_device(presets, device, dtype, with_spec, on_row, timeout=900) -> None:
    """Runs presets in a worker; restarts it past a preset it crashed on. on_row(preset, spec, result)."""
    ctx = mp.get_context("spawn")
    todo = list(presets)
    while todo:
        q = ctx.Queue()
        p = ctx.Process(target=_worker, args=(todo, device, dtype, with_spec, q))
        p.start()
        current, deadline = None, time.monotonic() + timeout
        while True:
            try:
                msg = q.get(timeout=5)
            except queue_mod.Empty:
                if p.is_alive() and time.monotonic() < deadline:
                    continue
                msg = ("died",)
            if msg[0] == "start":
                current = msg[1]
                todo.remove(current)
            elif msg[0] == "row":
                on_row(*msg[1:])
            elif msg[0] == "done":
                todo = []
                break
            else:
                if current is not None:
                    on_row(current, None, {"ok": False, "error": f"worker died (exit code {p.exitcode})", "trace": ""})
                else:
                    todo = []   # died before its first preset (load or capture): nothing to retry
                    on_row("(all)", None, {"ok": False, "error": f"worker died before the first preset (exit code "
                                                               f"{p.exitcode})", "trace": ""})
                break
        p.join(5)
        if p.is_alive():
            p.kill()


def main(argv=None) -> int:
    import torch
    from tqdm import tqdm
    from graphopt.quant.config import PRESETS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--presets", nargs="*", default=sorted(PRESETS))
    ap.add_argument("--no-reference", action="store_true", help="skip the float32 CPU reference compile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    refs: dict[str, object] = {}
    if not args.no_reference:
        bar = tqdm(total=len(args.presets), desc="float32 CPU reference", unit="preset")   # its rows print nothing

        def on_reference(preset, spec, r):
            refs[preset] = torch.tensor(r["logits"]) if r["ok"] else None
            bar.update()
        run_device(args.presets, "cpu", "float32", False, on_reference)
        bar.close()
    rows = [f"`python benchmarks/quant_sweep.py --device {args.device} --dtype {args.dtype}`", "",
            "| preset | MTP | compile s | generated | MTP == plain | logits vs CPU fp32: rel. norm | top-1 agreement |",
            "|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    plain: dict[str, list] = {}
    failures = []

    def on_row(preset, spec, r):
        mtp = "-" if spec is None else ("k=1" if spec else "off")
        if not r["ok"]:
            failures.append(preset)
            row = f"| {preset} | {mtp} | - | FAILED: {r['error']} | - | - | - |"
            print(r["trace"], file=sys.stderr, flush=True)
        else:
            same = "-"
            if spec:
                same = "yes" if r["tokens"] == plain.get(preset) else "NO"
                if same == "NO":
                    failures.append(preset)
            else:
                plain[preset] = r["tokens"]
            ref = refs.get(preset)
            diff = top1 = "-"
            if ref is not None:
                got = torch.tensor(r["logits"])
                diff = f"{float((got - ref).norm() / ref.norm()):.3g}"
                top1 = f"{float((got.argmax(-1) == ref.argmax(-1)).double().mean()):.2f}"
            row = (f"| {preset} | {mtp} | {r['seconds']:.1f} | {sum(map(len, r['tokens']))} tokens | "
                   f"{same} | {diff} | {top1} |")
        print(row, flush=True)
        rows.append(row)

    run_device(args.presets, args.device, args.dtype, True, on_row)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")
    print(f"{len(failures)} failing rows" if failures else "every row passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
