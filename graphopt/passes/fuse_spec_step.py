"""Fuse the main step, the MTP step(s) and the acceptance into ONE step graph (and one prefill graph).

A module pass. Input: the Program with the captured (and already normalised / rewritten) main-step
graph and MTP-step graphs (mtp0 .., depth order). Output: the same Program plus `step`, the graph of
`step.spec_step.SpecStep` with those graphs as its main_fn / mtp_fns (as `FunctionalStep`s, which
return their cache writes), obtained by torch.export-ing the template with one stand-in node per
captured-graph call and splicing the captured nodes in place of each (`capture/splice.py`: the
captured graphs are decomposed ATen already and are not traced again): the main model's layers, the
acceptance op, the token shift and the MTP layer(s) all sit in one graph, so the host never looks
at a value between the main model and the draft, and `prefill` (`SpecPrefill`), built the same way.

Handles: k = program.state.spec (a SpecConfig; None -> k = 0, plain decoding with device-side
sampling), any number of MTP layers (drafts beyond the last layer chain it again), dynamic batch,
block-table width and cache size; block_size is the Program's cache layout's.
The graph signature changes (SpecStepInputs fields in, SpecStepOutputs fields out), so this pass
declares `changes_signature` (verify mode checks its invariants but cannot compare it with its input
graph; the tests compare it with the eager SpecStep) and registers the fused graphs' input factories.

Before (the main step graph's signature and its last nodes):
    def forward(self, input_ids, positions, slot_mapping, block_tables, kv_caches):
        ...
        linear_26: "f32[s5, s18, 97]" = torch.ops.aten.linear.default(mul_1234, model_mtp_0_shared_head_head_weight)
        return pytree.tree_unflatten((linear_26, add_1540), self._out_spec)
After (k = 1, from `capture_main / capture_mtp(random_model())` + rewrite_mla_absorbed; the lines
that join the main model, the acceptance and the MTP layer):
    def forward(self, tokens, start_pos, block_tables, temperature, top_k, top_p, min_p, seed, eos_token_id, max_pos, active, kv_caches, mtp_caches):
        mla_attention_2: "f32[s4, 2, 4, 16]" = torch.ops.graphopt.mla_attention.default(getitem_20, cat_6, getitem_24, getitem_25, main_fn_graph_module_model_model_layers_2_self_attn_kv_b_proj_weight, slice_17, slice_18, le_7, 0.2041241452319315)
        sampling_probs: "f32[2*s4, 97]" = torch.ops.graphopt.sampling_probs.default(reshape, reshape_1, reshape_2, reshape_3, reshape_4)
        rejection_accept = torch.ops.graphopt.rejection_accept.default(view_27, slice_19, None, seed, start_pos)
        roll: "i64[s4, 2]" = torch.ops.aten.roll.default(tokens, [-1], [1])
        scatter_4: "i64[s4, 2]" = torch.ops.aten.scatter.src(roll, 1, unsqueeze_47, unsqueeze_48)
        embedding_1: "f32[s4, 2, 64]" = torch.ops.aten.embedding.default(main_fn_graph_module_model_mtp_0_embed_tokens_weight, scatter_4)
        ...
        copy_: "f32[s27, 16, 40]" = torch.ops.aten.copy_.default(kv_caches_0, view_4)
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import fx
from torch.export import Dim

from ..step.spec_step import DECODE_INPUTS, PREFILL_INPUTS, STEP_OUTPUTS, SpecPrefill, SpecStep
from ..capture.splice import GraphCall, splice
from ..capture.step import CaptureError
from ..ops import sampling as _sampling  # noqa: F401  registers the sampling / acceptance ops
from ..ops.sampling import DEFAULT_MAX_TOP_K
from ..spec import SpecConfig
from .base import ModulePass, ModuleResult, PassContext
from .program import GraphSignature, Program
from .split_prefill_weights import PREFILL_MAIN

__all__ = ["FuseSpecStepPass", "FunctionalStep", "build_greedy_step", "build_spec_step", "cache_layout", "example_inputs", "fuse"]


def cache_layout(gm: fx.GraphModule) -> tuple[int, int, int, torch.dtype, torch.device]:
    """(number of cache inputs, block_size, kv_cache_dim, dtype, device) from a step graph's
    placeholders: caches are its 3-d floating-point inputs [num_blocks, block_size, kv_cache_dim]."""
    caches = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta["val"].dim() == 3 and n.meta["val"].dtype.is_floating_point]
    if not caches:
        raise ValueError("step graph has no cache input [num_blocks, block_size, kv_cache_dim]; "
                         "expected a graph from graphopt.capture.step.capture_main / capture_mtp")
    c = caches[-1]
    if not isinstance(c.shape[1], int):
        raise ValueError(f"cache input has a symbolic block size {c.shape[1]}; capture with a fixed block_size")
    return len(caches), c.shape[1], int(c.shape[2]), c.dtype, c.device


def example_inputs(layout: tuple, n_mtp: int, k: int, vocab: int, prefill: bool, seed: int = 0) -> tuple:
    """Valid random arguments of the fused step (or prefill) graph, fresh caches each call.

    layout = cache_layout(main graph). 2 rows (the batch stays symbolic when traced), 3 blocks each,
    ragged start positions, a shuffled block table, random cache contents, one greedy row and one
    sampling row: what export traces with and what verify mode / calibration run (ctx.make_inputs).
    """
    n_main, bs, dim, dtype, device = layout
    B, M = 2, 3
    g = torch.Generator().manual_seed(seed)
    tables = (1 + torch.randperm(B * M, generator=g)).view(B, M)                   # never block 0
    rows = [torch.tensor([0.0, 0.8]), torch.tensor([0, 5]), torch.tensor([1.0, 0.9]), torch.zeros(B),
            torch.randint(0, 1 << 40, (B,), generator=g), torch.full((B,), -1), torch.full((B,), M * bs - 1)]
    caches = lambda n: [(torch.randn(1 + B * M, bs, dim, generator=g) * 0.5).to(dtype) for _ in range(n)]
    if prefill:
        lengths = torch.randint(1, 4, (B,), generator=g)
        head = [torch.randint(0, vocab, (B, 3), generator=g), lengths,
                torch.randint(0, bs, (B,), generator=g), tables]
        tail = [torch.tensor(True)]
    else:
        start = torch.randint(0, max(1, M * bs - max(1, 2 * k)), (B,), generator=g)
        head = [torch.randint(0, vocab, (B, 1 + k), generator=g), start, tables]
        tail = [torch.ones(B, dtype=torch.bool)]
    move = lambda ts: [t.to(device) for t in ts]
    return tuple(move(head + rows + tail)) + (move(caches(n_main)), move(caches(n_mtp)))


def _dynamic(n_main: int, n_mtp: int, prefill: bool):
    B, M, N = Dim("batch", min=1, max=4096), Dim("blocks_per_seq", max=65536), Dim("num_blocks", max=1 << 24)
    rows = [{0: B}] * 7
    head = [{0: B, 1: Dim("tokens", min=1, max=65536)}, {0: B}, {0: B}, {0: B, 1: M}] if prefill \
        else [{0: B}, {0: B}, {0: B, 1: M}]
    tail = [None] if prefill else [{0: B}]
    return tuple(head + rows + tail) + ([{0: N}] * n_main, [{0: N}] * n_mtp)


class FunctionalStep(torch.nn.Module):
    """A captured step graph that returns the caches it wrote instead of copying them into its inputs.

    Same arguments as the captured graph (main: a list of caches; MTP: one cache); returns
    (logits, hidden, written caches). SpecStep threads the written caches from call to call (the
    chained drafts read what the MTP window just wrote) and copies them into its inputs once at the
    end, so the fused graph is functional as traced and needs no second, functionalising trace
    (`run_decompositions`), which would double the fusion time. The captured graphs are already
    decomposed ATen, so the fused graph is at their level.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        graph = copy.deepcopy(gm.graph)
        writes = {n.args[0].name: n.args[1] for n in graph.nodes
                  if n.op == "call_function" and n.target is torch.ops.aten.copy_.default and n.args[0].op == "placeholder"}
        caches = [n for n in graph.nodes if n.op == "placeholder" and n.name in writes]
        for node in [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default and n.args[0] in caches]:
            graph.erase_node(node)
        out = next(n for n in graph.nodes if n.op == "output")
        values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        out.args = (tuple(values[:2]) + tuple(writes[c.name] for c in caches),)
        graph._codegen = fx.graph.CodeGen()            # flat arguments, a flat tuple out
        self.graph_module = fx.GraphModule(gm, graph)  # shares gm's weights and guard module
        self.num_caches = len(caches)
        self.stand_in: GraphCall | None = None         # while fuse() exports the template

    def forward(self, *args):
        caches = args[-1]
        many = isinstance(caches, (list, tuple))
        fn = self.graph_module if self.stand_in is None else self.stand_in
        out = fn(*args[:-1], *(caches if many else [caches]))
        written = list(out[2:])
        return out[0], out[1], written if many else written[0]


