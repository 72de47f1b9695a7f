"""InductorBackend.lower(program, options) -> InductorExecutable (see the package doc)."""

from __future__ import annotations

import copy
import operator
import os

import torch
import torch.distributed as dist
from torch import fx
from torch.fx.experimental import _config as _fx_config

from ... import ops as _ops  # noqa: F401  registers the graphopt:: ops the graphs may call
from ...ops import core as _core
from ...ops import quant as _quant
from ...ops import sampling as _sampling
from ...passes.program import CompileOptions, Program
from ...passes.sharding import COLLECTIVES
from ...step.contract import IDLE_SAMPLING, SAMPLING_FIELDS, SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from ...step.provider import SpecStats, accumulate
from ...step.paged import blocks_for
from ...step.spec_step import as_outputs, decode_args, prefill_args
from ..base import Backend, fresh_cache_forward
from . import kernels

__all__ = ["InductorBackend", "InductorExecutable", "batch_buckets", "for_inductor", "prefill_shape"]



def _moe_route_maths(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method, scoring_func,
                     norm_topk_prob, routed_scaling_factor, prune_threshold=0.0):
    """graphopt::moe_route's reference without its argument checks (the op checked them when the graph
    was made): a check's message formats symbolic sizes, which breaks Dynamo's graph in two."""
    weights, ids = _core.route(x, gate_weight, correction_bias, top_k, n_group, topk_group, topk_method,
                               scoring_func, norm_topk_prob, routed_scaling_factor)
    return (_core.prune_routing(weights, prune_threshold) if prune_threshold > 0 else weights), ids


# graphopt:: ops whose reference is plain elementwise / reduction torch: handed to Inductor as their
# maths, so it fuses them with their neighbours (an opaque op is one eager call per node)
_INLINE = {
    torch.ops.graphopt.rms_norm.default: _core.rms_norm._init_fn,
    torch.ops.graphopt.swiglu.default: _core.swiglu._init_fn,
    torch.ops.graphopt.moe_route.default: _moe_route_maths,
    # the speculative acceptance: ~10 eager kernels as an opaque op, one fused kernel inlined
    torch.ops.graphopt.greedy_accept.default: _sampling.greedy_accept_maths,
    # dynamic activation quantisation and the int32 -> float epilogue: fused into the producer /
    # consumer kernels instead of 3-5 eager kernels each around every quantised GEMM
    torch.ops.graphopt.quantize_per_token.default: _quant.quantize_per_token._init_fn,
    torch.ops.graphopt.quantize_per_tensor.default: _quant.quantize_per_tensor._init_fn,
    torch.ops.graphopt.dequantize_int32.default: _quant.dequantize_int32._init_fn,
    torch.ops.graphopt.quantize_fp8.default: _quant.quantize_fp8._init_fn,
}


KEEP_ONE_RANK_COLLECTIVES = "GRAPHOPT_KEEP_ONE_RANK_COLLECTIVES"


def one_rank_collectives_elided() -> bool:
    """True when torch.distributed runs over a world of one rank (the compile option shard_one_rank) and
    the environment does not ask to keep its collectives (GRAPHOPT_KEEP_ONE_RANK_COLLECTIVES=1: the benchmark's
    comparison). A collective over one rank is the identity; NCCL would still launch a kernel for it."""
    keep = os.environ.get(KEEP_ONE_RANK_COLLECTIVES, "")
    if keep not in ("", "0", "1"):
        raise ValueError(f"{KEEP_ONE_RANK_COLLECTIVES}={keep!r}: accepted are 1 (keep the collectives over one "
                         "rank in the Inductor graph) and 0 or unset (drop them)")
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1 and keep != "1"


