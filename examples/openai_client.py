"""Serve the embedded model over an OpenAI-compatible HTTP API and talk to it with the `openai` client.

    python examples/openai_client.py [--port 0] [--max-tokens 24]

What `graphopt serve --port 8000` does, in one script: compile, start the server (here in a thread,
on 127.0.0.1), then a plain completion, a streamed one and a chat completion, and the server's
Prometheus metrics. Needs the `serve` extra and the `openai` package.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import httpx
import openai
import uvicorn

import graphopt
from graphopt.models import load
from graphopt.serve import build_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    port = args.port
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

    compiled = graphopt.compile(load(), spec="mtp", progress=False)          # finds the embedded tokenizer
    server = uvicorn.Server(uvicorn.Config(build_app(compiled, model_name="graphopt-embedded"),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed")

    r = client.completions.create(model="graphopt-embedded", prompt="def fibonacci(n):", max_tokens=args.max_tokens,
                                  temperature=0)
    print(f"completion ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens):\n"
          f"def fibonacci(n):{r.choices[0].text}\n")
    print("streamed: ", end="")
    for chunk in client.completions.create(model="graphopt-embedded", prompt="import os\n", stream=True,
                                           max_tokens=args.max_tokens, temperature=0):
        print(repr(chunk.choices[0].text), end=" ", flush=True)
    chat = client.chat.completions.create(model="graphopt-embedded", max_tokens=args.max_tokens, temperature=0,
                                          messages=[{"role": "user", "content": "class Stack:"}])
    print(f"\n\nchat reply: {chat.choices[0].message.content!r}\n")
    metrics = httpx.get(base + "/metrics").text
    print("\n".join(line for line in metrics.splitlines()
                    if line.startswith(("graphopt_generated_tokens_total", "graphopt_spec_acceptance_rate",
                                        "graphopt_cache_blocks_used"))))
    server.should_exit = True
    thread.join(30)


if __name__ == "__main__":
    main()
