"""The serving loop: continuous batching over a step provider, with streaming and stop conditions.

One `Engine.step()`:
    1. admit waiting requests (FIFO) into free batch slots when the cache can reserve them;
    2. allocate the blocks of this step's prompt chunks (a last chunk takes the request's whole
       reservation, so decode never grows a table): new block-table entries, the one H2D write;
    3. decode: launch one provider call over the decode batch; its outputs feed the next step on the
       device and start their copy to the host;
    4. on the host, for the PREVIOUS decode step (its copy landed while this one runs): emitted
       tokens, eos / max_new_tokens / stop strings, events, release of finished requests;
    5. prefill: one call for earlier prompt chunks, one for last chunks (which emit first tokens and
       join the decode batch from the next step on).
Everything a step needs from the previous one (tokens, positions, active rows) stays on the device,
so the device runs one step ahead of the host; see `docs/runtime.md` for why that is safe and for
the per-step traffic.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ..step.contract import StepProvider, window
from ..step.reference_provider import ReferenceStepProvider
from .batch import DecodeBatch, Pending
from .kv_cache import PagedKVCache, blocks_for_budget
from .request import FinishReason, Request, RequestEvent, RequestOutput, SamplingParams, Status
from .scheduler import Chunk, Scheduler
from .stop import StopStrings

__all__ = ["DEFAULT_CACHE_BUDGET", "Engine"]

DEFAULT_CACHE_BUDGET = 1 << 30  # bytes, when neither num_blocks nor cache_budget_bytes is given
_PROVIDER_ATTRS = ("num_speculative_tokens", "block_size", "config", "new_caches", "prefill", "decode")


class Engine:
    """Serves a stream of requests with a `StepProvider`.

    Cache size: `num_blocks` if given, else `cache_budget_bytes` (see `kv_cache` for the formula),
    else enough for max_batch_size full-length requests, at most DEFAULT_CACHE_BUDGET bytes.
    `tokenizer` (anything with .decode(ids) -> str) is needed for stop strings and fills
    `RequestOutput.text`. debug=True checks the cache invariants after every step.
    A finished request's output is kept until `take_output`, `run_until_done` or `generate` collects it.
    """

    def __init__(self, provider: StepProvider, *, max_batch_size: int = 16, prefill_chunk_size: int = 256,
                 num_blocks: int | None = None, cache_budget_bytes: int | None = None, tokenizer=None,
                 debug: bool = False):
        missing = [a for a in _PROVIDER_ATTRS if not hasattr(provider, a)]
        if missing:
            raise TypeError(f"{type(provider).__name__} is not a step provider: missing {missing} "
                            f"(see graphopt.step.contract.StepProvider)")
        self.provider, self.tokenizer, self.debug = provider, tokenizer, debug
        self.window = window(provider.num_speculative_tokens)
        max_positions = provider.config.max_position_embeddings
        kv, mtp = provider.new_caches(self._num_blocks(num_blocks, cache_budget_bytes, max_batch_size,
                                                       max_positions))
        self.cache = PagedKVCache(kv, mtp, max_positions, debug)
        width = min(self.cache.blocks_for(max_positions + self.window), self.cache.allocator.num_usable)
        self._decode_shape = getattr(provider, "decode_shape", None)   # optional: see StepProvider
        rows = max_batch_size if self._decode_shape is None else max(max_batch_size, self._decode_shape(max_batch_size, width)[0])
        # rows past max_batch_size never hold a request: padding up to the provider's bucket
        self.batch = DecodeBatch(rows, provider.num_speculative_tokens, width, self.cache.device)
        self.scheduler = Scheduler(self.cache, max_batch_size, prefill_chunk_size, self.window)
        self._live: dict[int, Request] = {}
        self._outputs: dict[int, RequestOutput] = {}
        self._stops: dict[int, StopStrings] = {}
        self._next_id = 0
        self._pending: tuple[list[Request], list[int], Pending] | None = None   # the decode step in flight

    @classmethod
    def from_model(cls, model, *, block_size: int = 16, **engine_kwargs) -> "Engine":
        """An engine over the eager reference provider (plain decoding)."""
        return cls(ReferenceStepProvider.from_model(model, block_size=block_size), **engine_kwargs)

    def _num_blocks(self, num_blocks, budget, max_batch_size, max_positions) -> int:
        if num_blocks is not None and budget is not None:
            raise ValueError("give num_blocks or cache_budget_bytes, not both")
        if num_blocks is not None:
            return num_blocks
        kv, mtp = self.provider.new_caches(1)        # a one-block probe: dtype, width and layer count
        bs = self.provider.block_size
        if budget is None:
            per_block = sum(t.numel() * t.element_size() for t in (*kv, *mtp))
            full = max_batch_size * -(-(max_positions + self.window) // bs) + 1
            return min(full, max(2, DEFAULT_CACHE_BUDGET // per_block))
        return blocks_for_budget(budget, bs, kv[0].shape[-1], kv[0].dtype, len(kv), len(mtp))

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    callback: Callable[[RequestEvent], None] | None = None) -> int:
        """Queue a request; returns its id. Raises RequestTooLongError if it could never fit."""
        params = params or SamplingParams()
        prompt = self._check_prompt(prompt_ids)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop} need a tokenizer: build the Engine with tokenizer=...")
        max_top_k = getattr(self.provider, "max_top_k", None)
        if max_top_k is not None and params.top_k > max_top_k:
            raise ValueError(f"SamplingParams.top_k = {params.top_k} exceeds the step provider's max_top_k "
                             f"({max_top_k}); use top_k <= {max_top_k} or 0 (off)")
        needed = self.cache.check_fits(len(prompt), params.max_new_tokens, self.window)
        rid = self._next_id
        self._next_id += 1
        r = Request(rid, prompt, params, params.seed if params.seed is not None else rid, needed, callback)
        if params.stop:
            self._stops[rid] = StopStrings(self.tokenizer, params.stop)
        self._live[rid] = r
        self.scheduler.add(r)
        return rid

    def abort(self, request_id: int) -> None:
        r = self._live.get(request_id)
        if r is not None:
            self._finish(r, FinishReason.ABORTED, [])

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def load(self) -> dict[str, int]:
        """What the engine holds now: requests waiting for admission, running (prefill or decode),
        cache blocks in use and in all (the sink excluded), and the cache bytes a token takes (every
        layer). Read between steps."""
        waiting = len(self.scheduler.waiting)
        allocator = self.cache.allocator
        return {"waiting": waiting, "running": len(self._live) - waiting,
                "blocks_used": allocator.num_usable - allocator.num_free, "blocks_total": allocator.num_usable,
                "cache_bytes_per_token": self.cache.bytes_per_token}

    def take_output(self, request_id: int) -> RequestOutput:
        """The result of a finished request (removed from the engine once taken)."""
        if request_id not in self._outputs:
            state = "still running" if request_id in self._live else "unknown or already taken"
            raise KeyError(f"request {request_id} has no output: {state}")
        return self._outputs.pop(request_id)

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestEvent]:
        """One step of the loop (module docstring). The decode call is launched before the host reads
        the previous decode step's outputs, so the device runs step N+1 while the host streams step N:
        a step's tokens are reported by the next `step()` call (the last ones by the call that finds
        nothing more to launch)."""
        events: list[RequestEvent] = []
        sched, batch = self.scheduler, self.batch
        batch.admit(sched.admit())
        last, partial = sched.prefill_chunks()
        batch.set_blocks(sched.grow(last + partial))
        pending, self._pending = self._pending, None
        decoding = sched.decoding()
        if pending is not None and self._all_done_after(decoding, pending[0]):
            decoding = []              # every row ends with the step in flight: nothing more to launch
        if decoding:
            self._pending = self._launch(decoding)
        if pending is not None:
            requests, slots, copy = pending
            self._collect(requests, slots, copy.wait(), events)
        for group in (partial, last):
            if group:
                self._prefill(group, events)
        if self.debug:
            self.cache.check_invariants()
        return events

    def _launch(self, decoding: list[Request]) -> tuple[list[Request], list[int], Pending]:
        """One decode call over slots [0, n), its outputs absorbed as the next inputs on the device and
        on their way to the host."""
        rows, width = self.scheduler.batch_rows(), self.scheduler.table_width(decoding)
        if self._decode_shape is not None:   # e.g. a CUDA-graph bucket: the same tensors every step
            rows, width = self._decode_shape(rows, width)
            rows, width = min(rows, self.batch.max_rows), min(width, self.batch.width)
        inputs = self.batch.decode_inputs(rows, width, self.cache.kv_caches, self.cache.mtp_caches,
                                          greedy=all(r.params.temperature == 0 for r in decoding))
        out = self.provider.decode(inputs)
        self.batch.absorb(rows, out)
        copy = self.batch.copy_out.start(out_tokens=out.out_tokens, num_emitted=out.num_emitted,
                                         finished=out.finished)
        return decoding, [r.slot for r in decoding], copy

    @staticmethod
    def _all_done_after(decoding: list[Request], launched: list[Request]) -> bool:
        """Whether every decoding request has certainly finished once the step in flight lands (a step
        emits >= 1 token for every active row, so a row one token short of max_new_tokens ends with it)."""
        in_flight = {id(r) for r in launched}
        return all(id(r) in in_flight and len(r.generated) + 1 >= r.params.max_new_tokens for r in decoding)

    def _prefill(self, chunks: list[Chunk], events: list[RequestEvent]) -> None:
        requests = [c.request for c in chunks]
        is_last = chunks[0].is_last
        out = self.provider.prefill(self.batch.prefill_inputs(
            [r.slot for r in requests], [r.prompt[c.start:c.start + c.length] for r, c in zip(requests, chunks)],
            [c.start for c in chunks], self.scheduler.table_width(requests), is_last,
            self.cache.kv_caches, self.cache.mtp_caches))
        for c in chunks:
            c.request.prefilled += c.length
        if is_last:
            self.batch.join([r.slot for r in requests], out)
            for r in requests:
                r.status, r.pos = Status.DECODE, len(r.prompt) - 1   # _collect adds the first token
            host = self.batch.copy_prefill(out_tokens=out.out_tokens, num_emitted=out.num_emitted,
                                           finished=out.finished)
            self._collect(requests, list(range(len(requests))), host, events)

    def _collect(self, requests: list[Request], rows: list[int], host: dict[str, list],
                 events: list[RequestEvent]) -> None:
        """Apply a step's emitted tokens (already on the host) and the stop conditions. Requests the
        host finished since the step was launched (stop string, abort) are skipped."""
        stopped = []
        for r, row in zip(requests, rows):
            if r.status is not Status.DECODE:
                continue
            n = host["num_emitted"][row]
            tokens = host["out_tokens"][row][:n]
            r.pos += n
            r.generated += tokens
            reason = None
            if host["finished"][row]:
                eos = r.params.eos_token_id
                reason = FinishReason.EOS if eos is not None and tokens and tokens[-1] == eos else FinishReason.LENGTH
            event = self._release(r, reason)
            if event.finished and event.finish_reason is FinishReason.STOP:
                stopped.append(r.slot)
            if event.finished:
                self._finish(r, event.finish_reason, event.new_token_ids, emit=False)
            if event.new_token_ids or event.finished:
                events.append(event)
                if r.callback is not None:
                    r.callback(event)
        self.batch.deactivate(stopped)   # the device cannot see stop strings

    def _release(self, r: Request, reason: FinishReason | None) -> RequestEvent:
        """Stream what is safe to show; a stop string ends the request here."""
        upto = len(r.generated)
        stops = self._stops.get(r.request_id)
        if stops is not None:
            upto, cut = stops.check(r.generated, r.released, final=reason is not None)
            if cut is not None:
                r.text, reason = cut, FinishReason.STOP
        new = r.generated[r.released:upto]
        r.released = upto
        return RequestEvent(r.request_id, new, reason is not None, reason)

    def _finish(self, r: Request, reason: FinishReason, new: list[int], emit: bool = True) -> None:
        if r.status is Status.DECODE and reason is FinishReason.ABORTED:
            self.batch.deactivate([r.slot])
        self.scheduler.finish(r)
        r.finish_reason = reason
        del r.generated[r.released:]
        if r.text is None and self.tokenizer is not None:
            r.text = self.tokenizer.decode(r.generated)
        self._live.pop(r.request_id)
        self._stops.pop(r.request_id, None)
        self._outputs[r.request_id] = r.output()
        if emit:
            event = RequestEvent(r.request_id, new, True, reason)
            if r.callback is not None:
                r.callback(event)

    # -- conveniences -------------------------------------------------------------------------
    def run_until_done(self) -> list[RequestOutput]:
        """Step until every request has finished; their outputs in request-id order."""
        while self.has_unfinished():
            self.step()
        return [self._outputs.pop(i) for i in sorted(self._outputs)]

    def stream(self, prompts: Iterable[Sequence[int]] = (), params: SamplingParams | Sequence | None = None
               ) -> Iterator[tuple[int, list[int]]]:
        """Add `prompts` (if any) and yield (request_id, new_token_ids) until every request finished."""
        prompts = list(prompts)
        for prompt, p in zip(prompts, self._per_prompt(params, len(prompts))):
            self.add_request(prompt, p)
        while self.has_unfinished():
            for e in self.step():
                if e.new_token_ids:
                    yield e.request_id, e.new_token_ids

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence | None = None
                 ) -> list[list[int]]:
        """Generated token ids for each prompt (prompt excluded), in prompt order."""
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, self._per_prompt(params, len(prompts)))]
        while any(i in self._live for i in ids):
            self.step()
        return [self.take_output(i).token_ids for i in ids]

    @staticmethod
    def _per_prompt(params, n: int) -> list[SamplingParams | None]:
        if params is None or isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
        return params

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        vocab = self.provider.config.vocab_size
        if isinstance(prompt_ids, str) or not list(prompt_ids):
            raise ValueError(f"prompt_ids must be a non-empty sequence of token ids, got {prompt_ids!r:.60}")
        bad = [t for t in prompt_ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_ids hold {bad[:5]}; token ids must be integers in [0, {vocab})")
        return [int(t) for t in prompt_ids]
