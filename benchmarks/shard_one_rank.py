"""What sharding costs on one device: the decode step of a world of one rank, sharded (compile option
shard_one_rank: every weight its one piece, every collective a graph node over the one-rank group)
against the unsharded step of the same model, in one process.

    python benchmarks/shard_one_rank.py --model embedded                      # H200: nccl, inductor, CUDA graphs
    python benchmarks/shard_one_rank.py --model v2lite                        # batches 1 8 64
    python benchmarks/shard_one_rank.py --model embedded --spec mtp
    python benchmarks/shard_one_rank.py --device cpu --steps 3                # CPU smoke run: gloo, eager

The process initialises a process group of one rank (nccl on CUDA, gloo on CPU; MASTER_ADDR 127.0.0.1
and a free port), compiles the model three times with the same options (plain; shard_one_rank=True;
shard_one_rank=True with GRAPHOPT_KEEP_ONE_RANK_COLLECTIVES=1, which keeps in the Inductor backend's
graph the collectives it otherwise drops over one rank, so their cost shows), checks that all decode
the same greedy tokens, then times one decode step of each at every batch, alternating `--repeats`
times (the eager backend runs every collective, so there the last two are the same graph); a row shows the medians and is printed (and the table
written) as soon as it is measured, so a run cut short keeps what it measured.

ms/step: on CUDA with CUDA graphs, the CUDA-event time of one replay of the step's graph (what
benchmarks/decode.py reports as ms/step), median over `--steps` replays after 3; otherwise the time
of one decode call in the engine loop (CUDA events, or the wall clock on CPU), median over `--steps`
calls after `--warmup`. Collectives: those of one call of the sharded step graph. Each piece (a
compile, the first generation, a batch) has `--timeout` seconds (on the H200 a V2-Lite compile took
~30 s and its first decode call ~114 s); a piece past it, or failing, is a line under the table.

Models (benchmarks/decode.py builds them): `embedded` (the embedded 6-layer model) and `v2lite`
(DeepSeek-V2-Lite's sizes, random weights: speed only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from decode import PROMPT_LEN, ROOT, _replayed_graph, build_model, events_ms, prompts   # benchmarks/: the script dir

BATCHES = {"embedded": [1, 8], "v2lite": [1, 8, 64]}
# system: (shard_one_rank, keep the one-rank collectives in the lowered graph: GRAPHOPT_KEEP_ONE_RANK_COLLECTIVES)
SYSTEMS = {"unsharded": (False, False), "one-rank sharded": (True, False), "collectives kept": (True, True)}


# -- the one-rank world -----------------------------------------------------------------------------

def init_one_rank(device: torch.device) -> str:
    """A process group of one rank on a free local port; its first collective runs here, outside any
    CUDA graph capture (nccl sets its communicator up on the first one)."""
    from graphopt.runtime.distributed import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(seconds=120),
                            device_id=device if device.type == "cuda" else None)
    dist.all_reduce(torch.ones(1, device=device))
    return backend


@contextmanager
def deadline(seconds: int, what: str):
    """TimeoutError in this (main) thread once `what` has run `seconds` (checked when Python runs again)."""
    def fire(signum, frame):
        raise TimeoutError(f"{what}: still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- timing -----------------------------------------------------------------------------------------

class TimedDecode:
    """A step provider over an executable that times each of its decode calls (CUDA events on CUDA,
    the wall clock elsewhere); everything else is the executable's."""

    def __init__(self, executable, cuda: bool):
        self.executable, self.cuda, self.ms = executable, cuda, []

    def __getattr__(self, name):
        return getattr(self.executable, name)

    def decode(self, inputs):
        if not self.cuda:
            t0 = time.perf_counter()
            out = self.executable.decode(inputs)
            self.ms.append(1e3 * (time.perf_counter() - t0))
            return out
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = self.executable.decode(inputs)
        b.record()
        b.synchronize()
        self.ms.append(a.elapsed_time(b))
        return out


