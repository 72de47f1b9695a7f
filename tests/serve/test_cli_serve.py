"""`graphopt serve` as a user starts it: a real process on a free port, a request with the openai
client, then SIGTERM: a graceful shutdown (the app's shutdown ran: the engine stopped), after which
the process ends by the signal, as uvicorn ends it (so a supervisor sees it was terminated)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "graphopt", "serve", "--k", "0", "--port", str(port),
                             "--max-batch-size", "4"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "server not up after 240 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        r = client.completions.create(model="graphopt-embedded", prompt="def fibonacci(n):", max_tokens=8,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        finally:
            proc.kill()
    text = (tmp_path / "serve.log").read_text()
    assert rc in (0, -signal.SIGTERM), text[-2000:]
    assert "Application shutdown complete" in text and "Traceback" not in text, text[-2000:]
