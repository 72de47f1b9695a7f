"""`graphopt.compile` and `CompiledModel`: validate -> capture -> pipeline -> backend, in that order.

    compiled = graphopt.compile(model, spec="mtp", quant="w8a8", dump_dir="dumps")
    logits = compiled(input_ids)                         # drop-in for model(input_ids)
    out = compiled.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)

The data path never doubles back: the model is captured into a Program, the pipeline rewrites the
Program, a backend lowers it to an Executable (the step contract plus a plain forward), and the
runtime (`Engine`) drives the Executable. The user's model is never modified: capture reads it,
passes rewrite copies of the captured graphs and register any new tensors (folded or quantised
weights) on those graphs, never on the model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import backends
from .capture.step import capture_main, capture_mtp
from .config import CompileOptions, resolve_backend
from .models.deepseek import DeepseekV3ForCausalLM
from .passes.dump import Dumper
from .passes.manager import verify_from_env
from .passes.pipeline import check_options, run_pipeline
from .passes.program import CompileState, Program
from .step.contract import window
from .step.paged import CacheLayout, blocks_for

__all__ = ["CompileReport", "CompiledModel", "compile", "load_compiled"]


def _as_reference_model(model: Any) -> DeepseekV3ForCausalLM:
    if isinstance(model, DeepseekV3ForCausalLM):
        return model
    if type(model).__name__ == "DeepseekV3ForCausalLM" and type(model).__module__.startswith("transformers"):
        from .models.hf_interop import from_transformers
        return from_transformers(model)
    raise TypeError(f"graphopt.compile supports graphopt.models.DeepseekV3ForCausalLM and transformers' "
                    f"DeepseekV3ForCausalLM; got {type(model).__module__}.{type(model).__name__}")


@dataclass
class CompileReport:
    """Pass records (pipeline order), seconds per stage, and notes: the passes' own ("graph/pass"
    -> text, e.g. that calibration ran on random steps), the backend, pictures, and whatever a tool
    adds (`graphopt bench` adds its table). `render()` is the Markdown the dump report shows."""

    records: list = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def render(self, title: str = "graphopt compile report") -> str:
        from .passes.dump import render_markdown
        return render_markdown(self.records, self.all_notes(), title)

    def all_notes(self) -> dict[str, str]:
        return {**self.notes, **{f"{k} seconds": f"{v:.2f}" for k, v in self.seconds.items()}}


class CompiledModel:
    """A backend's Executable plus the runtime engine that loops over it."""

    def __init__(self, executable, options: CompileOptions, spec, quant, backend: str, report: CompileReport):
        self.executable, self.options, self.spec, self.quant = executable, options, spec, quant
        self.backend, self.report = backend, report
        self.config = executable.config
        self._engine = None
        self._engine_size = (0, 0)   # (rows, positions per row) the current engine was built for

    @property
    def program(self) -> Program:
        return self.executable.program

    @property
    def graphs(self) -> dict[str, torch.fx.GraphModule]:
        return self.program.graphs

    @property
    def main_graph(self) -> torch.fx.GraphModule:
        return self.program.main

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain forward: input_ids [B, T] -> logits [B, T, vocab], like the model's own forward."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D LongTensor [batch, tokens], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"input of {T} tokens is longer than max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        return self.executable.forward(input_ids)

    forward = __call__

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, min_p: float | None = None,
                 seed: int | None = None, stop=()) -> list[list[int]]:
        """Generated ids per prompt (prompt excluded). prompts: list of token-id lists (ragged) or [B, T]."""
        from .runtime.request import SamplingParams
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"prompts tensor must be [batch, tokens], got shape {tuple(prompts.shape)}")
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompts):
            raise ValueError("prompts must be a list of token-id lists or a 2-D LongTensor")
        prompts = [list(p) for p in prompts]
        params = SamplingParams(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                                min_p=min_p or 0.0, seed=seed, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, stop=stop)
        # seed None: prompt i draws with seed i on every call (the engine is reused, its request ids grow)
        per_prompt = [params if seed is not None else replace(params, seed=i) for i in range(len(prompts))]
        longest = max((len(p) for p in prompts), default=0) + max_new_tokens
        return self._engine_for(len(prompts), longest).generate(prompts, per_prompt)

    def _engine_for(self, rows: int, positions: int):
        """The one engine of this model, rebuilt larger only when a call needs more rows or positions."""
        rows = max(1, min(rows, self.options.max_batch_size))
        positions = min(positions, self.config.max_position_embeddings)
        have_rows, have_positions = self._engine_size
        if self._engine is None or self._engine.has_unfinished() or rows > have_rows or positions > have_positions:
            rows, positions = max(rows, have_rows), max(positions, have_positions)
            kwargs = {}
            if self.options.cache_budget_bytes is None:   # every row at full length at once, plus the sink
                k = self.executable.num_speculative_tokens
                kwargs["num_blocks"] = 1 + rows * blocks_for(positions + window(k), self.executable.block_size)
            self._engine = self.engine(max_batch_size=rows, **kwargs)
            self._engine_size = (rows, positions)
        return self._engine

    def engine(self, **engine_kwargs):
        """A new runtime engine serving requests with this model's Executable."""
        from .runtime.engine import Engine
        kwargs = dict(max_batch_size=self.options.max_batch_size, prefill_chunk_size=self.options.prefill_chunk_size,
                      cache_budget_bytes=self.options.cache_budget_bytes)
        kwargs.update(engine_kwargs)
        if kwargs.get("num_blocks") is not None:
            kwargs.pop("cache_budget_bytes", None)
        return Engine(self.executable, **kwargs)

    @property
    def stats(self) -> dict | None:
        """Speculative decoding statistics over every generate call so far (None without spec)."""
        return self.executable.stats if self.spec is not None else None

    def save(self, directory: str | os.PathLike) -> None:
        """Write the optimised Program (graphs, weights, a manifest) to `directory`, atomically;
        `graphopt.load_compiled(directory)` brings it back without capture or passes."""
        from .passes.program_io import save_program
        extra = {"backend": self.backend, "options": dataclasses.asdict(self.options),
                 "report": {"seconds": dict(self.report.seconds), "notes": dict(self.report.notes)}}
        save_program(self.program, directory, _graphopt_version(), extra)