class System:
    """One compile, its engine (cache sized for the largest batch, kept across batches as decode.py
    keeps it, so the CUDA graphs of each bucket are captured once) and its decode timer."""

    def __init__(self, name: str, compiled, max_batch: int, steps: int, warmup: int, cuda: bool):
        from graphopt.runtime.engine import Engine
        self.name, self.compiled = name, compiled
        ex = compiled.executable
        k = ex.num_speculative_tokens
        # every row is still decoding at call warmup + steps: a call emits at most 1 + k tokens per row
        self.new_tokens = (warmup + steps + 1) * (1 + k) + 1
        self.steps, self.warmup = steps, warmup
        blocks = -(-(PROMPT_LEN + self.new_tokens + 2 * k + 2) // compiled.options.block_size)
        self.timer = TimedDecode(ex, cuda)
        o = compiled.options
        self.engine = Engine(self.timer, max_batch_size=max_batch, prefill_chunk_size=o.prefill_chunk_size,
                             num_blocks=1 + max_batch * blocks)

    def step_ms(self, batch_prompts: list[list[int]]) -> tuple[float, str]:
        """(ms of one decode step at len(batch_prompts) rows, what was timed); see the module doc."""
        from graphopt.runtime.request import SamplingParams
        self.timer.ms = []
        for p in batch_prompts:
            self.engine.add_request(p, SamplingParams(max_new_tokens=self.new_tokens))
        self.engine.run_until_done()
        ex = self.compiled.executable
        graph = _replayed_graph(ex, len(batch_prompts)) if getattr(ex, "cuda_graphs", False) else None
        if graph is not None:
            return events_ms(graph.replay, reps=self.steps), "CUDA graph replay (events)"
        calls = self.timer.ms[self.warmup:self.warmup + self.steps]
        return statistics.median(calls), "decode call (" + ("events" if self.timer.cuda else "wall") + ")"


# -- the table --------------------------------------------------------------------------------------

def render(run: dict) -> str:
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"# The sharded step at world size 1 against the unsharded one, {run['model']} model", "",
             f"Command: `{run['command']}`", "",
             f"{run['device']}; backend {run['backend']}, {run['dtype']}, process group {run['pg']} of one rank, "
             f"torch {run['torch']}; spec {run['spec']}; medians of {run['repeats']} alternating repeats of "
             f"{run['steps']} timed steps each.", "",
             f"Greedy tokens equal (all three, {run['check']}): "
             f"**{run.get('tokens_equal', '-')}**", "",
             "| model | spec | batch | unsharded ms/step | one-rank sharded ms/step | ratio | collectives kept "
             "ms/step | ratio | collectives per step (graph) | timed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["rows"]:
        lines.append(f"| {run['model']} | {run['spec']} | {r['batch']} | {f(r.get('unsharded'))} | "
                     f"{f(r.get('one-rank sharded'))} | {f(r.get('ratio'))} | {f(r.get('collectives kept'))} | "
                     f"{f(r.get('ratio kept'))} | {run.get('collectives', '-')} | {r.get('timed', '-')} |")
    seconds = run.get("seconds", {})
    if seconds:
        lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())]
    for what, why in run["failures"].items():
        lines.append(f"\n{what}: FAILED ({why})")
    return "\n".join(lines) + "\n"


def write(run: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(run, indent=1))
    (out / f"{stem}.md").write_text(render(run))


# -- the run ----------------------------------------------------------------------------------------

def compile_all(model, spec, batches: list[int], args, device, run: dict) -> dict[str, System]:
    """The plain and the one-rank sharded compiles of `model` (SYSTEMS), with the same options."""
    import graphopt
    from graphopt.backends.inductor.backend import KEEP_ONE_RANK_COLLECTIVES
    from graphopt.passes.sharding import count_collectives
    options = json.loads(os.environ.get("GRAPHOPT_COMPILE_OPTIONS", "{}"))   # as benchmarks/decode.py
    systems = {}
    for system, (one_rank, keep) in SYSTEMS.items():
        t0 = time.perf_counter()
        try:
            with deadline(args.timeout, f"compile {system}"), mock.patch.dict(os.environ, {KEEP_ONE_RANK_COLLECTIVES: "1"} if keep else {}):
                compiled = graphopt.compile(model, spec=spec, backend=args.backend, progress=False,
                                            max_batch_size=max(batches), shard_one_rank=one_rank, **options)
        except Exception as e:     # a failing piece is a line under the table, not the end of it
            run["failures"][f"compile {system}"] = f"{type(e).__name__}: {e}"
            print(f"compile {system}: FAILED {e}", flush=True)
            continue
        run["seconds"][f"compile {system}"] = time.perf_counter() - t0
        run["backend"] = compiled.backend
        if one_rank:
            c = count_collectives(compiled.graphs["step"])
            run["collectives"] = f"{c['all_reduce']} all_reduce + {c['all_gather']} all_gather"
        systems[system] = System(system, compiled, max(batches), args.steps, args.warmup, device.type == "cuda")
        print(f"compiled {system} in {run['seconds'][f'compile {system}']:.1f} s", flush=True)
    return systems