def for_inductor(gm: fx.GraphModule, fused_weights: dict | None = None, few_rows: bool = True) -> fx.GraphModule:
    """A copy of `gm` as Inductor should see it: the elementwise graphopt ops inlined as their torch
    maths, export's unused guard module call dropped, stored-weight linears as graphopt::linear when
    its GEMV kernel is registered and the graph runs few rows (`few_rows`: the decode steps; a prefill
    chunk never does, and the op's per-call dispatch would only add host time there), in those graphs
    moe_experts as moe_expert_terms and its sum over k when the MoE kernel is registered, and over a world
    of one rank every collective and its wait dropped (`one_rank_collectives_elided`: the result is its
    input; an all_gather of one rank has its input's shape). Weights are shared with `gm`, not copied.
    With `fused_weights` (a dict shared by the graphs of one executable), projections of one input are
    fused (`fuse_projections`)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    collectives = set(COLLECTIVES.values()) if one_rank_collectives_elided() else set()
    elided: set[fx.Node] = set()
    # the router inlined is ~8 kernels; with its Triton kernel registered (CUDA) it stays one op call
    kept = {torch.ops.graphopt.moe_route.default} if "moe_route" in kernels.registered() else set()
    gemv = few_rows and "linear" in kernels.registered()
    # the MoE kernel's eager sum over k and cast (two launches per MoE layer) left to Inductor instead
    moe_terms = few_rows and "moe_experts" in kernels.registered()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if node.op == "call_function" and (node.target in collectives or (
                node.target is torch.ops._c10d_functional.wait_tensor.default and node.args[0] in elided)):
            env[node] = env[node.args[0]]
            elided.add(node)
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target in _INLINE and node.target not in kept:
            new.target = _INLINE[node.target]
        elif gemv and _weight_linear(gm, node):
            new.target, new.args, new.kwargs = torch.ops.graphopt.linear.default, new.args[:2], {}
        elif moe_terms and node.op == "call_function" and node.target is torch.ops.graphopt.moe_experts.default:
            new.target = torch.ops.graphopt.moe_expert_terms.default                 # [N, k, H] float32
            summed = graph.call_function(torch.ops.aten.sum.dim_IntList, (new, [1]))
            new = graph.call_function(torch.ops.prims.convert_element_type.default,
                                      (summed, node.args[0].meta["val"].dtype))
        env[node] = new
    graph._codegen = copy.deepcopy(gm.graph._codegen)   # the same (pytree) signature as gm
    out = fx.GraphModule(gm, graph)
    if hasattr(out, "_guards_fn"):
        delattr(out, "_guards_fn")
    if fused_weights is not None:
        fuse_projections(out, fused_weights)
    out.recompile()
    return out


_LINEARS = (torch.ops.aten.linear.default, torch.ops.graphopt.linear.default)
# the quantised linears' matmuls: op -> (positions of the arguments every fused member shares, positions
# of its stored operands, each [out, ...] and concatenated by rows): int8 weights [out, K]; w4a8's packed
# int4 [out, K/2] and group scales [out, K/G]; fp8 e4m3 weights [out, K] with per-channel scales [out, 1]
_QUANT_MATMULS = {
    torch.ops.graphopt.int8_matmul.default: ((0,), (1,)),
    torch.ops.graphopt.w4a8_matmul.default: ((0,), (1, 2)),
    torch.ops.graphopt.fp8_linear.default: ((0, 1, 4, 5), (2, 3)),   # (x_q, x_scale, bias None, out_dtype)
}


def fuse_projections(gm: fx.GraphModule, fused_weights: dict) -> int:
    """Linears of one input over stored weights of one dtype, device and K (q_proj and kv_a_proj of
    an attention, gate_proj and up_proj of an MLP or the shared experts) become ONE linear over their
    weights concatenated by rows, and a slice of its output per original linear. At decode sizes every
    projection is one launch-bound GEMM of ~6 us on the H200 whatever its size (2-12 MB), so this
    removes two of each layer's six. The quantised linears' matmuls of one quantised input fuse alike
    (int8_matmul, w4a8_matmul, per-channel fp8_linear without bias: `_QUANT_MATMULS`), each stored
    operand concatenated by rows; the input is one node once `passes.share_activation_quant` merged
    its quantisers. An int8 / int4 product is exact, so each dequantize reads exactly what its own
    matmul gave; fp8's float32 accumulation matches to rounding, as the float linears do. The
    concatenated weight is made once per weight tuple (the executable's graphs share `fused_weights`)
    and kept beside the originals, which the Program still holds. Returns the number of matmuls removed."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _LINEARS and _weight_linear(gm, node):
            groups.setdefault((_LINEARS, node.args[0]), []).append(node)
        elif node.op == "call_function" and node.target in _QUANT_MATMULS and _stored_operands(gm, node):
            shared, _ = _QUANT_MATMULS[node.target]
            groups.setdefault((node.target, *(node.args[i] for i in shared)), []).append(node)
    removed = 0
    for members in groups.values():
        stored = _QUANT_MATMULS[members[0].target][1] if members[0].target in _QUANT_MATMULS else (1,)
        operands = [[_attr(gm, m.args[i].target) for i in stored] for m in members]
        if len(members) < 2 or len({m.target for m in members}) != 1 or len(
                {tuple((w.dtype, w.device, w.shape[1:]) for w in ws) for ws in operands}) != 1:
            continue
        key = tuple(id(w) for ws in operands for w in ws)
        if key not in fused_weights:          # the originals are kept in the entry: their ids stay theirs
            fused_weights[key] = (operands, [torch.cat(col, dim=0) for col in zip(*operands)])
        first, start = members[0], 0
        with gm.graph.inserting_before(first):
            args = list(first.args)
            for i, tensor in zip(stored, fused_weights[key][1]):
                name = f"_fused_projection_{sum(n.startswith('_fused_projection_') for n in gm._buffers)}"
                gm.register_buffer(name, tensor, persistent=False)
                args[i] = gm.graph.get_attr(name)
            y = gm.graph.call_function(first.target, tuple(args))
            for member, ws in zip(members, operands):
                part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (y, -1, start, start + ws[0].shape[0]))
                start += ws[0].shape[0]
                member.replace_all_uses_with(part)
        for member in members:
            gm.graph.erase_node(member)
        removed += len(members) - 1
    if removed:
        gm.graph.eliminate_dead_code()
    return removed


