"""Decode speed on one GPU, side by side in one run: graphopt (inductor backend, spec off and MTP k = 1..3)
against transformers eager `generate`, transformers static cache + torch.compile, and plain
torch.compile(mode="reduce-overhead") of graphopt's reference model in a greedy loop; plus the HBM floor.

    python benchmarks/decode.py --model embedded --batches 1 8 32 64 --out benchmarks/results
    python benchmarks/decode.py --model v2lite   --batches 1 8 32 64 128 --systems graphopt torch.compile
    python benchmarks/decode.py --model embedded --systems graphopt graphopt@w8a8 graphopt@fp8 --suffix _quant

A system "graphopt@PRESET" (or "graphopt-k1@PRESET") compiles with quant=PRESET (calibrated on the
model's tokenizer where the preset needs data; the V2-Lite shape has none, so calibrating presets
fail there, named in the table).

GRAPHOPT_COMPILE_OPTIONS='{"fuse_projections": false}' (JSON) adds compile options to every graphopt
system, for A/B rows (GRAPHOPT_DISABLE_KERNELS=linear,... leaves kernels out; both reach the children).

Every system runs in its own process (a crash is a row, not the end of the table) and prints its
rows as soon as they are measured; the parent collects them into `decode_<model>.md` / `.json`.

Figures (all greedy, bf16, prompts of 16 random tokens, `--new-tokens` generated per row):
  tokens/s     generated tokens / wall time of the whole generation (prefill included), median of 3
  ms/step      the decode step alone: CUDA-event time of one replayed step (graphopt) or one
               compiled step call (torch.compile), median over 20 after warm-up
  wall - GPU   wall time per decode step in the engine loop minus the GPU time of the step (negative
               or near 0 when the host works while the device runs the step ahead)
  GPU idle     from a profiler trace of one whole generation (device events only): the time inside
               the trace in which no kernel or copy runs, per step: what the GPU waits for Python
  kernels      kernels launched by one replay of the decode step's CUDA graph
  floor ms     bytes the step must touch (weights of the dense and attention parts, the distinct experts
               the batch's tokens are routed to, counted from the routing of a real step, and the KV
               cache read) / the copy bandwidth measured in the same run
The V2-Lite shape is DeepSeek-V2-Lite's sizes (27 layers, 64 experts of which 6 per token, 2 shared,
kv_lora_rank 512) with V3-style routing and random weights: speed only, the outputs mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = ("graphopt", "graphopt-k1", "graphopt-k2", "graphopt-k3", "torch.compile", "hf-eager", "hf-static-compile")
PROMPT_LEN = 16


# -- models -----------------------------------------------------------------------------------------

def v2lite_config():
    from graphopt.models.config import DeepseekV3Config
    return DeepseekV3Config(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                            num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                            n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                            first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=4096,
                            routed_scaling_factor=1.0, norm_topk_prob=False)


def build_model(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    from graphopt.models import load
    from graphopt.models.deepseek import DeepseekV3ForCausalLM
    if name == "embedded":
        return load(dtype=dtype, device=device)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(v2lite_config()).to(dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
        for pname, p in model.named_parameters():
            if pname.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)           # spread routing, as trained routers are
    model.model.rotary_emb.reset_parameters(device)
    return model.eval()


def prompts(vocab: int, batch: int, seed: int = 0) -> list[list[int]]:
    """Held-out text for the embedded model (so MTP acceptance means something), random ids for the
    random-weight V2-Lite shape."""
    from graphopt.models import load_tokenizer
    from graphopt.models.evaluate import HELDOUT_TEXT, heldout_prompts
    tok = load_tokenizer()
    if tok.vocab_size == vocab:
        return heldout_prompts(tok.encode(HELDOUT_TEXT.read_text(encoding="utf-8")[:200_000]), batch, PROMPT_LEN)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, PROMPT_LEN), generator=g).tolist()


def events_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def gpu_trace(fn) -> dict:
    """Run fn under the profiler: kernels launched, GPU busy time (union of kernel / copy intervals)
    and the GPU's idle time inside the span from the first to the last device event, in us."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:     # device events only: little overhead
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    kernels = sum(1 for e in events if e.get("cat") == "kernel")
    span = spans[-1][1] - spans[0][0] if spans else 0.0
    by_name: dict[str, list[float]] = {}                 # kernel name -> [launches, total us]
    for e in events:
        if e.get("cat") == "kernel":
            entry = by_name.setdefault(e["name"][:200], [0, 0.0])
            entry[0] += 1
            entry[1] += e.get("dur", 0)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return dict(kernels=kernels, busy_us=busy, idle_us=span - busy, top=[[n, c, us] for n, (c, us) in top])


def emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


# -- the floor --------------------------------------------------------------------------------------

def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 10)."""
    a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = events_ms(lambda: b.copy_(a), reps=10)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def floor_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step at `batch` rows must read: every weight except the routed experts', the
    distinct routed experts the batch's tokens select (routing of a real forward), the KV read."""
    c = model.config
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".experts." not in n and not n.startswith("mtp.") and "embed_tokens" not in n)
    total += batch * c.hidden_size * 2                                   # the embedding rows read
    ids = torch.randint(3, c.vocab_size, (batch, 1), device="cuda")
    selected = []
    hook = [m.register_forward_hook(lambda mod, i, o: selected.append(o[1])) for n, m in model.named_modules()
            if n.endswith("mlp.gate")]
    with torch.no_grad():
        model(ids)
    for h in hook:
        h.remove()
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size * 2
    total += sum(len(torch.unique(s)) for s in selected) * per_expert
    total += batch * context * c.kv_cache_dim * 2 * c.num_hidden_layers  # the latent cache read
    return float(total)


# -- systems ----------------------------------------------------------------------------------------

def run_graphopt(model, name: str, k: int, batches: list[int], new_tokens: int, quant: str | None = None) -> None:
    import graphopt
    from graphopt.runtime.request import SamplingParams
    spec = graphopt.SpecConfig(num_speculative_tokens=k) if k else None
    t0 = time.perf_counter()
    options = json.loads(os.environ.get("GRAPHOPT_COMPILE_OPTIONS", "{}"))
    compiled = graphopt.compile(model, spec=spec, quant=quant, progress=False, max_batch_size=max(batches), **options)
    compile_s = time.perf_counter() - t0
    ex = compiled.executable
    engine = compiled.engine(num_blocks=1 + max(batches) * -(-(PROMPT_LEN + new_tokens + 2 * k + 2) // 16))
    first = True
    for B in batches:
        ps = prompts(model.config.vocab_size, B)
        steps = 0

        def go():
            nonlocal steps
            for p in ps:
                engine.add_request(p, SamplingParams(max_new_tokens=new_tokens))
            while engine.has_unfinished():
                engine.step()
                steps += 1
            return engine.run_until_done()

        t_first = wall(go) if first else None          # compiles + captures the bucket
        first = False
        wall(go)                                       # this bucket captured
        times, steps_per = [], None
        for _ in range(3):
            steps = 0
            times.append(wall(go))
            steps_per = steps
        tokens = B * new_tokens
        dt = statistics.median(times)
        graph = _replayed_graph(ex, B)
        step_ms = events_ms(graph.replay) if graph is not None else None
        trace = gpu_trace(lambda: [graph.replay() for _ in range(5)]) if graph is not None else None
        kernels = trace["kernels"] / 5 if trace else None
        if trace and os.environ.get("GRAPHOPT_KERNEL_TABLE"):   # where a replayed step's GPU time goes
            print(f"KERNELS one {name} step at batch {B}: launches, us per step", flush=True)
            for kname, count, us in trace["top"]:
                print(f"KERNELS {count / 5:6.1f} {us / 5:9.1f}  {kname}", flush=True)
        steps = 0
        loop = gpu_trace(go)                           # the engine loop: how long the GPU waits for the host
        emit(dict(system=name, batch=B, tokens_per_s=tokens / dt, ms_per_step=step_ms, wall_ms_per_step=1e3 * dt / steps_per,
                  host_us=(dt / steps_per - step_ms * 1e-3) * 1e6 if step_ms else None,
                  gpu_idle_us=loop["idle_us"] / steps, kernels=kernels, steps=steps_per, compile_s=compile_s,
                  first_call_s=t_first, acceptance=(ex.stats or {}).get("acceptance_rate"), captures=ex.captures))


def _replayed_graph(ex, B: int):
    """The CUDA graph the engine replays for B rows: bound to its batch tensors, else the bucket's own."""
    rows = next(b for b in ex.buckets if b >= B)
    bound = [g for (key, greedy), g in ex._bound.items() if g.rows == rows and greedy]
    entry = bound[0] if bound else ex._graphs.get((rows, True))
    return entry.graph if entry is not None else None


def run_torch_compile(model, batches: list[int], new_tokens: int) -> None:
    """gpt-fast style: the reference model over a static paged cache, argmax on the device, one compiled
    step per token (mode reduce-overhead: CUDA graphs by torch.compile), dynamic=False (one per batch)."""
    from graphopt.step.paged import dense_block_tables, slot_mapping
    c = model.config
    bs = 16
    per_row = -(-(PROMPT_LEN + new_tokens + 1) // bs)
    t0 = time.perf_counter()

    def step(ids, positions, slots, tables, caches):
        logits = model(ids, positions, caches, slots, tables)
        return logits[:, -1].argmax(-1, keepdim=True)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    compile_s = None
    for B in batches:
        caches = model.new_kv_caches(1 + B * per_row, bs)
        tables = dense_block_tables(B, per_row, "cuda")
        ps = torch.tensor(prompts(c.vocab_size, B), device="cuda")

        def generate():
            pos = torch.arange(PROMPT_LEN, device="cuda").expand(B, -1)
            with torch.no_grad():
                tok = model(ps, pos, caches, slot_mapping(pos, tables, bs), tables)[:, -1].argmax(-1, keepdim=True)
                for t in range(PROMPT_LEN, PROMPT_LEN + new_tokens - 1):
                    p = torch.full((B, 1), t, device="cuda")
                    tok = compiled(tok, p, slot_mapping(p, tables, bs), tables, caches).clone()
            return tok

        first = wall(generate)
        if compile_s is None:
            compile_s = time.perf_counter() - t0
        dt = statistics.median([wall(generate) for _ in range(3)])
        p = torch.full((B, 1), PROMPT_LEN, device="cuda")
        s = slot_mapping(p, tables, bs)
        tok = torch.zeros(B, 1, dtype=torch.int64, device="cuda")
        with torch.no_grad():
            ms = events_ms(lambda: compiled(tok, p, s, tables, caches))
        emit(dict(system="torch.compile", batch=B, tokens_per_s=B * new_tokens / dt, ms_per_step=ms,
                  wall_ms_per_step=1e3 * dt / new_tokens, compile_s=compile_s, first_call_s=first))


def hf_model(model):
    import transformers
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["num_nextn_predict_layers"] = 0
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("cuda"):
        hf = transformers.DeepseekV3ForCausalLM(hf_cfg).to(torch.bfloat16)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    missing, _ = hf.load_state_dict(state, strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    return hf.eval()


def run_hf(model, batches: list[int], new_tokens: int, static_compile: bool) -> None:
    hf = hf_model(model)
    name = "hf-static-compile" if static_compile else "hf-eager"
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if static_compile:
        kw["cache_implementation"] = "static"
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    for B in batches:
        ids = torch.tensor(prompts(model.config.vocab_size, B), device="cuda")
        with torch.no_grad():
            first = wall(lambda: hf.generate(ids, **kw))
            dt = statistics.median([wall(lambda: hf.generate(ids, **kw)) for _ in range(2)])
        emit(dict(system=name, batch=B, tokens_per_s=B * new_tokens / dt, wall_ms_per_step=1e3 * dt / new_tokens,
                  first_call_s=first))


def run_floor(model, batches: list[int], new_tokens: int) -> None:
    bw = copy_bandwidth()
    for B in batches:
        nbytes = floor_bytes(model, B, PROMPT_LEN + new_tokens // 2)
        emit(dict(system="floor", batch=B, ms_per_step=1e3 * nbytes / bw, bytes=nbytes, bandwidth=bw))


def child(args) -> None:
    torch.manual_seed(0)
    model = build_model(args.model)
    s = args.system
    if s == "floor":
        run_floor(model, args.batches, args.new_tokens)
    elif s.startswith("graphopt"):
        base, _, quant = s.partition("@")
        run_graphopt(model, s, int(base[-1]) if base[-1].isdigit() else 0, args.batches, args.new_tokens,
                     quant or None)
    elif s == "torch.compile":
        run_torch_compile(model, args.batches, args.new_tokens)
    else:
        run_hf(model, args.batches, args.new_tokens, s == "hf-static-compile")


# -- the table --------------------------------------------------------------------------------------

def render(rows: list[dict], model: str, failures: dict[str, str], command: str = "") -> str:
    floor = {r["batch"]: r["ms_per_step"] for r in rows if r["system"] == "floor"}
    hf = {r["batch"]: r["tokens_per_s"] for r in rows if r["system"] == "hf-eager"}
    tc = {r["batch"]: r.get("ms_per_step") for r in rows if r["system"] == "torch.compile"}
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    command = command or f"python benchmarks/decode.py --model {model}"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "GPU"   # --combine runs anywhere
    lines = [f"# Decode speed, {model} model, bf16, greedy", "", f"Commands (one {device} run each): `{command}`", "",
             "| system | batch | tokens/s | x hf eager | ms/step (GPU) | x floor | x torch.compile step | wall ms/step | "
             "wall - GPU us/step | GPU idle us/step | kernels/step | acceptance | compile s | first call s |",
             "|" + "---|" * 14]
    for r in rows:
        if r["system"] == "floor":
            continue
        B, ms = r["batch"], r.get("ms_per_step")
        lines.append(" | ".join([
            f"| {r['system']}", str(B), f(r.get("tokens_per_s"), 0),
            f(r["tokens_per_s"] / hf[B]) if B in hf and r.get("tokens_per_s") else "-",
            f(ms, 3), f(ms / floor[B]) if ms and B in floor else "-",
            f(tc[B] / ms) if ms and tc.get(B) else "-",
            f(r.get("wall_ms_per_step"), 3), f(r.get("host_us"), 0), f(r.get("gpu_idle_us"), 0),
            f(r.get("kernels"), 0), f(r.get("acceptance")),
            f(r.get("compile_s"), 1), f(r.get("first_call_s"), 1)]) + " |")
    lines += ["", "| batch | floor ms/step | bytes touched | copy bandwidth TB/s |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['ms_per_step']:.3f} | {r['bytes'] / 1e9:.3f} GB | {r['bandwidth'] / 1e12:.2f} |"
              for r in rows if r["system"] == "floor"]
    for s, why in failures.items():
        lines.append(f"\n{s}: FAILED ({why})")
    return "\n".join(lines) + "\n"


def combine(files: list[Path], model: str, out: Path) -> None:
    """One table from several runs (each of a few systems, as device calls are time-limited)."""
    rows, failures, commands = [], {}, []
    for f in files:
        run = json.loads(f.read_text())
        ran = {r["system"] for r in run["rows"]} | set(run["failures"])
        rows = [r for r in rows if r["system"] not in ran] + run["rows"]
        failures = {s: w for s, w in failures.items() if s not in ran} | run["failures"]
        commands += run.get("commands", [])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_{model}.json").write_text(json.dumps({"rows": rows, "failures": failures, "commands": commands},
                                                         indent=1))
    (out / f"decode_{model}.md").write_text(render(rows, model, failures, "`, `".join(commands)))
    print(render(rows, model, failures, "`, `".join(commands)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("embedded", "v2lite"), default="embedded")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    ap.add_argument("--system", help=argparse.SUPPRESS)     # child mode
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--suffix", default="", help="results file decode_<model><suffix>.md/.json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--combine", nargs="+", metavar="JSON", type=Path,
                    help="no run: merge the rows of earlier runs' decode_<model>.json (a later file wins for "
                         "the systems it ran) into --out")
    args = ap.parse_args()
    if args.system:
        return child(args)
    if args.combine:
        return combine(args.combine, args.model, Path(args.out))
    rows, failures = [], {}
    command = "python benchmarks/decode.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in ["floor", *args.systems]:
        cmd = [sys.executable, __file__, "--model", args.model, "--system", s, "--new-tokens", str(args.new_tokens),
               "--batches", *map(str, args.batches)]
        t0 = time.perf_counter()
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
            tail = []
            for line in p.stdout:
                if line.startswith("ROW "):
                    rows.append(json.loads(line[4:]))
                    print(line.strip(), flush=True)
                elif line.startswith("KERNELS "):
                    print(line.rstrip(), flush=True)
                else:
                    tail = (tail + [line.rstrip()])[-8:]
                if time.perf_counter() - t0 > args.timeout:
                    p.kill()
                    failures[s] = f"timed out after {args.timeout} s"
                    break
            rc = p.wait()
            if rc and s not in failures:
                failures[s] = f"exit code {rc}: " + " / ".join(tail[-3:])
        except Exception as e:   # a peer must not take the table with it
            failures[s] = f"{type(e).__name__}: {e}"
        if s in failures:
            print(f"{s}: FAILED {failures[s]}", flush=True)
        (out / f"decode_{args.model}{args.suffix}.json").write_text(json.dumps({"rows": rows, "failures": failures,
                                                                    "commands": [command]}, indent=1))
        (out / f"decode_{args.model}{args.suffix}.md").write_text(render(rows, args.model, failures, command))
    print(render(rows, args.model, failures, command))


if __name__ == "__main__":
    main()
