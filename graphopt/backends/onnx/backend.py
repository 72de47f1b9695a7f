"""OnnxBackend.lower(program, options) -> OnnxExecutable (see the package doc)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from ...passes.program import CompileOptions, Program
from ...step.contract import SpecPrefillInputs, SpecStepInputs, SpecStepOutputs
from ...step.provider import SpecStats
from ...step.spec_step import as_outputs, decode_args, prefill_args
from ..base import Backend, fresh_cache_forward
from .export import OnnxGraph, export_graph

__all__ = ["CACHE_BINDINGS", "OnnxBackend", "OnnxExecutable", "OnnxSession"]

# How an updated cache gets back into the engine's tensor (docs/onnx.md has the measurements):
#   "alias": the cache output is bound to the cache input's own buffer (the torch tensor's memory),
#            so ScatterND writes in place and nothing is copied. Only for caches the graph reads
#            solely through that first ScatterND (OnnxGraph.writes_in_place; every cache of the
#            step graphs); any other falls back to "copy";
#   "copy":  onnxruntime allocates the output and it is copied into the engine's tensor afterwards.
CACHE_BINDINGS = ("alias", "copy")

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_,
       torch.int32: np.int32, torch.float64: np.float64}


def _flat(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


class OnnxSession:
    """One exported graph in one onnxruntime CPU InferenceSession, called with torch tensors."""

    def __init__(self, graph: OnnxGraph, threads: int, cache_binding: str):
        if cache_binding not in CACHE_BINDINGS:
            raise ValueError(f"cache_binding must be one of {CACHE_BINDINGS}, got {cache_binding!r}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.graph, self.cache_binding = graph, cache_binding
        self.session = ort.InferenceSession(graph.serialize(), opts, providers=["CPUExecutionProvider"])
        self._names = [i.name for i in self.session.get_inputs()]     # unused inputs are pruned by the exporter

    def _aliased(self, cache: str) -> bool:
        return self.cache_binding == "alias" and cache in self.graph.writes_in_place

    def __call__(self, *args) -> tuple[torch.Tensor, ...]:
        """args: the graph's positional arguments (cache lists allowed); the caches are updated in
        place, the other outputs are returned as tensors."""
        values = dict(zip(self.graph.inputs, _flat(args)))
        for cache in self.graph.caches:                 # bound by address: a copy would lose the writes
            if not values[cache].is_contiguous():
                raise ValueError(f"onnx backend: cache {cache} must be contiguous")
        values = {n: t if n in self.graph.caches else t.contiguous() for n, t in values.items()}
        binding = self.session.io_binding()
        for name in self._names:
            t = values[name]
            binding.bind_input(name, "cpu", 0, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        n_plain = len(self.graph.outputs) - len(self.graph.caches)
        for name in self.graph.outputs[:n_plain]:
            binding.bind_output(name, "cpu")
        for name, cache in zip(self.graph.outputs[n_plain:], self.graph.caches):
            t = values[cache]
            if self._aliased(cache):
                binding.bind_output(name, "cpu", 0, _NP[t.dtype], tuple(t.shape), t.data_ptr())
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        for value, cache in zip(outs[n_plain:], self.graph.caches):
            if not self._aliased(cache):
                values[cache].copy_(torch.from_numpy(value.numpy()))
        return tuple(torch.from_numpy(v.numpy()) for v in outs[:n_plain])


class OnnxExecutable:
    """The step contract over onnxruntime sessions of the prefill and greedy step graphs (built at
    lowering), the sampling step (on the first sampled decode) and main (on the first forward())."""

    def __init__(self, program: Program, threads: int | None = None, cache_binding: str = "alias"):
        if not program.has_step_graphs:
            raise ValueError("the onnx backend runs the fused step graphs; the program has only "
                             f"{program.names} (was fuse_spec_step disabled?)")
        if program.cache.device.type != "cpu":
            raise ValueError(f"the onnx backend runs on the CPU; the program's caches are on {program.cache.device}")
        self.program, layout = program, program.cache
        self.config, self.block_size = program.model_config, layout.block_size
        self.num_speculative_tokens = program.state.num_speculative_tokens
        from ...ops.sampling import DEFAULT_MAX_TOP_K
        self.max_top_k = DEFAULT_MAX_TOP_K
        self.threads = threads or torch.get_num_threads()
        self._cache_binding = cache_binding
        self.graphs: dict[str, OnnxGraph] = {}
        self.sessions: dict[str, OnnxSession] = {}
        # exported now: what greedy generation runs; the sampling step (and main) on first use, since
        # each export is one torch.export of the graph (seconds to a minute, docs/onnx.md)
        for name in ("prefill", "step_greedy") if "step_greedy" in program else ("prefill", "step"):
            self._session(name)
        self._stats = SpecStats()

    def _session(self, name: str) -> "OnnxSession":
        if name not in self.sessions:
            if name not in self.graphs:                 # export_program(exported=self.graphs) may have it
                self.graphs[name] = export_graph(self.program, name)
            self.sessions[name] = OnnxSession(self.graphs[name], self.threads, self._cache_binding)
        return self.sessions[name]

    @property
    def cache_binding(self) -> str:
        return self._cache_binding

    @cache_binding.setter
    def cache_binding(self, binding: str) -> None:
        """Switch every session between "alias" and "copy" (CACHE_BINDINGS) without re-exporting."""
        if binding not in CACHE_BINDINGS:
            raise ValueError(f"cache_binding must be one of {CACHE_BINDINGS}, got {binding!r}")
        self._cache_binding = binding
        for session in self.sessions.values():
            session.cache_binding = binding

    def new_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.program.cache.new_caches(num_blocks, with_mtp=self.num_speculative_tokens > 0)

    @torch.no_grad()
    def prefill(self, inputs: SpecPrefillInputs) -> SpecStepOutputs:
        inputs.validate()
        return as_outputs(self._session("prefill")(*prefill_args(inputs)))

    @torch.no_grad()
    def decode(self, inputs: SpecStepInputs) -> SpecStepOutputs:
        inputs.validate(self.num_speculative_tokens)
        name = "step_greedy" if inputs.greedy and "step_greedy" in self.program else "step"
        out = as_outputs(self._session(name)(*decode_args(inputs)))
        self._stats.update(out)
        return out

    @property
    def stats(self) -> dict | None:
        return self._stats.summary() if self.num_speculative_tokens > 0 else None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]: the main graph's session over a fresh cache."""
        # int64 ids: the session binds raw buffers by dtype; the caches are on the CPU (checked in __init__)
        return fresh_cache_forward(self._session("main"), self.program.cache, input_ids.to(torch.int64))


class OnnxBackend(Backend):
    name = "onnx"

    def lower(self, program: Program, options: CompileOptions) -> OnnxExecutable:
        if program.cache.cache_dtype is not None:
            raise ValueError(f"the onnx backend does not take {program.cache.cache_dtype} caches (C8 storage) yet; "
                             "compile with disable_passes=('store_int8_kv_cache',) for float caches with C8 numerics, "
                             "or with the eager / inductor backend")
        return OnnxExecutable(program)