def _stored_operands(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A quantised matmul whose input is a node and whose stored operands are 2-d tensors with one row
    per output column (fp8 block scales, one row per 128 columns, are left alone)."""
    if node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    tensors = []
    for i in _QUANT_MATMULS[node.target][1]:
        w = node.args[i]
        t = _attr(gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            return False
        tensors.append(t)
    return len({t.shape[0] for t in tensors}) == 1


def _weight_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """aten.linear(x, weight) without bias over a stored weight of x's dtype: the GEMV kernel's case
    (graphopt::linear picks the GEMV or cuBLAS per call from the row count)."""
    if node.op != "call_function" or node.target not in _LINEARS:
        return False
    x, w, bias = (*node.args, *[None] * 3)[:3]
    bias = node.kwargs.get("bias", bias)
    if bias is not None or not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or w.op != "get_attr":
        return False
    xv, wv = x.meta.get("val"), _attr(gm, w.target)
    return isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor) and xv.dtype == wv.dtype and wv.dim() == 2


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a decode step is captured for: 1, 2, 4, 8, then multiples of 8 up to 64, then of 32."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b = b * 2 if b < 8 else (b + 8 if b < 64 else b + 32)
    return sizes + [max_batch_size]


def prefill_shape(rows: int, tokens: int, width: int, buckets: list[int], max_width: int,
                  max_tokens: int) -> tuple[int, int, int] | None:
    """The (rows, tokens, table width) bucket a prefill chunk of this shape replays in, or None when it
    runs without a CUDA graph: rows to the decode batch buckets, tokens to the next power of two from
    16 up to 128 and to the next multiple of 128 above (long chunks approach compute-bound, where
    padding costs what it pads), width to the next power of two of blocks (at most `max_width`);
    None past the last batch bucket or when the padded chunk holds more than `max_tokens` tokens
    (its launches are then a small part of its time)."""
    if rows > buckets[-1] or width > max_width:
        return None
    r = next(b for b in buckets if b >= rows)
    t = max(16, 1 << (tokens - 1).bit_length()) if tokens <= 128 else -(-tokens // 128) * 128
    if r * t > max_tokens:
        return None
    return r, t, min(max_width, 1 << (width - 1).bit_length())


class _Compiled:
    """One graph compiled by Inductor with dynamic batch / token / table / cache sizes: twice in all,
    for one row and for more (Dynamo specialises sizes 0 and 1). Traced without duck shaping: by
    default two sizes equal at the first call (a 16-token chunk and the 16-slot cache block) become
    one symbol, and the next chunk length recompiles the whole graph (~40 s on V2-Lite)."""

    def __init__(self, gm: fx.GraphModule, name: str, fused_weights: dict | None = None):
        self.name = name
        self.graph_module = for_inductor(gm, fused_weights, few_rows=name in ("step", "step_greedy"))
        self.fn = torch.compile(self.graph_module, backend="inductor", dynamic=True)

    def __call__(self, *args):
        with _no_duck_shapes():
            return self.fn(*args)


def _no_duck_shapes():
    return _fx_config.patch(use_duck_shape=False)


def _idle_sampling(rows: int, device) -> dict[str, torch.Tensor]:
    """Static sampling-field buffers for `rows` rows, every row at the idle values."""
    return {name: torch.full((rows,), IDLE_SAMPLING[name], dtype=dtype, device=device)
            for name, dtype in SAMPLING_FIELDS}


def _warm_up(fn, args, count=None) -> None:
    """Two calls on a side stream before a capture: the first compiles, the second settles the allocator.
    With `count` (the compiled statistics update), it is compiled for these rows too, over scratch sums."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            out = as_outputs(fn(*args))
            if count is not None:
                count(torch.zeros(4 + 2 * (out.out_tokens.shape[1] - 1), dtype=torch.int64, device=out.finished.device),
                      out.num_emitted, out.finished)
    torch.cuda.current_stream().wait_stream(side)


class _OverCaches:
    """A CUDA graph captured over one set of cache tensors (it reads and writes their storage)."""

    def __init__(self, kv, mtp):
        self.key, self._caches = _cache_key(kv, mtp), (*kv, *mtp)

    def holds(self, kv, mtp) -> bool:
        """Whether the graph was captured over exactly these cache tensors."""
        return len(kv) + len(mtp) == len(self._caches) and all(map(operator.is_, (*kv, *mtp), self._caches))


class _CapturedStep(_OverCaches):
    """One CUDA graph of the decode step for `rows` rows over one set of caches.

    Two kinds: over its own static input buffers (`bind=None`: each call copies the caller's rows in,
    pads the rest with inactive rows), or bound to the caller's own input tensors (`bind=inputs` of
    exactly `rows` rows: a call with the same tensors only replays). The speculative statistics are
    updated inside the graph, so a replay is the whole step."""

    def __init__(self, fn: _Compiled, rows: int, k: int, width: int, kv, mtp, pool, device,
                 stats: SpecStats | None, count=accumulate, bind: SpecStepInputs | None = None):
        super().__init__(kv, mtp)
        self.rows, self.width = rows, width
        if bind is None:
            z = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
            self.tokens, self.start_pos, self.block_tables = z(rows, 1 + k), z(rows), z(rows, width)
            self.params = _idle_sampling(rows, device)
            self.active = z(rows, dtype=torch.bool)     # all rows idle while warming up: writes go to the sink
            args = (self.tokens, self.start_pos, self.block_tables, *self.params.values(), self.active, kv, mtp)
            self.bound = None
        else:
            args = decode_args(bind)
            self.bound = _input_key(bind)
        if bind is None:    # a bound graph is captured after a graph of the same rows ran: no warm-up
            _warm_up(fn, args, count if stats is not None else None)   # (it would step the caller's live rows)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = as_outputs(fn(*args))
            if stats is not None:
                stats.update(self.outputs, count)       # accumulates on every replay

    def run(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        if self.bound is not None:                      # the caller's tensors are the graph's inputs
            self.graph.replay()
            return self.outputs
        n, w = inputs.tokens.shape[0], inputs.block_tables.shape[1]
        copies = [(self.tokens[:n], inputs.tokens), (self.start_pos[:n], inputs.start_pos),
                  (self.block_tables[:n, :w], inputs.block_tables), (self.active[:n], inputs.active)]
        copies += [(self.params[name][:n], getattr(inputs, name)) for name, _ in SAMPLING_FIELDS]
        torch._foreach_copy_([d for d, _ in copies], [s for _, s in copies])
        if w < self.width:
            self.block_tables[:n, w:].zero_()
        if n < self.rows:
            self.active[n:].zero_()                     # padding rows: inactive, they write the sink slot
        self.graph.replay()
        return SpecStepOutputs(*(t[:n] for t in self.outputs.__dict__.values()))


class _CapturedPrefill(_OverCaches):
    """One CUDA graph of the prefill graph for a (rows, tokens, width) bucket over one set of caches,
    over its own static inputs: a call copies the chunk in (padding tokens past each row's length,
    padding rows of length 1 whose all-zero block table points every write at the sink block) and
    replays. The outputs are the graph's own tensors: valid until the next prefill call."""

    def __init__(self, fn: _Compiled, shape: tuple[int, int, int], k: int, kv, mtp, pool, device):
        super().__init__(kv, mtp)
        rows, tokens, width = self.shape = shape
        z = lambda *s, dtype=torch.int64: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.ids, self.start_pos, self.block_tables = z(rows, tokens), z(rows), z(rows, width)
        self.lengths = torch.ones(rows, dtype=torch.int64, device=device)
        self.params = _idle_sampling(rows, device)
        self.last = z((), dtype=torch.bool)
        args = (self.ids, self.lengths, self.start_pos, self.block_tables, *self.params.values(), self.last,
                list(kv), list(mtp))
        _warm_up(fn, args)                          # every write goes to the sink (zero tables)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = as_outputs(fn(*args))

    def run(self, inputs: SpecPrefillInputs) -> SpecStepOutputs:
        (n, t), w = inputs.ids.shape, inputs.block_tables.shape[1]
        self.ids[:n, t:].zero_()
        self.block_tables[:n, w:].zero_()
        self.lengths[n:].fill_(1)                       # rows past n: padding, one token into the sink
        self.start_pos[n:].zero_()
        self.block_tables[n:].zero_()
        copies = [(self.ids[:n, :t], inputs.ids), (self.lengths[:n], inputs.lengths),
                  (self.start_pos[:n], inputs.start_pos), (self.block_tables[:n, :w], inputs.block_tables)]
        copies += [(self.params[name][:n], getattr(inputs, name)) for name, _ in SAMPLING_FIELDS]
        torch._foreach_copy_([d for d, _ in copies], [s for _, s in copies])
        self.last.fill_(bool(inputs.is_last_chunk))
        self.graph.replay()
        return SpecStepOutputs(*(o[:n] for o in self.outputs.__dict__.values()))


def _cache_key(kv, mtp) -> tuple:
    return tuple((c.data_ptr(), tuple(c.shape)) for c in (*kv, *mtp))


def _input_key(inputs: SpecStepInputs) -> tuple:
    """Where the step's row inputs live: equal keys mean a graph bound to one set reads the other."""
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in
                 (inputs.tokens, inputs.start_pos, inputs.block_tables, *(getattr(inputs, n) for n, _ in SAMPLING_FIELDS),
                  inputs.active))


class InductorExecutable:
    """The step contract over Inductor-compiled graphs; on CUDA, decode replays a CUDA graph per
    (batch bucket, greedy) and prefill one per (rows, tokens, table width) bucket, over the caller's
    caches (re-captured when the caches change)."""

    def __init__(self, program: Program, options: CompileOptions):
        if not program.has_step_graphs:
            raise ValueError("the inductor backend runs the fused step graphs; the program has only "
                             f"{program.names} (was fuse_spec_step disabled?)")
        self.program, layout = program, program.cache
        self.config, self.block_size = program.model_config, layout.block_size
        self.num_speculative_tokens = program.state.num_speculative_tokens
        from ...ops.sampling import DEFAULT_MAX_TOP_K
        self.max_top_k = DEFAULT_MAX_TOP_K
        self.device = layout.device
        self.cuda_graphs = self.device.type == "cuda" and options.cuda_graphs
        if self.device.type == "cuda":
            kernels.register_all()
        # projections of one input fused into one GEMM on CUDA (see fuse_projections; CPU keeps them)
        self._fused_weights = {} if self.device.type == "cuda" and options.fuse_projections else None
        self._step = self._compile(program["step"], "step")
        self._greedy = self._compile(program["step_greedy"], "step_greedy") if "step_greedy" in program else None
        self._prefill = self._compile(program["prefill"], "prefill")
        self._main = None                                        # compiled on first forward()
        self.buckets = batch_buckets(options.max_batch_size)
        self.width = blocks_for(self.config.max_position_embeddings + 2 * self.num_speculative_tokens + 1,
                                self.block_size)
        self.prefill_graph_tokens = options.prefill_graph_tokens if self.cuda_graphs else 0
        self._prefill_graphs: dict[tuple[int, int, int], _CapturedPrefill] = {}
        self._graphs: dict[tuple[int, bool], _CapturedStep] = {}   # (rows, greedy) -> over own buffers
        self._bound: dict[tuple, _CapturedStep] = {}               # caller's input tensors -> bound graph
        self._last_inputs: dict[tuple[int, bool], tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._stats = SpecStats()
        self._count = accumulate
        if self.cuda_graphs and self.num_speculative_tokens:
            self._stats.prepare(self.num_speculative_tokens, self.device)   # graphs update it in place
            # the statistics update as one compiled kernel in every step graph (eager: ~20 small kernels,
            # ~25 us of a 0.4 ms step at batch 1 on the H100), compiled at the first bucket's warm-up (one size, then
            # one dynamic recompile for the rest)
            self._count = torch.compile(accumulate, backend="inductor")
        self.captures = 0                                        # decode CUDA graphs captured so far
        self.prefill_captures = 0                                # prefill CUDA graphs captured so far

    def _compile(self, gm: fx.GraphModule, name: str):
        """One graph compiled once (a subclass may compile with another torch.compile backend)."""
        return _Compiled(gm, name, self._fused_weights)

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.program.cache.new_caches(num_blocks, with_mtp=self.num_speculative_tokens > 0)

    @torch.no_grad()
    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs:
        inputs.validate()
        (rows, tokens), width = inputs.ids.shape, inputs.block_tables.shape[1]
        shape = prefill_shape(rows, tokens, width, self.buckets, self.width, self.prefill_graph_tokens)
        if shape is None:
            return as_outputs(self._prefill(*prefill_args(inputs)))
        entry = self._prefill_graphs.get(shape)
        if entry is None or not entry.holds(inputs.kv_caches, inputs.mtp_caches):
            if entry is not None:                        # the engine's caches changed: drop the old graphs
                self._prefill_graphs.clear()
            entry = self._prefill_graphs[shape] = _CapturedPrefill(
                self._prefill, shape, self.num_speculative_tokens, inputs.kv_caches, inputs.mtp_caches,
                self._pool, self.device)
            self.prefill_captures += 1
        return entry.run(inputs)

    def decode_shape(self, rows: int, width: int) -> tuple[int, int]:
        """The rows and block-table width a batch of `rows` is replayed with: a caller that passes
        inputs of this shape, as the same tensors step after step, gets a graph bound to them (no
        copies per step; see `docs/backends.md`)."""
        if not self.cuda_graphs or rows > self.buckets[-1] or width > self.width:
            return rows, width
        return next(b for b in self.buckets if b >= rows), self.width

    @torch.no_grad()
    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        n, w = inputs.tokens.shape[0], inputs.block_tables.shape[1]
        greedy = inputs.greedy and self._greedy is not None
        entry = self._bound.get((_input_key(inputs), greedy)) if self._bound else None
        if entry is not None and entry.holds(inputs.kv_caches, inputs.mtp_caches):
            return entry.run(inputs)                     # the same tensors as last step: replay only
        k = self.num_speculative_tokens
        inputs.validate(k)
        if not (self.cuda_graphs and n <= self.buckets[-1] and w <= self.width):
            out = as_outputs((self._greedy if greedy else self._step)(*decode_args(inputs)))
            if k:
                self._stats.update(out)
            return out
        return self._captured(n, greedy, inputs).run(inputs)

    def _captured(self, n: int, greedy: bool, inputs: SpecStepInputs) -> _CapturedStep:
        """The graph for this call: bound to the caller's tensors when they are exactly a bucket's rows
        and were passed in the previous call too, else the bucket's graph over its own buffers."""
        rows = next(b for b in self.buckets if b >= n)
        caches = _cache_key(inputs.kv_caches, inputs.mtp_caches)
        if any(g.key != caches for g in (*self._graphs.values(), *self._bound.values())):
            self._graphs.clear()                  # the engine's caches changed: every graph holds the old ones
            self._bound.clear()
        fn = self._greedy if greedy else self._step
        stats = self._stats if self.num_speculative_tokens else None
        key = _input_key(inputs)
        if n == rows and key == self._last_inputs.get((rows, greedy)) and (rows, greedy) in self._graphs:
            entry = _CapturedStep(fn, rows, self.num_speculative_tokens, self.width, inputs.kv_caches,
                                  inputs.mtp_caches, self._pool, self.device, stats, self._count, bind=inputs)
            self._bound[(key, greedy)] = entry
            self.captures += 1
            return entry
        self._last_inputs[(rows, greedy)] = key
        entry = self._graphs.get((rows, greedy))
        if entry is None:
            entry = _CapturedStep(fn, rows, self.num_speculative_tokens, self.width, inputs.kv_caches,
                                  inputs.mtp_caches, self._pool, self.device, stats, self._count)
            self._graphs[(rows, greedy)] = entry
            self.captures += 1
        return entry

    @property
    def stats(self) -> dict | None:
        return self._stats.summary() if self.num_speculative_tokens > 0 else None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]: the compiled main graph over a fresh cache."""
        if self._main is None:
            self._main = self._compile(self.program.main, "main")
        return fresh_cache_forward(self._main, self.program.cache, input_ids)


class InductorBackend(Backend):
    name = "inductor"

    def lower(self, program: Program, options: CompileOptions) -> InductorExecutable:
        return InductorExecutable(program, options)