def _export(module: torch.nn.Module, args: tuple, dynamic, what: str) -> fx.GraphModule:
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False).module()
    except Exception as e:
        first = "\n".join(str(e).strip().splitlines()[:12])
        raise CaptureError(f"torch.export failed while fusing {what}: {type(e).__name__}: {first}") from e


def _functional(fn) -> FunctionalStep:
    if isinstance(fn, FunctionalStep):
        return fn
    if not isinstance(fn, fx.GraphModule):
        raise TypeError(f"fuse needs captured graphs (fx.GraphModule) as main_fn / mtp_fns, got {type(fn).__name__}")
    return FunctionalStep(fn)


def fuse(module: SpecStep | SpecPrefill, model_config) -> fx.GraphModule:
    """One SpecStep / SpecPrefill built over captured graphs as one flat graph: the template exported
    with a stand-in node per captured-graph call, each then replaced by that graph's nodes.

    The module's captured graphs are wrapped in FunctionalStep (in place) first."""
    module.main_fn = _functional(module.main_fn)
    module.mtp_fns = torch.nn.ModuleList(_functional(f) for f in module.mtp_fns)
    n_main, bs, dim, dtype, device = cache_layout(module.main_fn.graph_module)
    if bs != module.block_size:
        raise ValueError(f"block_size = {module.block_size} but the main graph was captured with block_size {bs}; "
                         "capture and fuse with the same block size")
    if n_main != model_config.num_hidden_layers:
        raise ValueError(f"main graph has {n_main} cache inputs, the config {model_config.num_hidden_layers} layers")
    for i, f in enumerate(module.mtp_fns):
        if cache_layout(f.graph_module)[1:3] != (bs, dim):
            raise ValueError(f"MTP graph {i}: cache layout {cache_layout(f.graph_module)[1:3]} differs from the main "
                             f"graph's (block_size, kv_cache_dim) = {(bs, dim)}")
    prefill, n_mtp = isinstance(module, SpecPrefill), len(module.mtp_fns)
    args = example_inputs((n_main, bs, dim, dtype, device), n_mtp, module.k, model_config.vocab_size, prefill)
    what = f"the speculative {'prefill' if prefill else 'step'} (k = {module.k}, {n_mtp} MTP graph(s))"
    # export the template over one-node stand-ins, then splice the captured graphs in: tracing
    # them again inside the template would redo capture's symbolic-shape work (capture/splice.py)
    steps = {"main_fn": module.main_fn, **{f"mtp_fns.{i}": f for i, f in enumerate(module.mtp_fns)}}
    graphs = {name: f.graph_module for name, f in steps.items()}
    try:
        for f in steps.values():
            f.stand_in = GraphCall(f.graph_module, id(f))
            del f.graph_module   # the template holds no weights; splice registers those the graphs read
        gm = _export(module, args, _dynamic(n_main, n_mtp, prefill), what)
    finally:
        for name, f in steps.items():
            if f.stand_in is not None:
                f.stand_in.release()
            f.stand_in, f.graph_module = None, graphs[name]
    splice(gm, {id(f): (f"{name}.graph_module", graphs[name]) for name, f in steps.items()})
    return gm


