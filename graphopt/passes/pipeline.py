"""The whole compiler pipeline, top to bottom, in one place.

    capture    torch.export of the main step and of each MTP module (graphopt/capture)
    normalise  make the graph small and canonical, then lift known subgraphs into graphopt:: ops
    spec       rewrite attention over the latent cache for the 1+k queries of a (speculative) step
    quant      calibrate, then replace targeted linears by quantize -> int matmul -> dequantize ops
    step       fuse main + MTP drafts + acceptance + next-step inputs into ONE step graph
    lower      hand the graph to a backend (graphopt/backends)

normalise, spec and quant run on every captured graph (main step, each MTP module); step runs once,
on the main graph, with the finished MTP graphs in ctx.state["mtp_graphs"]. Quantisation runs before
the fusion so that calibration feeds each graph its own inputs; the fused graph then carries the
quantised ops of both. The step graph is built for plain decoding too (k = 0): sampling and the next
step's inputs are computed on the device either way.

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
from .fuse_spec_step import FuseSpecStepPass
from .quant_calibrate import QuantCalibratePass
from .quant_insert import QuantInsertPass
from .remove_noop_views import RemoveNoopViewsPass
from .rewrite_mla_absorbed import RewriteMLAAbsorbedPass


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


def spec_phase() -> Phase:
    return Phase("spec", "decode attends over the latent cache instead of expanding every key", [
        RewriteMLAAbsorbedPass(),  # expanded MLA -> graphopt.mla_attention (absorbed for T <= 8)
    ])


def quant_phase() -> Phase:
    return Phase("quant", "int8/int4/fp8 weights halve or quarter the bytes a decode step reads", [
        QuantCalibratePass(),      # observers in, calibration data through, observers out
        QuantInsertPass(),         # linear -> quantize -> quantized matmul -> dequantize
    ])


def step_phase() -> Phase:
    return Phase("step", "one graph per step: no host work between main model, draft and sampling", [
        FuseSpecStepPass(),        # main + MTP chain + acceptance + next inputs, exported flat
    ])


def build_pipeline(quant: bool) -> tuple[list[Phase], list[Phase]]:
    """(phases for every captured graph, phases for the main graph once the MTP graphs are done)."""
    per_graph = [normalise_phase(), spec_phase()] + ([quant_phase()] if quant else [])
    return per_graph, [step_phase()]
