"""The whole compiler pipeline, top to bottom, in one place.

    capture    torch.export of the main step and of each MTP module (graphopt/capture)
    normalise  make the graph small and canonical, then lift known subgraphs into graphopt:: ops
    spec       rewrite attention for multi-token queries and fuse main + MTP + acceptance into one step
    quant      calibrate, then replace targeted linears by quantize -> int matmul -> dequantize ops
    lower      hand the graph to a backend (graphopt/backends)

Each phase is a list of passes with a one-line why. Every pass can be switched off by name
(`disable_passes=` or GRAPHOPT_DISABLE_PASSES); the manager (manager.py) times, dumps and verifies.
"""

from __future__ import annotations

from .eliminate_dead_code import EliminateDeadCodePass
from .manager import Phase


def normalise_phase() -> Phase:
    return Phase("normalise", "small, canonical graphs so that patterns match one way", [
        EliminateDeadCodePass(),        # capture leaves unused views/casts behind
    ])


def build_pipeline(spec: bool, quant: bool) -> list[Phase]:
    phases = [normalise_phase()]
    return phases
