"""`Program`: the unit the pipeline and the backends work on, and its typed compile state.

    capture -> Program(main, mtp0 ..) -> per-graph phases (each graph) -> module phases (the whole
    Program: the spec fusion adds step, prefill) -> Backend.lower(Program) -> Executable

A Program holds the named graphs in pipeline order (main, mtp0 .., step, prefill), each with its
input/output names and a seed -> fresh valid inputs factory (what verify mode and calibration run),
the cache layout every step graph shares, the model config, and `CompileState`: the spec and quant
configs, calibration inputs, the quant observers one pass fills and the next reads, and the records
and notes of every pass. Nothing travels between passes outside it.

`CompileOptions` (the **options of `graphopt.compile`, re-exported by `graphopt.config`) is defined
here because the pipeline and the backends read it, and both sit below the public API.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

import torch

from ..step.paged import CacheLayout

__all__ = ["CompileOptions", "CompileState", "GraphSignature", "Program"]


@dataclass
class CompileOptions:
    """The `**options` of `graphopt.compile`; an unknown key is a ValueError listing these."""

    block_size: int = 16                  # tokens per KV-cache block
    disable_passes: list[str] = field(default_factory=list)
    max_batch_size: int = 64              # rows the runtime batches at once
    cache_budget_bytes: int | None = None  # KV-cache memory; None: enough for the largest call so far
    prefill_chunk_size: int = 512         # longer prompts are prefilled in chunks of this many tokens
    fold_max_bytes: int = 64 << 20        # fold_constants skips results larger than this
    progress: bool = True                 # progress bars for long passes (calibration)
    cuda_graphs: bool = True              # inductor on CUDA: replay decode steps as CUDA graphs per batch bucket
    prefill_graph_tokens: int = 8192      # inductor on CUDA: prefill chunks of up to this many padded
                                          # tokens (rows x length bucket) replay CUDA graphs; 0: none
    fuse_projections: bool = True         # inductor on CUDA: linears of one input as one GEMM over
                                          # concatenated weights (kept beside the originals)
    ascend_mode: str = "max-autotune"     # ascend: "max-autotune" (GE graph) or "reduce-overhead" (captured)
    ascend_graph_dump: str | None = None  # ascend: directory for torchair's GE graph dumps (pbtxt)
    capture_workers: int | None = None    # forked processes tracing decoder layers during capture;
                                          # None: one per layer kind where fork is safe (a CPU
                                          # model, no CUDA on the machine), 0: none
    moe_prune_threshold: float = 0.0      # decode steps drop routed experts below this share of a token's
                                          # routing weight (passes/prune_routed_experts.py); 0: none
    shard_one_rank: bool = False          # tp = ep = 1 over an initialised world of one rank: run the shard
                                          # phase anyway (each weight its one piece, every collective a graph
                                          # node) to measure what sharding costs (docs/distributed.md)

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> "CompileOptions":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown compile option(s) {unknown}; accepted options: {names}")
        opts = cls(**options)
        flags = [f.name for f in fields(cls) if isinstance(f.default, bool)]
        wrong = [f"{n}={getattr(opts, n)!r}" for n in flags if not isinstance(getattr(opts, n), bool)]
        if wrong:
            raise ValueError(f"compile options {', '.join(wrong)} must be True or False (options taking a bool: {flags})")
        if opts.block_size < 1 or opts.block_size & (opts.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {opts.block_size}")
        if isinstance(opts.prefill_graph_tokens, bool) or not isinstance(opts.prefill_graph_tokens, int) \
                or opts.prefill_graph_tokens < 0:
            raise ValueError(f"prefill_graph_tokens must be an int >= 0, got {opts.prefill_graph_tokens!r}")
        if opts.max_batch_size < 1 or opts.prefill_chunk_size < 1:
            raise ValueError("max_batch_size and prefill_chunk_size must be >= 1")
        if opts.capture_workers is not None and (isinstance(opts.capture_workers, bool)
                                                 or not isinstance(opts.capture_workers, int)
                                                 or opts.capture_workers < 0):
            raise ValueError(f"capture_workers must be None or an int >= 0, got {opts.capture_workers!r}")
        t = opts.moe_prune_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"moe_prune_threshold must be a number in [0, 1] (0: no pruning, 1: the top expert only), got {t!r}")
        opts.moe_prune_threshold = float(t)
        if isinstance(opts.disable_passes, str):
            opts.disable_passes = [p.strip() for p in opts.disable_passes.split(",") if p.strip()]
        return opts


@dataclass
class CompileState:
    """What the passes of one compile share, typed (it replaced the free-form ctx.state dict).

    calibration_inputs: graph name -> iterable of that graph's input tuples, or one iterable for
    every graph, or None (quant_calibrate then runs random valid steps and says so in its notes).
    records / notes: filled by the manager; notes are "graph/pass" -> what the pass wants a reader of
    the compile report to know (the dump report and `CompiledModel.report` both show them)."""

    spec: Any = None                      # graphopt.SpecConfig | None
    quant: Any = None                     # graphopt.QuantConfig | None
    calibration_inputs: Callable[[str], Iterable[tuple]] | Iterable[tuple] | None = None
    quant_observers: dict[str, Any] = field(default_factory=dict)   # site name -> quant.observers.Observer
    records: list = field(default_factory=list)                     # manager.PassRecord, pipeline order
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def num_speculative_tokens(self) -> int:
        return 0 if self.spec is None else self.spec.num_speculative_tokens


@dataclass(frozen=True)
class GraphSignature:
    """Placeholder names in order, and the names of the output tuple's fields."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