def compile(model: Any, *, spec: Any = None, quant: Any = None, backend: str = "auto",
            dump_dir: str | None = None, verify: bool = False, **options: Any) -> CompiledModel:
    """Capture `model` (main + MTP), run the pass pipeline, lower to `backend`; see the module doc."""
    # validate everything before any heavy work
    opts = CompileOptions.from_kwargs(options)
    ref = _as_reference_model(model)
    backend = resolve_backend(backend, ref.lm_head.weight.device)
    lowering = backends.get(backend)
    state = CompileState(spec=_resolve_spec(spec, ref), quant=_resolve_quant(quant))
    check_options(opts, state)
    verify = verify or verify_from_env()
    dump_dir = dump_dir or os.environ.get("GRAPHOPT_DUMP") or None
    dumper = Dumper(dump_dir) if dump_dir else None
    report = CompileReport()

    t0 = time.perf_counter()
    captured = [capture_main(ref, opts.block_size)]
    if state.spec is not None:
        captured += [capture_mtp(ref, d, opts.block_size) for d in range(len(ref.mtp))]
    w = ref.lm_head.weight
    layout = CacheLayout.for_config(ref.config, opts.block_size, w.dtype, w.device, num_mtp=len(captured) - 1)
    if state.quant is not None and state.quant.needs_calibration:
        state.calibration_inputs = _calibration_inputs(ref, state.quant, opts.block_size)
    program = Program.from_captured(captured, ref.config, layout, state)
    report.seconds["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    program = run_pipeline(program, opts, dumper, verify)
    report.seconds["passes"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    executable = lowering.lower(program, opts)
    report.seconds["lower"] = time.perf_counter() - t0
    report.records = program.state.records
    report.notes.update(program.state.notes)
    report.notes["backend"] = backend
    if dumper:
        for name, gm in program.graphs.items():
            report.notes[f"{name} picture"] = dumper.write_final(name, gm)
        dumper.write_report(report.records, report.all_notes())
    return CompiledModel(executable, opts, state.spec, state.quant, backend, report)


def load_compiled(directory: str | os.PathLike, device: torch.device | str | None = None,
                  backend: str | None = None) -> CompiledModel:
    """The CompiledModel saved by `CompiledModel.save(directory)`: no capture, no passes, only the
    lowering. device: where weights and caches go (None: where it was compiled); backend: lower with
    another registered backend than the saved one. A manifest from another graphopt or torch version,
    or a missing or corrupt file, is an error that names it."""
    from .passes.program_io import load_program, read_manifest
    t0 = time.perf_counter()
    manifest = read_manifest(directory, _graphopt_version())
    backend = resolve_backend(backend or manifest["backend"], device or manifest["cache"]["device"])
    lowering = backends.get(backend)
    opts = CompileOptions.from_kwargs(manifest["options"])
    program = load_program(directory, manifest, device)
    report = CompileReport(records=program.state.records, seconds=dict(manifest["report"]["seconds"]),
                           notes={**manifest["report"]["notes"], "backend": backend})
    report.seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = lowering.lower(program, opts)
    report.seconds["lower"] = time.perf_counter() - t0
    report.notes["loaded from"] = str(directory)
    return CompiledModel(executable, opts, program.state.spec, program.state.quant, backend, report)


def _graphopt_version() -> str:
    import graphopt   # late: graphopt/__init__ imports this module before it sets __version__
    return graphopt.__version__


def _resolve_spec(spec: Any, model: DeepseekV3ForCausalLM):
    if spec is None:
        return None
    from .spec import resolve_spec
    spec = resolve_spec(spec)
    if len(model.mtp) == 0:
        raise ValueError("spec='mtp' needs MTP weights, but the model has no MTP module "
                         "(num_nextn_predict_layers = 0); load a checkpoint that has them "
                         "(model.layers.{num_hidden_layers}.*) or pass mtp_weights= to from_transformers")
    return spec


def _calibration_inputs(model: DeepseekV3ForCausalLM, quant_config, block_size: int):
    """Real calibration windows (QuantConfig.calibration's mixed sources) fed through each graph.

    The default sources are text of the embedded model's tokenizer; a model with another vocabulary
    gets none here and quant_calibrate falls back to random valid steps (its pass record says so)."""
    from .quant import calibration
    try:
        tokens = calibration.calibration_tokens(quant_config.calibration, model.config.vocab_size)
    except ValueError:
        return None
    return calibration.step_inputs(model, tokens, block_size).__getitem__


def _resolve_quant(quant: Any):
    if quant is None:
        return None
    from .quant.config import resolve_quant_config
    return resolve_quant_config(quant)