def check_tokens(systems: dict[str, System], check: list[list[int]], args, run: dict) -> None:
    """All decode `check` greedily (the first generation also compiles and captures the step graphs)."""
    run["check"] = f"{len(check)} prompts x 32 tokens"
    tokens = {}
    for system, s in systems.items():
        t0 = time.perf_counter()
        try:
            with deadline(args.timeout, f"first generation {system}"):
                tokens[system] = s.compiled.generate(check, max_new_tokens=32, ignore_eos=True)
        except Exception as e:
            run["failures"][f"first generation {system}"] = f"{type(e).__name__}: {e}"
            continue
        run["seconds"][f"first generation {system}"] = time.perf_counter() - t0
    if len(tokens) == len(SYSTEMS):
        a, *others = tokens.values()
        differ = max(sum(x != y for x, y in zip(a, b)) for b in others)
        run["tokens_equal"] = "yes" if all(b == a for b in others) else f"NO ({differ} of {len(a)} prompts differ)"
    print(f"greedy tokens equal: {run.get('tokens_equal', '-')}", flush=True)


def measure(systems: dict[str, System], batch_prompts: list[list[int]], args, run: dict) -> dict:
    """One row: the median ms/step of each system at this batch, the two alternating (drift hits both)."""
    batch = len(batch_prompts)
    row, times = {"batch": batch}, {s: [] for s in systems}
    try:
        with deadline(args.timeout, f"batch {batch}"):
            for _ in range(args.repeats):
                for system, s in systems.items():
                    ms, row["timed"] = s.step_ms(batch_prompts)
                    times[system].append(ms)
    except Exception as e:
        run["failures"][f"batch {batch}"] = f"{type(e).__name__}: {e}"
    for system, ms in times.items():
        row[system] = statistics.median(ms) if ms else None
        row[f"{system} repeats"] = ms
    if row.get("unsharded") and row.get("one-rank sharded"):
        row["ratio"] = row["one-rank sharded"] / row["unsharded"]
    if row.get("unsharded") and row.get("collectives kept"):
        row["ratio kept"] = row["collectives kept"] / row["unsharded"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(BATCHES), default="embedded")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--spec", choices=("off", "mtp"), default="off")
    ap.add_argument("--batches", type=int, nargs="+", help="default: 1 8 (embedded), 1 8 64 (v2lite)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="decode calls before the timed ones (no CUDA graphs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per piece (a compile, a first call, a batch)")
    ap.add_argument("--suffix", default="", help="results file shard_one_rank_<model>[_mtp][_cpu]<suffix>.md/.json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())   # set_device and nccl's device_id need an index
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    batches = args.batches or BATCHES[args.model]
    stem = (f"shard_one_rank_{args.model}" + ("_mtp" if args.spec == "mtp" else "")
            + ("_cpu" if device.type == "cpu" else "") + args.suffix)
    out = Path(args.out)
    torch.manual_seed(0)
    pg = init_one_rank(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    run = dict(model=args.model, spec=args.spec, device=name, backend=args.backend, dtype=args.dtype, pg=pg,
               torch=torch.__version__, steps=args.steps, repeats=args.repeats, rows=[], failures={}, seconds={},
               command="python benchmarks/shard_one_rank.py " + " ".join(sys.argv[1:]))
    model = build_model(args.model, str(device), getattr(torch, args.dtype))
    vocab = model.config.vocab_size
    systems = compile_all(model, "mtp" if args.spec == "mtp" else None, batches, args, device, run)
    check_tokens(systems, prompts(vocab, 4), args, run)
    write(run, out, stem)
    for batch in batches:
        row = measure(systems, prompts(vocab, batch), args, run)
        run["rows"].append(row)
        print("ROW " + json.dumps(row), flush=True)
        write(run, out, stem)
    print(render(run), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