_ORDER = ("main", "mtp", "step", "step_greedy", "prefill")   # pipeline order; mtp graphs by depth


def _rank(name: str) -> tuple:
    if name.startswith("mtp") and name[3:].isdigit():
        return (1, int(name[3:]))
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


@dataclass
class Program:
    """The named graphs of one compile plus what running them needs; see the module doc."""

    model_config: Any                     # graphopt.models.config.DeepseekV3Config
    cache: CacheLayout
    state: CompileState = field(default_factory=CompileState)
    graphs: dict[str, torch.fx.GraphModule] = field(default_factory=dict)
    signatures: dict[str, GraphSignature] = field(default_factory=dict)
    make_inputs: dict[str, Callable[[int], tuple]] = field(default_factory=dict)

    @classmethod
    def from_captured(cls, captured: Iterable, model_config, cache: CacheLayout,
                      state: CompileState | None = None) -> "Program":
        """From `capture.step.CapturedGraph`s (main first, then each MTP depth)."""
        program = cls(model_config, cache, state or CompileState())
        for cap in captured:
            program.set(cap.name, cap.graph_module, GraphSignature(tuple(cap.input_names), tuple(cap.output_names)),
                        cap.make_inputs)
        return program

    def set(self, name: str, gm: torch.fx.GraphModule, signature: GraphSignature | None = None,
            make_inputs: Callable[[int], tuple] | None = None) -> None:
        """Add or replace graph `name`; a new graph needs its signature, a replaced one keeps it."""
        if signature is None and name not in self.signatures:
            raise ValueError(f"Program.set: new graph {name!r} needs its signature (input and output names)")
        self.graphs[name] = gm
        if signature is not None:
            self.signatures[name] = signature
        if make_inputs is not None:
            self.make_inputs[name] = make_inputs
        self.graphs = {n: self.graphs[n] for n in sorted(self.graphs, key=_rank)}

    def remove(self, name: str) -> None:
        """Drop graph `name` (a pass whose copy of a graph is spliced into another is done with it)."""
        self[name]   # a KeyError naming the graphs when absent
        for table in (self.graphs, self.signatures, self.make_inputs):
            table.pop(name, None)

    @property
    def names(self) -> list[str]:
        return list(self.graphs)

    def __contains__(self, name: str) -> bool:
        return name in self.graphs

    def __getitem__(self, name: str) -> torch.fx.GraphModule:
        if name not in self.graphs:
            raise KeyError(f"the program has no graph {name!r}; it has {self.names}")
        return self.graphs[name]

    @property
    def main(self) -> torch.fx.GraphModule:
        return self["main"]

    @property
    def mtp_graphs(self) -> list[torch.fx.GraphModule]:
        """The MTP graphs in depth order (mtp0, mtp1, ..)."""
        return [gm for name, gm in self.graphs.items() if _rank(name)[0] == 1]

    @property
    def has_step_graphs(self) -> bool:
        """True once the spec fusion added the step and prefill graphs."""
        return "step" in self.graphs and "prefill" in self.graphs
