"""The whole compiler pipeline, top to bottom, in one place: `run_pipeline(program, options) -> Program`.

    capture    torch.export of the main step and of each MTP module (graphopt/capture), done by the
               caller: the pipeline starts from the captured Program (main, mtp0 ..)
    normalise  make each graph small and canonical, then lift known subgraphs into graphopt:: ops
    spec       rewrite attention over the latent cache for the 1+k queries of a (speculative) step
    prefill    (module pass, only with QuantConfig.prefill_scheme) copy main as main_prefill, for the
               prefill graph's own weights
    quant      calibrate, then replace targeted linears by quantize -> int matmul -> dequantize ops
    shard      (module passes, only with tp= / ep= or shard_one_rank) slice this rank's weights, insert the
               collectives
    step       (module pass) fuse main + MTP drafts + acceptance + next-step inputs into ONE step graph
               (plus its greedy-only twin) and one prefill graph, added to the Program next to main
    head       the prefill's LM heads (main and MTP) project only the position each row keeps
    decode     (only with moe_prune_threshold) drop low-weight routed experts in the decode steps
    memory     write the KV cache in place in every graph (after the fusion, which reads the
               captured graphs' functional cache writes)
    storage    (module pass, only with QuantConfig kv_cache="int8") the caches become int8 tensors:
               the C8 latent's codes and the rope bytes (on the in-place writes, so it comes last)
    lower      `backends.get(name).lower(program, options)`, done by the caller (graphopt/api.py)

normalise, spec and quant run on every captured graph (main step, each MTP module); step runs once
over the whole Program. Quantisation runs before the fusion so that calibration feeds each graph its
own inputs; the fused graph then carries the quantised ops of both. Sharding comes after quantisation
(every rank calibrates and quantises the whole model, so the scales are the unsharded model's) and
before the fusion (which splices the sharded main and MTP graphs, collectives included, into the step). The step graph is built for plain
decoding too (k = 0): sampling and the next step's inputs are computed on the device either way.

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
from .base import PassContext
from .dump import Dumper
from .manager import PassManager, Phase, disabled_from_env
from .program import CompileOptions, CompileState, Program
from .fuse_spec_step import FuseSpecStepPass
from .head_at_gathered_positions import HeadAtGatheredPositionsPass
from .quant_calibrate import QuantCalibratePass
from .quant_insert import QuantInsertPass
from .reinplace_cache_writes import ReinplaceCacheWritesPass
from .share_activation_quant import ShareActivationQuantPass
from .shard_experts import ShardExpertsPass
from .shard_tensor_parallel import ShardTensorParallelPass
from .split_prefill_weights import SplitPrefillWeightsPass
from .store_int8_kv_cache import StoreInt8KVCachePass
from .prune_routed_experts import PruneRoutedExpertsPass
from .sharding import ParallelPlan
from .remove_noop_views import RemoveNoopViewsPass
from .rewrite_mla_absorbed import RewriteMLAAbsorbedPass
from .use_paged_attention import UsePagedAttentionPass


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
        UsePagedAttentionPass(),   # gather + position mask + mla_attention -> graphopt.mla_paged_attention
    ])


def prefill_phase() -> Phase:
    return Phase("prefill", "prefill is compute-bound, decode bandwidth-bound: each gets its own weights", [
        SplitPrefillWeightsPass(),  # main -> main + main_prefill (quantised with prefill_scheme)
    ])


def quant_phase() -> Phase:
    return Phase("quant", "int8/int4/fp8 weights halve or quarter the bytes a decode step reads", [
        QuantCalibratePass(),      # observers in, calibration data through, observers out
        QuantInsertPass(),         # linear -> quantize -> quantized matmul -> dequantize
        ShareActivationQuantPass(),  # the linears of one input quantise it once (q_a + kv_a, gate + up)
    ])


def shard_phase(plan: ParallelPlan) -> Phase:
    return Phase("shard", "a model larger than one device: each rank holds and runs its part", [
        ShardTensorParallelPass(plan),  # heads, dense / shared MLPs, vocab over tp ranks; all_reduce / all_gather
        ShardExpertsPass(plan),         # routed experts over ep ranks; local dispatch, one all_reduce per layer
    ])


def step_phase() -> Phase:
    return Phase("step", "one graph per step: no host work between main model, draft and sampling", [
        FuseSpecStepPass(),        # main + MTP chain + acceptance + next inputs, exported flat
    ])


def head_phase() -> Phase:
    return Phase("head", "a prefill chunk keeps one position per row: project only that one", [
        HeadAtGatheredPositionsPass(),  # gather(linear(norm(h))) -> linear(norm(gather(h)))
    ])


def decode_phase() -> Phase:
    return Phase("decode", "a decode step reads every expert it routes to: skip the ones that add little", [
        PruneRoutedExpertsPass(),  # moe_route(..., prune_threshold) in step / step_greedy
    ])


def memory_phase() -> Phase:
    return Phase("memory", "a step touches the cache slots it writes, not the whole cache", [
        ReinplaceCacheWritesPass(),  # index_copy over the cache + copy_ back -> graphopt.kv_cache_write
    ])


def storage_phase() -> Phase:
    return Phase("storage", "C8: the caches hold int8 codes, about half the bytes a token of a 16-bit cache", [
        StoreInt8KVCachePass(),    # always last: every graph's cache writes in place, one layout for all
    ])


def build_pipeline(quant: bool, parallel: ParallelPlan | None = None, split_prefill: bool = False,
                   prune: bool = False, int8_cache: bool = False) -> list[Phase]:
    """The phases in order; quant only when a QuantConfig was given, shard only with a parallel plan,
    prefill only with separate prefill weights, decode only with expert pruning, storage only with
    an int8 (C8) cache."""
    return ([normalise_phase(), spec_phase()] + ([prefill_phase()] if split_prefill else [])
            + ([quant_phase()] if quant else [])
            + ([shard_phase(parallel)] if parallel is not None else []) + [step_phase(), head_phase()]
            + ([decode_phase()] if prune else []) + [memory_phase()]
            + ([storage_phase()] if int8_cache else []))


def check_options(options: CompileOptions, state: CompileState,
                  parallel: ParallelPlan | None = None) -> tuple[list[Phase], set[str]]:
    """(phases, disabled pass names); a ValueError for an unknown pass name or a disabled fusion that
    spec= needs. graphopt.compile calls it before capture, so these errors come before any work."""
    split = state.quant is not None and state.quant.separate_prefill
    int8_cache = state.quant is not None and state.quant.kv_cache == "int8"
    phases = build_pipeline(quant=state.quant is not None, parallel=parallel, split_prefill=split, int8_cache=int8_cache,
                            prune=options.moe_prune_threshold > 0)
    disabled = set(options.disable_passes) | disabled_from_env()
    known = {p.name for ph in phases for p in ph.passes}
    unknown = disabled - known
    if unknown:
        raise ValueError(f"cannot disable unknown pass(es) {sorted(unknown)}; passes: {sorted(known)}")
    if state.spec is not None and FuseSpecStepPass.name in disabled:
        raise ValueError(f"spec= needs the {FuseSpecStepPass.name} pass; it was disabled")
    wants = (("QuantConfig.prefill_scheme", split, (SplitPrefillWeightsPass.name, FuseSpecStepPass.name)),
             ("moe_prune_threshold", options.moe_prune_threshold > 0,
              (FuseMoeRoutingPass.name, FuseSpecStepPass.name, PruneRoutedExpertsPass.name)))
    for what, wanted, needs in wants:
        off = sorted(set(needs) & disabled)
        if wanted and off:
            raise ValueError(f"{what} needs the {off} pass(es); they were disabled")
    if split and parallel is not None:
        raise ValueError("QuantConfig.prefill_scheme is not supported with tp= / ep= / shard_one_rank (the sharding "
                         "passes split main only); compile without prefill_scheme or without sharding")
    needed = {ShardTensorParallelPass.name, ShardExpertsPass.name, FuseMoeExpertsPass.name} & disabled
    if parallel is not None and needed:
        raise ValueError(f"tp= / ep= / shard_one_rank need the {sorted(needed)} pass(es); they were disabled")
    return phases, disabled


def run_pipeline(program: Program, options: CompileOptions, dumper: Dumper | None = None,
                 verify: bool = False, parallel: ParallelPlan | None = None) -> Program:
    """Every phase over the captured Program; the records and notes land in program.state."""
    phases, disabled = check_options(options, program.state, parallel)
    manager = PassManager(phases, disabled, verify, dumper)
    if dumper:
        for name, gm in program.graphs.items():
            dumper.write_captured(name, gm)
    return manager.run_program(program, PassContext(program.model_config, options, state=program.state))
