"""The OpenAI-compatible HTTP API over one `EngineLoop` (FastAPI; run by uvicorn in `serve`).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streaming over SSE or not),
GET /v1/models, GET /health, GET /metrics (Prometheus text). Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with 400 (bad request), 429 (queue full) or 503
(shutting down). See docs/serving.md for the parameters and the chat template.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..runtime.request import FinishReason, SamplingParams, config_eos
from ..runtime.text import TextPieces, output_text
from .loop import EngineLoop, QueueFullError, log, warm_up

__all__ = ["build_app", "chat_prompt"]

_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.ABORTED: "abort"}
# OpenAI parameters this server does not implement: accepted only at their "off" value
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "suffix": None,
                "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None, "functions": None}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")   # unknown fields are ignored, as OpenAI's own API does
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)               # extension (vLLM's): 0 or -1 = off
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The minimal chat template (docs/serving.md): a system message as a preamble, then one
    `### role:` section per message, ending with an open `### assistant:` section."""
    parts = []
    for m in messages:
        parts.append(f"{m.content}\n\n" if m.role == "system" else f"### {m.role}:\n{m.content}\n")
    return "".join(parts) + "### assistant:\n"


CHAT_STOP = "\n### "   # a chat reply ends where the template's next section would begin


def build_app(compiled, *, model_name: str, max_batch_size: int = 16, max_waiting: int = 64,
              cache_budget_bytes: int | None = None, warmup: bool | None = None) -> FastAPI:
    """The app; its lifespan starts one engine over `compiled` (a CompiledModel) and stops it.
    warmup: run every batch bucket once before the app takes requests (`loop.warm_up`); None: on CUDA."""
    tokenizer = compiled.tokenizer
    if tokenizer is None:
        raise ValueError("graphopt serve needs a tokenizer (text in, text out): compile with tokenizer=... or "
                         "serve a checkpoint directory that has tokenizer.json")
    context = compiled.config.max_position_embeddings
    eos = config_eos(compiled.config)   # stop on the model's eos, as CompiledModel.generate does

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = compiled.engine(max_batch_size=max_batch_size, cache_budget_bytes=cache_budget_bytes)
        if warmup if warmup is not None else compiled.device.type == "cuda":
            seconds = await asyncio.to_thread(warm_up, engine, max_batch_size)   # the port opens after it
            log.info("warmed up batch sizes 1..%d in %.1f s", max_batch_size, seconds)
        app.state.loop = EngineLoop(engine, max_waiting=max_waiting).start()
        try:
            yield
        finally:
            app.state.loop.stop()

    app = FastAPI(title="graphopt", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg')}" if where else f"invalid request body: {first.get('msg')}"
        return ApiError(400, message, param=where).response()

    def check(body: _Sampling) -> None:
        if body.model != model_name:
            raise ApiError(400, f"model {body.model!r} is not served here; this server serves {model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        extra = body.model_extra or {}
        for name, off in _UNSUPPORTED.items():
            if name in extra and extra[name] not in (off, None):
                raise ApiError(400, f"{name}={extra[name]!r} is not supported by graphopt serve (only {off!r})",
                               param=name)
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", param="stop")

    def params(body: _Sampling, prompt_len: int, max_tokens: int | None, stop: list[str]) -> SamplingParams:
        room = context - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; the model's context is {context}",
                           param="prompt")
        max_new = max_tokens if max_tokens is not None else min(256, room)
        try:
            return SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                                  top_k=max(body.top_k, 0), seed=body.seed, stop=tuple(stop), eos_token_id=eos)
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    async def submit(request: Request, prompt_ids: list[int], sampling: SamplingParams):
        """(request id, asyncio queue of (event, output)) for a request now in the running batch."""
        loop: EngineLoop = request.app.state.loop
        queue: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()

        def on_event(event, output):
            aio.call_soon_threadsafe(queue.put_nowait, (event, output))

        try:
            rid = await asyncio.wrap_future(loop.submit(prompt_ids, sampling, on_event))
        except QueueFullError as e:
            raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from e
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from e
        except RuntimeError as e:
            raise ApiError(503, str(e), kind="server_error") from e
        return rid, queue

    async def run(request: Request, body: _Sampling, prompt_ids: list[int], sampling: SamplingParams, chat: bool):
        rid, queue = await submit(request, prompt_ids, sampling)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": int(time.time()), "model": model_name}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, rid, queue, head, chat, len(prompt_ids), usage),
                                     media_type="text/event-stream")
        output = await _wait(request, rid, queue)
        text = output_text(tokenizer, output)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = _FINISH[output.finish_reason]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(len(prompt_ids), len(output.token_ids))}

    async def _wait(request: Request, rid: int, queue: asyncio.Queue):
        """The finished output; a client that disconnects meanwhile aborts its request."""
        while True:
            try:
                event, output = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    request.app.state.loop.abort(rid)
                    raise ApiError(400, "client disconnected") from None
                continue
            if output is not None:
                return output

    async def _stream(request: Request, rid: int, queue: asyncio.Queue, head: dict, chat: bool, prompt_len: int,
                      usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        pieces, finished = TextPieces(tokenizer), False

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event, output = await queue.get()
                piece = pieces.add(event.new_token_ids, output)
                if output is not None:
                    finished = True
                    yield chunk(piece, _FINISH[output.finish_reason])
                    if usage:
                        yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': _usage(prompt_len, len(output.token_ids))})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if piece:
                    yield chunk(piece, None)
        finally:
            if not finished:            # the client went away (or the server stops): free its blocks
                request.app.state.loop.abort(rid)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request (n=1); send a string", param="prompt")
            prompt = prompt[0]
        ids = list(tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, "prompt: empty", param="prompt")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return await run(request, body, ids, params(body, len(ids), body.max_tokens, stop), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        check(body)
        ids = list(tokenizer.encode(chat_prompt(body.messages)))
        stop = ([body.stop] if isinstance(body.stop, str) else list(body.stop or []))
        sampling = params(body, len(ids), body.max_completion_tokens or body.max_tokens, stop[:3] + [CHAT_STOP])
        return await run(request, body, ids, sampling, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "graphopt"}]}

    @app.get("/health")
    async def health(request: Request):
        alive = request.app.state.loop.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        figures = await asyncio.wrap_future(request.app.state.loop.snapshot())
        return PlainTextResponse(prometheus(figures), media_type="text/plain; version=0.0.4")

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_METRICS = (  # (name, type, help, key in EngineLoop's figures)
    ("graphopt_requests_running", "gauge", "Requests in prefill or decode.", "running"),
    ("graphopt_requests_waiting", "gauge", "Requests waiting for a batch slot or cache blocks.", "waiting"),
    ("graphopt_cache_blocks_used", "gauge", "KV-cache blocks held by requests.", "blocks_used"),
    ("graphopt_cache_blocks_total", "gauge", "KV-cache blocks in all (the sink excluded).", "blocks_total"),
    ("graphopt_cache_bytes_per_token", "gauge", "KV-cache bytes one token takes over every layer.",
     "cache_bytes_per_token"),
    ("graphopt_generated_tokens_total", "counter", "Tokens generated since start.", "generated_tokens"),
    ("graphopt_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.", "tokens_per_second"),
    ("graphopt_engine_steps_total", "counter", "Engine steps since start.", "steps"),
    ("graphopt_engine_step_seconds_total", "counter", "Wall time spent in engine steps.", "step_seconds_total"),
    ("graphopt_engine_last_step_seconds", "gauge", "Wall time of the last engine step.", "last_step_seconds"),
    ("graphopt_spec_acceptance_rate", "gauge", "Accepted / proposed MTP drafts (NaN without spec).", "acceptance_rate"),
)


def prometheus(figures: dict[str, Any]) -> str:
    lines = []
    for name, kind, help_, key in _METRICS:
        value = figures.get(key)
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {'NaN' if value is None else value}"]
    lines += ["# HELP graphopt_requests_finished_total Finished requests by reason.",
              "# TYPE graphopt_requests_finished_total counter"]
    lines += [f'graphopt_requests_finished_total{{reason="{r}"}} {n}' for r, n in figures["finished"].items()]
    return "\n".join(lines) + "\n"
