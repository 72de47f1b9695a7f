"""AscendBackend.lower(program, options) -> AscendExecutable: the Program's graphs through torchair.

Every graph is rewritten by `lowering.for_ascend` (graphopt ops -> torch_npu kernels or their
decompositions, per `plan.ASCEND_OPS`) and handed to `torch.compile(backend=torchair.get_npu_backend(
compiler_config=config))`, once per graph with dynamic shapes, as the inductor backend does with
Inductor. The step contract, buckets-free decode and the runtime's loop are the inductor backend's
(`InductorExecutable`), so the runtime works unchanged on "npu" devices.

    config.mode = options.ascend_mode            "max-autotune": a GE graph; "reduce-overhead": a captured
                                                 (ACL) graph replayed per call
    config.debug.graph_dump.type = "pbtxt"       when options.ascend_graph_dump is set (GE graph dumps)
    config.experimental_config.frozen_parameter  True: weights are constants of the graph

Without torch_npu and torchair (and the CANN toolkit they need) `check()` raises before any capture,
saying which is missing. NOT EXECUTED on an NPU: the project has none; CI runs the lowering plan
(`plan.check_plan`) and the decomposition rewrite on the CPU.
"""

from __future__ import annotations

import importlib

import torch

from ...passes.program import CompileOptions, Program
from ..base import Backend
from ..inductor.backend import InductorExecutable
from .lowering import for_ascend
from .plan import check_plan, summary

__all__ = ["AscendBackend", "AscendExecutable", "missing_dependencies"]

ASCEND_MODES = ("max-autotune", "reduce-overhead")


def missing_dependencies() -> list[str]:
    """The Ascend software this machine lacks, with the reason import gave (empty: all present)."""
    missing = []
    for module in ("torch_npu", "torchair"):
        try:
            importlib.import_module(module)
        except Exception as e:   # ImportError, or OSError when the CANN libraries are absent
            missing.append(f"{module} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    return missing


class _TorchairCompiled:
    """One graph compiled once by torchair (GE graph or captured graph, per the compiler config)."""

    def __init__(self, gm, name: str, config):
        import torchair
        self.name = name
        self.graph_module = for_ascend(gm, npu=True)
        self.fn = torch.compile(self.graph_module, backend=torchair.get_npu_backend(compiler_config=config),
                                dynamic=True)

    def __call__(self, *args):
        return self.fn(*args)


class AscendExecutable(InductorExecutable):
    """InductorExecutable's step contract over torchair-compiled graphs (no CUDA graphs)."""

    def __init__(self, program: Program, options: CompileOptions):
        from torchair.configs.compiler_config import CompilerConfig
        config = CompilerConfig()
        config.mode = options.ascend_mode
        if options.ascend_graph_dump:
            config.debug.graph_dump.type = "pbtxt"
            config.debug.graph_dump.path = options.ascend_graph_dump
        config.experimental_config.frozen_parameter = True
        self._config = config
        self.plan = summary(check_plan(program))
        super().__init__(program, options)

    def _compile(self, gm, name: str):
        return _TorchairCompiled(gm, name, self._config)


class AscendBackend(Backend):
    name = "ascend"

    def check(self, device: torch.device | str | None = None) -> None:
        """Before capture: the Ascend software is importable (else a RuntimeError naming what is missing)."""
        missing = missing_dependencies()
        if missing:
            raise RuntimeError("backend='ascend' needs torch_npu and torchair with the CANN toolkit (an Ascend NPU "
                               f"machine); missing: {'; '.join(missing)}. The lowering plan can be inspected "
                               "anywhere: graphopt.backends.ascend.lowering_plan(compiled.program)")

    def lower(self, program: Program, options: CompileOptions) -> AscendExecutable:
        if options.ascend_mode not in ASCEND_MODES:
            raise ValueError(f"ascend_mode {options.ascend_mode!r} is not accepted; accepted: {ASCEND_MODES}")
        self.check(program.cache.device)
        return AscendExecutable(program, options)
