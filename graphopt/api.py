"""`graphopt.compile` and `CompiledModel`: capture -> passes -> backend -> runtime, in that order.

    compiled = graphopt.compile(model, spec="mtp", quant="w8a8", dump_dir="dumps")
    logits = compiled(input_ids)                         # drop-in for model(input_ids)
    out = compiled.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)

The user's model is never modified: capture reads it, passes rewrite copies of the captured graphs
and register any new tensors (folded or quantised weights) on those graphs, never on the model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture.step import capture_main, capture_mtp
from .config import CompileOptions, resolve_backend
from .models.deepseek import DeepseekV3ForCausalLM
from .passes.base import PassContext
from .passes.dump import Dumper
from .passes.manager import PassManager, disabled_from_env, verify_from_env
from .passes import pipeline


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
    records: list = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


class CompiledModel:
    """The compiled step graphs plus the runtime that loops over them."""

    def __init__(self, model: DeepseekV3ForCausalLM, graphs: dict[str, torch.fx.GraphModule],
                 options: CompileOptions, spec, quant, backend: str, report: CompileReport):
        self.config = model.config
        self.graphs, self.options, self.spec, self.quant = graphs, options, spec, quant
        self.backend, self.report = backend, report
        self._device = model.lm_head.weight.device
        self._dtype = model.lm_head.weight.dtype
        self._model = model  # read-only: shapes, new_kv_caches; never modified
        self._step_provider = None

    @property
    def main_graph(self) -> torch.fx.GraphModule:
        return self.graphs["main"]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain forward: input_ids [B, T] -> logits [B, T, vocab], like the model's own forward."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D LongTensor [batch, tokens], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"input of {T} tokens is longer than max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        bs = self.options.block_size
        per_seq = -(-T // bs)
        caches = self._model.new_kv_caches(1 + B * per_seq, bs)
        tables = 1 + torch.arange(B * per_seq, device=self._device).view(B, per_seq)
        positions = torch.arange(T, device=self._device).expand(B, T)
        slots = tables.gather(1, positions // bs) * bs + positions % bs
        logits, _ = self.main_graph(input_ids.to(self._device), positions, slots, tables, caches)
        return logits

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
        params = SamplingParams(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                                min_p=min_p or 0.0, seed=seed, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, stop=stop)
        return self.engine().generate([list(p) for p in prompts], params)

    def engine(self, **engine_kwargs):
        """A runtime engine serving requests with this model's compiled step graphs."""
        from .runtime.engine import Engine
        kwargs = dict(max_batch_size=self.options.max_batch_size, prefill_chunk_size=self.options.prefill_chunk_size,
                      cache_budget_bytes=self.options.cache_budget_bytes)
        kwargs.update(engine_kwargs)
        return Engine(self._provider(), **kwargs)

    def _provider(self):
        if self._step_provider is None:
            if "step" in self.graphs:
                from .capture.spec_step import SpecStepProvider
                k = self.spec.num_speculative_tokens if self.spec is not None else 0
                self._step_provider = SpecStepProvider(self.graphs["step"], self.graphs["prefill"], self.config, k,
                                                       self.options.block_size, self._dtype, self._device)
            else:  # fuse_spec_step switched off: plain decoding over the main graph, bookkeeping in eager ops
                from .runtime.reference_provider import ReferenceStepProvider
                self._step_provider = ReferenceStepProvider(_GraphForward(self.main_graph, self._model),
                                                            block_size=self.options.block_size)
        return self._step_provider

    @property
    def stats(self) -> dict | None:
        """Speculative decoding statistics over every generate call so far (None without spec)."""
        provider = self._provider()
        return provider.stats.summary() if self.spec is not None and hasattr(provider, "stats") else None


class _GraphForward:
    """The compiled main step graph behind the model's forward signature (what a provider calls)."""

    def __init__(self, gm: torch.fx.GraphModule, model: DeepseekV3ForCausalLM):
        self.gm, self.config, self.new_kv_caches = gm, model.config, model.new_kv_caches

    def __call__(self, input_ids, positions, kv_caches, slot_mapping, block_tables, return_hidden=False):
        logits, hidden = self.gm(input_ids, positions, slot_mapping, block_tables, kv_caches)
        return (logits, hidden) if return_hidden else logits


