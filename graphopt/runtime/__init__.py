"""graphopt runtime: paged latent KV cache, continuous batching, streaming, device-side step preparation.

    engine = Engine(provider, max_batch_size=16, cache_budget_bytes=2 << 30, tokenizer=tok)
    for request_id, new_ids in engine.stream(prompts, SamplingParams(max_new_tokens=64)):
        ...

`provider` is anything implementing the step contract of `graphopt.step.contract` (a backend's
Executable, `graphopt.step.reference_provider.ReferenceStepProvider` for eager plain decoding,
`graphopt.step.provider.SpecStepProvider` for speculative steps); the runtime never asks which.
See docs/runtime.md.
"""

from ..step.contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs, StepProvider
from ..step.reference_provider import ReferenceStepProvider
from .engine import Engine
from .kv_cache import PagedKVCache, RequestTooLongError, blocks_for_budget
from .request import FinishReason, RequestEvent, RequestOutput, SamplingParams

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
