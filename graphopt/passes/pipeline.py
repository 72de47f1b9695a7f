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
from .fold_constants import FoldConstantsPass
from .fuse_moe_experts import FuseMoeExpertsPass
from .fuse_moe_routing import FuseMoeRoutingPass
from .fuse_rms_norm import FuseRmsNormPass
from .fuse_swiglu import FuseSwigluPass
from .manager import Phase
from .remove_noop_views import RemoveNoopViewsPass


def normalise_phase() -> Phase:
    return Phase("normalise", "small, canonical graphs so that patterns match one way", [
        RemoveNoopViewsPass(),     # same-shape views, same-type casts/copies: patterns see one form
        FoldConstantsPass(),       # weight-only work (bf16 router weight.float()) done once at compile time
        FuseRmsNormPass(),         # pow/mean/rsqrt/mul (+ casts) -> graphopt.rms_norm
        FuseSwigluPass(),          # silu(gate) * up -> graphopt.swiglu
        FuseMoeRoutingPass(),      # scores, group top-k, gather, normalise -> graphopt.moe_route
        FuseMoeExpertsPass(),      # dense all-experts dispatch -> sparse graphopt.moe_experts
        EliminateDeadCodePass(),   # always last in the phase: drops what the rewrites left unused
    ])


def build_pipeline(spec: bool, quant: bool) -> list[Phase]:
    phases = [normalise_phase()]
    return phases