def compile(model: Any, *, spec: Any = None, quant: Any = None, backend: str = "auto",
            dump_dir: str | None = None, verify: bool = False, **options: Any) -> CompiledModel:
    """Capture `model` (main + MTP), run the pass pipeline, lower to `backend`; see the module doc."""
    opts = CompileOptions.from_kwargs(options)
    backend = resolve_backend(backend)
    ref = _as_reference_model(model)
    spec_config = _resolve_spec(spec, ref)
    quant_config = _resolve_quant(quant)
    verify = verify or verify_from_env()
    dump_dir = dump_dir or os.environ.get("GRAPHOPT_DUMP") or None
    dumper = Dumper(dump_dir) if dump_dir else None
    report = CompileReport()

    t0 = time.perf_counter()
    captured = {"main": capture_main(ref, opts.block_size)}
    if spec_config is not None:
        for d in range(len(ref.mtp)):
            captured[f"mtp{d}"] = capture_mtp(ref, d, opts.block_size)
    report.seconds["capture"] = time.perf_counter() - t0

    per_graph, step_phases = pipeline.build_pipeline(quant=quant_config is not None)
    manager = PassManager(per_graph + step_phases, set(opts.disable_passes) | disabled_from_env(), verify, dumper)
    options = {**vars(opts), "spec": spec_config, "quant": quant_config}
    state = {"spec": spec_config, "quant": quant_config}   # shared by all graphs (calibration statistics)
    if quant_config is not None and quant_config.needs_calibration:
        state.update(_calibration_inputs(ref, quant_config, opts.block_size))
    graphs: dict[str, torch.fx.GraphModule] = {}
    t0 = time.perf_counter()
    for name in sorted(captured, key=lambda n: n != "main"):  # mtp graphs after main, before the fusion
        cap = captured[name]
        if dumper:
            dumper.write_captured(name, cap.graph_module)
        ctx = PassContext(ref.config, options, cap.make_inputs, name, state=state)
        graphs[name] = manager.run(cap.graph_module, ctx, per_graph)
    state["mtp_graphs"] = [graphs[f"mtp{d}"] for d in range(len(ref.mtp)) if f"mtp{d}" in graphs]
    step_ctx = PassContext(ref.config, options, captured["main"].make_inputs, "step", state=state)
    # the fusion copies the main graph's nodes, not its weights, and leaves graphs["main"] as it was
    step = manager.run(graphs["main"], step_ctx, step_phases)
    if "spec_prefill_graph" in state:
        graphs["step"], graphs["prefill"] = step, state["spec_prefill_graph"]
    elif spec_config is not None:
        raise ValueError("spec= needs the fuse_spec_step pass; it was disabled")
    report.seconds["passes"] = time.perf_counter() - t0
    report.records = manager.records

    lower = _backend_lowering(backend)
    graphs = {name: lower(gm) for name, gm in graphs.items()}
    if dumper:
        for name, gm in graphs.items():
            report.notes[f"{name} picture"] = dumper.write_final(name, gm)
        report.notes.update({f"{k} seconds": f"{v:.2f}" for k, v in report.seconds.items()})
        report.notes["backend"] = backend
        dumper.write_report(report.records, report.notes)
    return CompiledModel(ref, graphs, opts, spec_config, quant_config, backend, report)


def _backend_lowering(backend: str):
    if backend == "eager":
        from .backends.eager import lower
        return lower
    raise AssertionError(backend)


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


def _calibration_inputs(model: DeepseekV3ForCausalLM, quant_config, block_size: int) -> dict:
    """Real calibration windows (QuantConfig.calibration's mixed sources) fed through each graph.

    The default sources are text of the embedded model's tokenizer; a model with another vocabulary
    gets none here and quant_calibrate falls back to random valid steps (its pass record says so)."""
    from .quant import calibration
    try:
        tokens = calibration.calibration_tokens(quant_config.calibration, model.config.vocab_size)
    except ValueError:
        return {}
    return {"calibration_inputs": calibration.step_inputs(model, tokens, block_size).__getitem__}


def _resolve_quant(quant: Any):
    if quant is None:
        return None
    from .quant.config import resolve_quant_config
    return resolve_quant_config(quant)
