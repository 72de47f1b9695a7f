"""The one thread that steps the engine, and the thread-safe doorway requests come through.

The runtime `Engine` is single-threaded: only `EngineLoop`'s thread touches it. HTTP handlers (any
thread, any event loop) call `submit`, `abort` and `snapshot`; each becomes a command the engine
thread runs between two steps, answered through a `concurrent.futures.Future`. A request's
events (new tokens, the finish with its output) are handed to the caller's `on_event` from the
engine thread; the server forwards them to the handler's asyncio queue.

    loop = EngineLoop(engine, max_waiting=64); loop.start()
    rid = loop.submit(prompt_ids, SamplingParams(...), on_event).result()   # ValueError / QueueFullError
    loop.abort(rid); loop.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from ..runtime.engine import Engine
from ..runtime.request import FinishReason, RequestEvent, RequestOutput, SamplingParams

__all__ = ["EngineLoop", "QueueFullError", "warm_up"]

log = logging.getLogger("graphopt.serve")
OnEvent = Callable[[RequestEvent, RequestOutput | None], None]


def warm_up(engine: Engine, max_rows: int, new_tokens: int = 8) -> float:
    """Run each batch size the server will decode (powers of two up to `max_rows`, and `max_rows`)
    once greedy and once sampled, so the compiles and CUDA-graph captures of every bucket happen
    before the first client waits on them. Seconds taken. Call before `EngineLoop.start`."""
    t0 = time.perf_counter()
    sizes = sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)})
    prompt = list(range(1, 9))                  # 8 valid ids: one prefill chunk, then decode steps
    for rows in sizes:
        for params in (SamplingParams(max_new_tokens=new_tokens),
                       SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)):
            for _ in range(rows):
                engine.add_request(prompt, params)
            engine.run_until_done()
            log.info("warm-up: %d rows %s, %.1f s so far", rows,
                     "greedy" if params.temperature == 0 else "sampled", time.perf_counter() - t0)
    return time.perf_counter() - t0


class QueueFullError(RuntimeError):
    """More requests are waiting for admission than the server accepts (HTTP 429)."""


class EngineLoop:
    def __init__(self, engine: Engine, max_waiting: int = 64, idle_wait_s: float = 0.05):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.engine, self.max_waiting, self.idle_wait_s = engine, max_waiting, idle_wait_s
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._listeners: dict[int, OnEvent] = {}
        self._thread = threading.Thread(target=self._run, name="graphopt-engine", daemon=True)
        # counters, written by the engine thread only
        self.steps, self.step_seconds, self.last_step_s = 0, 0.0, 0.0
        self.generated_tokens, self.finished = 0, {r.value: 0 for r in FinishReason}
        self.started = time.monotonic()
        self._recent: deque[tuple[float, int]] = deque()   # (time, tokens) over the last 10 s
        self._spec_base = _spec_counts(engine)              # acceptance counts from here on (after warm-up)

    # -- the doorway (any thread) -------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: OnEvent) -> Future:
        """A Future of the request id; it fails with the engine's ValueError (bad request) or
        QueueFullError. on_event(event, output) runs on the engine thread; output is set when finished."""
        return self._command(lambda: self._add(prompt_ids, params, on_event))

    def abort(self, request_id: int) -> Future:
        return self._command(lambda: self.engine.abort(request_id))

    def snapshot(self) -> Future:
        """A Future of the figures `/metrics` reports, read on the engine thread between steps."""
        return self._command(self._figures)

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is still running (its callers get a finished event) and end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _command(self, fn: Callable) -> Future:
        future: Future = Future()
        if self._stopping or not self._thread.is_alive():
            future.set_exception(RuntimeError("the server is shutting down"))
            return future
        self._commands.append((fn, future))
        self._wake.set()
        return future

    # -- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._run_commands()
            if self.engine.has_unfinished():
                self._step()
            else:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
        self._run_commands()
        for rid in list(self._listeners):
            self.engine.abort(rid)
        while self._commands:                          # nobody will run these any more
            self._commands.popleft()[1].set_exception(RuntimeError("the server is shutting down"))

    def _run_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 -- the caller receives it
                future.set_exception(e)

    def _add(self, prompt_ids, params, on_event) -> int:
        if self.engine.load()["waiting"] >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting for a batch slot or cache "
                                 "blocks (the server's --max-waiting); retry later")
        rid = self.engine.add_request(prompt_ids, params, callback=self._forward)
        self._listeners[rid] = on_event
        return rid

    def _forward(self, event: RequestEvent) -> None:
        listener = self._listeners.get(event.request_id)
        output = None
        if event.finished:
            output = self.engine.take_output(event.request_id)
            self._listeners.pop(event.request_id, None)
            self.finished[event.finish_reason.value] += 1
        self.generated_tokens += len(event.new_token_ids)
        now = time.monotonic()
        self._recent.append((now, len(event.new_token_ids)))
        if listener is not None:
            try:
                listener(event, output)
            except Exception:  # noqa: BLE001 -- a broken listener must not stop the engine
                log.exception("request %d: event listener failed", event.request_id)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            self.engine.step()
        except Exception:  # noqa: BLE001 -- fail the running requests, keep serving
            log.exception("engine step failed: aborting the %d running requests", len(self._listeners))
            for rid in list(self._listeners):
                try:
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001
                    self._listeners.pop(rid, None)
        self.last_step_s = time.perf_counter() - t0
        self.steps += 1
        self.step_seconds += self.last_step_s

    def _figures(self) -> dict:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        window = min(10.0, now - self.started) or 1.0
        accepted, proposed = (now - base for now, base in zip(_spec_counts(self.engine), self._spec_base))
        return {**self.engine.load(), "steps": self.steps, "step_seconds_total": self.step_seconds,
                "last_step_seconds": self.last_step_s, "generated_tokens": self.generated_tokens,
                "tokens_per_second": sum(n for _, n in self._recent) / window, "finished": dict(self.finished),
                "acceptance_rate": accepted / proposed if proposed else None}


def _spec_counts(engine: Engine) -> tuple[int, int]:
    """(accepted, proposed) MTP drafts so far; (0, 0) without speculation."""
    stats = getattr(engine.provider, "stats", None)
    if not isinstance(stats, dict):
        return 0, 0
    return stats.get("accepted", 0), stats.get("proposed", 0)
