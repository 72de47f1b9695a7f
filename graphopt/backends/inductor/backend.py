"""InductorBackend.lower(program, options) -> InductorExecutable (see the package doc)."""

from __future__ import annotations

import copy

import torch
from torch import fx

from ... import ops as _ops  # noqa: F401  registers the graphopt:: ops the graphs may call
from ...ops import core as _core
from ...passes.program import CompileOptions, Program
from ...step.contract import SAMPLING_FIELDS, SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from ...step.provider import SpecStats
from ...step.paged import blocks_for, dense_block_tables, slot_mapping
from ...step.spec_step import as_outputs, decode_args, prefill_args
from ..base import Backend
from . import kernels

__all__ = ["InductorBackend", "InductorExecutable", "batch_buckets", "for_inductor"]

# graphopt:: ops whose reference is plain elementwise / reduction torch: handed to Inductor as their
# maths, so it fuses them with their neighbours (an opaque op is one eager call per node)
_INLINE = {
    torch.ops.graphopt.rms_norm.default: _core.rms_norm._init_fn,
    torch.ops.graphopt.swiglu.default: _core.swiglu._init_fn,
    torch.ops.graphopt.moe_route.default: _core.moe_route._init_fn,
}


def for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` as Inductor should see it: the elementwise graphopt ops inlined as their torch
    maths, export's unused guard module call dropped. Weights are shared with `gm`, not copied."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target in _INLINE:
            new.target = _INLINE[node.target]
        env[node] = new
    graph._codegen = copy.deepcopy(gm.graph._codegen)   # the same (pytree) signature as gm
    out = fx.GraphModule(gm, graph)
    if hasattr(out, "_guards_fn"):
        delattr(out, "_guards_fn")
    out.recompile()
    return out


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a decode step is captured for: 1, 2, 4, 8, then multiples of 8 up to 64, then of 32."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b = b * 2 if b < 8 else (b + 8 if b < 64 else b + 32)
    return sizes + [max_batch_size]


class _Compiled:
    """One graph compiled once by Inductor with dynamic batch / token / table / cache sizes."""

    def __init__(self, gm: fx.GraphModule, name: str):
        self.name = name
        self.graph_module = for_inductor(gm)
        self.fn = torch.compile(self.graph_module, backend="inductor", dynamic=True)

    def __call__(self, *args):
        return self.fn(*args)


class _CapturedStep:
    """One CUDA graph of the decode step for `rows` rows, over static input buffers and one set of caches."""

    def __init__(self, fn: _Compiled, rows: int, k: int, width: int, kv, mtp, pool, device):
        z = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.rows, self.width = rows, width
        self.tokens, self.start_pos, self.block_tables = z(rows, 1 + k), z(rows), z(rows, width)
        idle = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0, "eos_token_id": -1, "max_pos": 0}
        self.params = {name: torch.full((rows,), idle[name], dtype=dtype, device=device) for name, dtype in SAMPLING_FIELDS}
        self.active = z(rows, dtype=torch.bool)     # all rows idle while warming up: writes go to the sink
        self.caches = (list(kv), list(mtp))
        self.key = _cache_key(kv, mtp)
        args = (self.tokens, self.start_pos, self.block_tables, *self.params.values(), self.active, *self.caches)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):                      # compile (first call) and settle the allocator
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*args)

    def run(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        n, w = inputs.tokens.shape[0], inputs.block_tables.shape[1]
        self.tokens[:n].copy_(inputs.tokens)
        self.start_pos[:n].copy_(inputs.start_pos)
        self.block_tables[:n, :w].copy_(inputs.block_tables)
        if w < self.width:
            self.block_tables[:n, w:].zero_()
        for name, _ in SAMPLING_FIELDS:
            self.params[name][:n].copy_(getattr(inputs, name))
        self.active[:n].copy_(inputs.active)
        self.active[n:].zero_()                     # padding rows: inactive, they write the sink slot
        self.graph.replay()
        return SpecStepOutputs(*(t[:n] for t in self.outputs))


def _cache_key(kv, mtp) -> tuple:
    return tuple((c.data_ptr(), tuple(c.shape)) for c in (*kv, *mtp))


class InductorExecutable:
    """The step contract over Inductor-compiled graphs; on CUDA, decode replays a CUDA graph per
    (batch bucket, greedy) over the caller's caches (re-captured when the caches change)."""

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
        self._step = self._compile(program["step"], "step")
        self._greedy = self._compile(program["step_greedy"], "step_greedy") if "step_greedy" in program else None
        self._prefill = self._compile(program["prefill"], "prefill")
        self._main = None                                        # compiled on first forward()
        self.buckets = batch_buckets(options.max_batch_size)
        self.width = blocks_for(self.config.max_position_embeddings + 2 * self.num_speculative_tokens + 1,
                                self.block_size)
        self._graphs: dict[tuple[int, bool], _CapturedStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._stats = SpecStats()
        self.captures = 0                                        # CUDA graphs captured so far

    def _compile(self, gm: fx.GraphModule, name: str):
        """One graph compiled once (a subclass may compile with another torch.compile backend)."""
        return _Compiled(gm, name)

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.program.cache.new_caches(num_blocks, with_mtp=self.num_speculative_tokens > 0)

    @torch.no_grad()
    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs:
        inputs.validate()
        return as_outputs(self._prefill(*prefill_args(inputs)))

    @torch.no_grad()
    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        inputs.validate()
        k = self.num_speculative_tokens
        if inputs.tokens.shape[1] != 1 + k:
            raise ValueError(f"SpecStepInputs.tokens: this executable verifies 1 + k = {1 + k} tokens per row, "
                             f"got {inputs.tokens.shape[1]}")
        greedy = inputs.greedy and self._greedy is not None
        n, w = inputs.tokens.shape[0], inputs.block_tables.shape[1]
        if self.cuda_graphs and n <= self.buckets[-1] and w <= self.width:
            out = self._captured(n, greedy, inputs).run(inputs)
        else:
            out = as_outputs((self._greedy if greedy else self._step)(*decode_args(inputs)))
        self._stats.update(out)
        return out

    def _captured(self, n: int, greedy: bool, inputs: SpecStepInputs) -> _CapturedStep:
        rows = next(b for b in self.buckets if b >= n)
        entry = self._graphs.get((rows, greedy))
        if entry is None or entry.key != _cache_key(inputs.kv_caches, inputs.mtp_caches):
            if entry is not None:             # the engine's caches changed: every graph holds the old ones
                self._graphs.clear()
            fn = self._greedy if greedy else self._step
            entry = _CapturedStep(fn, rows, self.num_speculative_tokens, self.width, inputs.kv_caches,
                                  inputs.mtp_caches, self._pool, self.device)
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
        layout = self.program.cache
        B, T = input_ids.shape
        per_row = blocks_for(T, layout.block_size)
        tables = dense_block_tables(B, per_row, layout.device)
        kv, _ = layout.new_caches(1 + B * per_row, with_mtp=False)
        positions = torch.arange(T, device=layout.device).expand(B, T)
        slots = slot_mapping(positions, tables, layout.block_size)
        logits, _ = self._main(input_ids.to(layout.device), positions, slots, tables, kv)
        return logits


class InductorBackend(Backend):
    name = "inductor"

    def lower(self, program: Program, options: CompileOptions) -> InductorExecutable:
        return InductorExecutable(program, options)
