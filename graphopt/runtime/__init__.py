"""graphopt runtime: paged latent KV cache, continuous batching, streaming, device-side step preparation.

    engine = Engine(provider, max_batch_size=16, cache_budget_bytes=2 << 30, tokenizer=tok)
    for request_id, new_ids in engine.stream(prompts, SamplingParams(max_new_tokens=64)):
        ...

`provider` implements the step contract in `step_api` (`ReferenceStepProvider` for eager plain
decoding; the speculative one comes from `graphopt.capture.spec_step`). See docs/runtime.md.
"""

from .engine import Engine
from .kv_cache import PagedKVCache, RequestTooLongError, blocks_for_budget
from .reference_provider import ReferenceStepProvider
from .request import FinishReason, RequestEvent, RequestOutput, SamplingParams
from .step_api import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs, StepProvider

__all__ = [
    "Engine",
    "FinishReason",
    "PagedKVCache",
    "ReferenceStepProvider",
    "RequestEvent",
    "RequestOutput",
    "RequestTooLongError",
    "SamplingParams",
    "SpecPrefillInputs",
    "SpecStepInputs",
    "SpecStepOutputs",
    "StepProvider",
    "blocks_for_budget",
]
