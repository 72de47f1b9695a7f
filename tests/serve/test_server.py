"""`graphopt serve` with the real `openai` client against a uvicorn server on a free 127.0.0.1 port:
completions and chat, streaming and not, equal to CompiledModel.generate; 32 concurrent streams;
clients that disconnect leave no cache block behind; bad requests get 400 / 429 and the server
keeps serving. Every wait is bounded."""

import asyncio
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import graphopt  # noqa: E402
from graphopt.models import load_tokenizer  # noqa: E402
from graphopt.models.random import random_model  # noqa: E402
from graphopt.serve import build_app, chat_prompt  # noqa: E402
from graphopt.serve.app import ChatMessage  # noqa: E402

NAME = "tiny-random"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "x = 1\ny = "]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn in a thread; `stop()` asks it to exit as SIGTERM would, and waits (bounded)."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def compiled():
    model = random_model(0, vocab_size=8192, num_hidden_layers=2, eos_token_id=None)
    return graphopt.compile(model, spec=graphopt.SpecConfig(num_speculative_tokens=1), backend="eager",
                            progress=False, tokenizer=load_tokenizer(), max_batch_size=8)


@pytest.fixture(scope="module")
def expected(compiled):
    """Offline greedy outputs, computed before any server runs."""
    return {p: compiled.generate(p, max_new_tokens=12) for p in PROMPTS}


@pytest.fixture(scope="module")
def server(compiled, expected):
    s = _Server(build_app(compiled, model_name=NAME, max_batch_size=8, max_waiting=64))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


def _blocks_used(server) -> float:
    return _metric(server, "graphopt_cache_blocks_used")


def test_completion_equals_offline_greedy_generation(client, expected):
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == expected[prompt]
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(load_tokenizer().encode(prompt))


def test_streamed_completion_adds_up_to_the_same_text(client, expected):
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected[PROMPTS[2]]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streaming_and_not(client, compiled):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    want = compiled.generate(chat_prompt([ChatMessage(**m) for m in messages]), max_new_tokens=10,
                             stop=["\n### "])
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_32_concurrent_streams_all_complete_and_match_offline(server, expected):
    async def one(i):
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120,
                                      max_retries=0) as c:
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = await c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True)
            return prompt, "".join([chunk.choices[0].text async for chunk in stream])

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), timeout=300)

    results = asyncio.run(main())
    assert len(results) == 32 and all(text == expected[p] for p, text in results)
    assert _blocks_used(server) == 0


def test_clients_that_disconnect_mid_stream_free_their_blocks(server):
    aborted = _metric(server, 'graphopt_requests_finished_total{reason="aborted"}')
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"model": NAME, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())                 # one chunk, then hang up
    deadline = time.monotonic() + 30
    while _blocks_used(server) != 0:
        assert time.monotonic() < deadline, "an aborted request kept its cache blocks"
        time.sleep(0.1)
    # they were aborted (200 tokens each would still be running), not left to finish
    assert _metric(server, 'graphopt_requests_finished_total{reason="aborted"}') == aborted + 3


@pytest.mark.parametrize("body, fragment", [
    ({"model": "gpt-4", "prompt": "x"}, "is not served here"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": NAME, "prompt": "x", "n": 2}, "n=2 is not supported"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": NAME, "prompt": "x " * 400, "max_tokens": 8}, "context"),
    ({"model": NAME}, "prompt"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, client, expected, body, fragment):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    ok = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert ok.choices[0].text == expected[PROMPTS[0]]


def test_a_full_queue_answers_429(compiled):
    s = _Server(build_app(compiled, model_name=NAME, max_batch_size=1, max_waiting=1))
    try:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 120, "temperature": 0}
                return await asyncio.wait_for(asyncio.gather(*(c.post("/v1/completions", json=body)
                                                                for _ in range(6))), timeout=300)
        codes = sorted(r.status_code for r in asyncio.run(main()))
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert httpx.get(s.url + "/health", timeout=10).json() == {"status": "ok"}
    finally:
        s.stop()


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("graphopt_requests_running", "graphopt_requests_waiting", "graphopt_tokens_per_second",
                 "graphopt_spec_acceptance_rate", "graphopt_cache_blocks_used", "graphopt_engine_last_step_seconds",
                 "graphopt_cache_bytes_per_token"):
        assert f"\n{name} " in text
    assert 'graphopt_requests_finished_total{reason="length"}' in text
