"""Load on `graphopt serve`: requests/s, time to first token and inter-token latency under N concurrent
streaming clients (a benchmark, not a test).

    python benchmarks/serve_load.py --concurrency 1 8 32 64 --max-tokens 32 --k 1

Starts `graphopt serve` (embedded model) in its own process on a free 127.0.0.1 port, then for each
concurrency C runs C clients at once, each sending `--requests` streamed completions one after the
other (held-out prompts of 32 tokens, greedy, eos ignored by asking for max_tokens). Per request:
TTFT = first text chunk - send; ITL = gaps between later chunks (a chunk holds the tokens of one
engine step: 1..k+1 with MTP). Prints each row as measured and writes serve_load_<device>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {"model": "graphopt-embedded", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens}


async def load(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(w: int):
            return [await one_request(client, prompts[(w * requests + i) % len(prompts)], max_tokens)
                    for i in range(requests)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "tok_per_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", help="the server's --device (default: cuda if available)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    from graphopt.models import load_tokenizer
    from graphopt.models.evaluate import HELDOUT_TEXT, heldout_prompts
    tok = load_tokenizer()
    prompts = [tok.decode(p) for p in heldout_prompts(tok.encode(HELDOUT_TEXT.read_text(encoding="utf-8")[:200_000]),
                                                        64, 32)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    batch = max(args.concurrency)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cmd = [sys.executable, "-m", "graphopt", "serve", "--k", str(args.k), "--backend", args.backend, "--port",
           str(port), "--max-batch-size", str(batch), "--max-waiting", str(4 * batch), "--device", device]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t0 = time.perf_counter()
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"graphopt serve exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        startup = time.perf_counter() - t0
        asyncio.run(load(url, prompts, 1, 1, 4))                 # warm-up: first prefill and step shapes
        rows = []
        for c in args.concurrency:
            row = asyncio.run(load(url, prompts, c, args.requests, args.max_tokens))
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    cuda = device.startswith("cuda")
    where = (f"{torch.cuda.get_device_name(device)}, bfloat16" if cuda
             else f"CPU ({os.cpu_count()} cores), float32")
    command = (f"python benchmarks/serve_load.py --concurrency {' '.join(map(str, args.concurrency))} "
               f"--requests {args.requests} --max-tokens {args.max_tokens} --k {args.k} --backend {args.backend}"
               f" --device {device}")
    lines = [f"# graphopt serve under load: embedded model, {where}", "", f"Command: `{command}`", "",
             f"Server: `graphopt serve --k {args.k} --backend {args.backend} --device {device} --max-batch-size "
             f"{batch}` in its own process (up in {startup:.0f} s: load, compile"
             f"{' and warm-up of every batch bucket' if cuda else ''}); clients: httpx streaming in one asyncio "
             "process.",
             "", "| clients | requests | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{1e3 * r['ttft_p50']:.0f} | {1e3 * r['ttft_p99']:.0f} | {1e3 * r['itl_p50']:.1f} | "
              f"{1e3 * r['itl_p99']:.1f} |" for r in rows]
    lines += ["", "ITL is per streamed chunk: one engine step's tokens (1..k+1 with MTP).", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "serve_load_cuda.md" if cuda else "serve_load_cpu.md"
    (out / name).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
