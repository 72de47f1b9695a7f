"""The step contract, neutral ground between the compiler and the runtime.

    contract.py            SpecStepInputs / SpecPrefillInputs / SpecStepOutputs, StepProvider, window
    paged.py               slot_mapping (sink slot 0), dense_block_tables, CacheLayout
    model_step.py          the reference model behind the step argument order (MainStep, MTPStep)
    spec_step.py           the speculative step template (SpecStep, SpecPrefill) and its argument order
    provider.py            SpecStepProvider, SpecStats, speculative_generate
    reference_provider.py  ReferenceStepProvider: plain decoding (k = 0) over a main step function

Imports only torch, `graphopt.models.config` and `graphopt.ops` (tests/test_layers.py checks it), so
capture, passes, backends and the runtime can all depend on it without depending on each other.
"""

from .contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs, StepProvider, window
from .paged import CacheLayout, dense_block_tables, slot_mapping

__all__ = ["CacheLayout", "SpecPrefillInputs", "SpecStepInputs", "SpecStepOutputs", "StepProvider",
           "dense_block_tables", "slot_mapping", "window"]