def build_spec_step(captured_main_gm: fx.GraphModule, captured_mtp_gms: list[fx.GraphModule], model_config,
                    spec_config: SpecConfig | None, block_size: int, sampling: bool = True,
                    max_top_k: int = DEFAULT_MAX_TOP_K, prefill_main_gm: fx.GraphModule | None = None
                    ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(step graph, prefill graph): SpecStep / SpecPrefill over the captured graphs, exported flat.
    prefill_main_gm: the main graph the prefill runs, when it has its own weights (default: the same).

    Call them with `step.spec_step.decode_args(SpecStepInputs)` / `prefill_args(SpecPrefillInputs)`;
    they return the SpecStepOutputs fields in order (`step.spec_step.as_outputs`), or wrap both in
    `step.provider.SpecStepProvider`. sampling=False builds the greedy-only variant (every row must
    have temperature 0); spec_config None is k = 0 (plain decoding, sampling on the device).
    """
    if spec_config is not None and not isinstance(spec_config, SpecConfig):
        raise TypeError(f"spec_config must be a graphopt.SpecConfig or None, got {type(spec_config).__name__}")
    k = 0 if spec_config is None else spec_config.num_speculative_tokens
    mtp = list(captured_mtp_gms or []) if k > 0 else []
    if k > 0 and not mtp:
        raise ValueError(f"num_speculative_tokens = {k} needs the captured MTP graph(s) (the Program's mtp graphs / "
                         "captured_mtp_gms is empty); the checkpoint must have MTP weights")
    kw = dict(sampling=sampling, max_top_k=max_top_k)
    main, mtp = FunctionalStep(captured_main_gm), [FunctionalStep(g) for g in mtp]
    prefill_main = main if prefill_main_gm is None else FunctionalStep(prefill_main_gm)
    return (fuse(SpecStep(main, mtp, k, block_size, **kw), model_config),
            fuse(SpecPrefill(prefill_main, mtp, k, block_size, **kw), model_config))


def build_greedy_step(captured_main_gm: fx.GraphModule, captured_mtp_gms: list[fx.GraphModule], model_config,
                      k: int, block_size: int) -> fx.GraphModule:
    """The greedy-only decode step (argmax acceptance, no sampling filters): what a batch whose rows
    all have temperature 0 runs. Same signature and outputs as the sampling step."""
    main, mtp = FunctionalStep(captured_main_gm), [FunctionalStep(g) for g in (captured_mtp_gms if k else [])]
    return fuse(SpecStep(main, mtp, k, block_size, sampling=False), model_config)


class FuseSpecStepPass(ModulePass):
    """Program(main, mtp0 ..) -> the same Program plus the fused `step`, `step_greedy` and `prefill`
    graphs (`step_greedy`: the decode step without sampling, for batches whose rows are all greedy;
    greedy=False leaves it out).

    main and the MTP graphs stay as they were (the fused graphs copy their nodes, not their weights):
    the plain forward still runs main, and a backend may lower either."""

    name = "fuse_spec_step"
    changes_signature = True

    def __init__(self, sampling: bool = True, max_top_k: int = DEFAULT_MAX_TOP_K, greedy: bool = True):
        self.sampling, self.max_top_k, self.greedy = sampling, max_top_k, greedy

    def run(self, program: Program, ctx: PassContext) -> ModuleResult:
        spec, main = program.state.spec, program.main
        k = program.state.num_speculative_tokens
        mtp = program.mtp_graphs if k else []
        prefill_main = program.graphs.get(PREFILL_MAIN)   # its own weights (split_prefill_weights), or main's
        step, prefill = build_spec_step(main, mtp, ctx.model_config, spec, program.cache.block_size,
                                        self.sampling, self.max_top_k, prefill_main)
        # later passes (verify mode, quantisation of the fused graph) run them on these inputs
        inputs = functools.partial(example_inputs, cache_layout(main), len(mtp), k, ctx.model_config.vocab_size)
        program.set("step", step, GraphSignature(DECODE_INPUTS, STEP_OUTPUTS), functools.partial(inputs, False))
        program.set("prefill", prefill, GraphSignature(PREFILL_INPUTS, STEP_OUTPUTS), functools.partial(inputs, True))
        notes = [f"fused main + {len(mtp)} MTP graph(s) + acceptance, k = {k}"]
        if prefill_main is not None:
            program.remove(PREFILL_MAIN)                   # its nodes live on in prefill
            notes.append(f"prefill over {PREFILL_MAIN}")
        if self.greedy and self.sampling:
            greedy = build_greedy_step(main, mtp, ctx.model_config, k, program.cache.block_size)
            program.set("step_greedy", greedy, GraphSignature(DECODE_INPUTS, STEP_OUTPUTS),
                        functools.partial(inputs, False))
            notes.append("and the greedy-only step")
        return ModuleResult(program, modified=True, matches=1, notes=notes)
