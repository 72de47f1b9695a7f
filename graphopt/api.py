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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import backends
from .capture.step import LayerGraphs, capture_main, capture_mtp
from .config import CompileOptions, resolve_backend
from .models.deepseek import DeepseekV3ForCausalLM
from .passes.dump import Dumper
from .passes.base import PassContext
from .passes.manager import PassManager, verify_from_env
from .passes.pipeline import check_options
from .passes.program import CompileState, Program
from .runtime.request import config_eos
from .runtime.text import TextPieces, output_text
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


class CompiledModel(torch.nn.Module):
    """A backend's Executable plus the runtime engine that loops over it; an inference-only nn.Module.

    `compiled(input_ids)` returns what the wrapped model returns (a logits tensor for graphopt's
    model, a `CausalLMOutputWithPast` for a transformers model). `state_dict()` holds the graphs'
    own tensors (no copies), each once, named after the first graph that holds it ("main.<name>").
    `generate` / `stream` take token ids or text (text needs `tokenizer`).
    """

    def __init__(self, executable, options: CompileOptions, spec, quant, backend: str, report: CompileReport,
                 tokenizer=None, wraps: str = "graphopt", parallel: dict | None = None):
        super().__init__()
        self.executable, self.options, self.spec, self.quant = executable, options, spec, quant
        self.backend, self.report, self.tokenizer, self.wraps = backend, report, tokenizer, wraps
        self.parallel = parallel        # sharded compiles: tp, ep, rank, world_size, group_name
        self.config = executable.config
        self.training = False
        self._engine = None
        self._engine_size = (0, 0)   # (rows, positions per row) the current engine was built for
        for name, gm in executable.program.graphs.items():
            self.add_module(name, gm)
        self._aliases = _aliases(self)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_post_hook(_aliases_are_loaded)

    @property
    def program(self) -> Program:
        return self.executable.program

    @property
    def graphs(self) -> dict[str, torch.fx.GraphModule]:
        return self.program.graphs

    @property
    def main_graph(self) -> torch.fx.GraphModule:
        return self.program.main

    @property
    def device(self) -> torch.device:
        return self.program.cache.device

    @property
    def dtype(self) -> torch.dtype:
        return self.program.cache.dtype

    def __repr__(self) -> str:
        return (f"CompiledModel(backend={self.backend!r}, device={self.device}, dtype={self.dtype}, "
                f"spec={self.spec!r}, quant={self.quant!r}, graphs={list(self.graphs)})")

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """input_ids [B, T] -> logits [B, T, vocab], like the model's own forward.

        attention_mask [B, T] of 0/1: each row's ones must be contiguous (left or right padding);
        each row runs on its own tokens, positions from 0, and padding positions get zero logits."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D LongTensor [batch, tokens], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"input of {T} tokens is longer than max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        if attention_mask is None or bool((attention_mask == 1).all()):
            logits = self.executable.forward(input_ids)
        else:
            logits = self._forward_padded(input_ids, attention_mask)
        if self.wraps == "transformers":
            from transformers.modeling_outputs import CausalLMOutputWithPast
            return CausalLMOutputWithPast(logits=logits)
        return logits

    def _forward_padded(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        spans = _token_spans(mask, input_ids.shape)
        by_length: dict[int, list[tuple[int, int]]] = {}
        for row, (start, end) in enumerate(spans):
            by_length.setdefault(end - start, []).append((row, start))
        out = None
        for length, rows in by_length.items():   # rows of one length run as one batch
            logits = self.executable.forward(torch.stack([input_ids[r, s:s + length] for r, s in rows]))
            if out is None:
                out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
            for i, (r, s) in enumerate(rows):
                out[r, s:s + length] = logits[i]
        return out

    # -- not movable in place ---------------------------------------------------------------------
    def to(self, *args, **kwargs):
        """Returns self when already on that device and dtype; anything else is an error saying why."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if (device is None or _same_device(device, self.device)) and (dtype is None or dtype == self.dtype):
            return self
        raise RuntimeError(
            f"CompiledModel.to({device or dtype}): the compiled graphs, caches and kernels were lowered for "
            f"{self.device} / {self.dtype} and cannot be moved in place. Compile on the target instead "
            f"(graphopt.compile(model.to(device, dtype))), or save and lower there: "
            f"compiled.save(dir); graphopt.load_compiled(dir, device=...)")

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self):
        return self.to("cpu")

    def _apply(self, fn, recurse=True):   # .half(), .float(), .type(...): the same answer as .to
        raise RuntimeError("a CompiledModel's weights cannot be converted in place (.half(), .float(), ...): "
                           "compile the model in the dtype you want (graphopt.compile(model.to(dtype)))")

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a CompiledModel is inference-only: train the original model, then compile it again")
        return self

    # -- generation -------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, min_p: float | None = None,
                 seed: int | None = None, stop=(), ignore_eos: bool = False):
        """Generated continuations (prompt excluded), in prompt order.

        prompts: a string, a list of strings (needs a tokenizer; returns text), a list of token-id
        lists (ragged) or a [B, T] tensor (returns token-id lists, eos included). Stops on the
        config's eos (eos_token_id None) or eos_token_id; ignore_eos=True stops only on
        max_new_tokens and stop strings. Text output ends before the eos and before a stop string."""
        ids, as_text, single = self._prompts(prompts)
        engine, _ = self._submit(ids, max_new_tokens, dict(
            temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0,
            seed=seed, stop=stop), eos_token_id, ignore_eos)
        outputs = engine.run_until_done()
        if not as_text:
            return [o.token_ids for o in outputs]
        texts = [output_text(self.tokenizer, o) for o in outputs]
        return texts[0] if single else texts

    def stream(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, eos_token_id: int | None = None, min_p: float | None = None,
               seed: int | None = None, stop=(), ignore_eos: bool = False) -> Iterator[tuple[int, Any]]:
        """Yields (prompt index, new text or new token ids) as steps produce them; the pieces of one
        prompt add up to what `generate` returns for it. Arguments as for `generate`."""
        ids, as_text, _ = self._prompts(prompts)
        engine, rids = self._submit(ids, max_new_tokens, dict(
            temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0,
            seed=seed, stop=stop), eos_token_id, ignore_eos)
        index = {rid: i for i, rid in enumerate(rids)}
        texts = {rid: TextPieces(self.tokenizer) for rid in rids} if as_text else {}
        taken = set()
        try:
            while engine.has_unfinished():
                for e in engine.step():
                    output = engine.take_output(e.request_id) if e.finished else None
                    taken.update([e.request_id] if e.finished else [])
                    piece = texts[e.request_id].add(e.new_token_ids, output) if as_text else e.new_token_ids
                    if piece:
                        yield index[e.request_id], piece
        finally:   # the caller stopped early: end the rest so the engine is free for the next call
            for rid in set(rids) - taken:
                engine.abort(rid)
                engine.take_output(rid)

    def _prompts(self, prompts) -> tuple[list[list[int]], bool, bool]:
        """(token-id lists, given as text, given as one string)."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"prompts tensor must be [batch, tokens], got shape {tuple(prompts.shape)}")
            return prompts.tolist(), False, False
        single = isinstance(prompts, str)
        prompts = [prompts] if single else prompts
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass tokenizer= to graphopt.compile or "
                                 "graphopt.load_compiled (anything with encode(str) -> ids and decode(ids) -> str), "
                                 "or give token-id lists")
            return [list(self.tokenizer.encode(p)) for p in prompts], True, single
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompts):
            raise ValueError("prompts must be a string, a list of strings, a list of token-id lists or a 2-D LongTensor")
        return [list(p) for p in prompts], False, False

    def _submit(self, prompts: list[list[int]], max_new_tokens: int, sampling: dict, eos_token_id, ignore_eos):
        """The engine with one request per prompt added, and their request ids."""
        from .runtime.request import SamplingParams
        eos = None if ignore_eos else eos_token_id if eos_token_id is not None else config_eos(self.config)
        params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=eos, **sampling)
        # seed None: prompt i draws with seed i on every call (the engine is reused, its request ids grow)
        per_prompt = [params if params.seed is not None else replace(params, seed=i) for i in range(len(prompts))]
        longest = max((len(p) for p in prompts), default=0) + max_new_tokens
        engine = self._engine_for(len(prompts), longest)
        return engine, [engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]

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
                      cache_budget_bytes=self.options.cache_budget_bytes, tokenizer=self.tokenizer)
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
        extra = {"backend": self.backend, "wraps": self.wraps, "options": dataclasses.asdict(self.options),
                 "report": {"seconds": dict(self.report.seconds), "notes": dict(self.report.notes)},
                 "parallel": self.parallel}
        save_program(self.program, directory, _graphopt_version(), extra)


def compile(model: Any, *, spec: Any = None, quant: Any = None, backend: str = "auto",
            dump_dir: str | None = None, verify: bool = False, tokenizer: Any = None, tp: int = 1, ep: int = 1,
            shards: Any = None, **options: Any) -> CompiledModel:
    """Capture `model` (main + MTP), run the pass pipeline, lower to `backend`; see the module doc.

    tp / ep: tensor / expert parallel ranks (each 1 or the world size of the initialised default
    process group; every rank calls compile with the same arguments, see docs/distributed.md).
    shards: this rank's slices from `graphopt.models.shard_load.load_shard` (which returned `model`).

    tokenizer: for text prompts and stop strings (encode(str) -> ids, decode(ids) -> str); None: the
    embedded tokenizer when `model` is the embedded model (same config), else none. progress=
    (an option): one line per phase on stderr; unset, only when stderr is a terminal."""
    # validate everything before any heavy work
    opts = CompileOptions.from_kwargs(options)
    if "progress" not in options:
        opts.progress = sys.stderr.isatty()
    ref = _as_reference_model(model)
    tokenizer = _resolve_tokenizer(tokenizer, ref.config)
    backend = resolve_backend(backend, ref.lm_head.weight.device)
    lowering = backends.get(backend)
    lowering.check(ref.lm_head.weight.device)          # e.g. ascend without torch_npu: before any capture
    state = CompileState(spec=_resolve_spec(spec, ref), quant=_resolve_quant(quant))
    parallel = _resolve_parallel(tp, ep, ref, backend, state.quant, shards, verify or verify_from_env(),
                                 opts.shard_one_rank)
    check_options(opts, state, parallel)
    if state.quant is not None and state.quant.needs_calibration:   # data errors before capture
        state.calibration_inputs = _calibration_inputs(ref, state.quant, opts.block_size, tokenizer)
    verify = verify or verify_from_env()
    dump_dir = dump_dir or os.environ.get("GRAPHOPT_DUMP") or None
    dumper = Dumper(dump_dir) if dump_dir else None
    report = CompileReport()
    progress = _Progress(opts.progress)

    t0 = time.perf_counter()
    layers = LayerGraphs(ref, opts.block_size, opts.capture_workers)   # each kind of decoder layer is traced once (capture/step.py)
    captured = [capture_main(ref, opts.block_size, layers=layers)]
    if state.spec is not None:
        captured += [capture_mtp(ref, d, opts.block_size, layers=layers) for d in range(len(ref.mtp))]
    w = ref.lm_head.weight
    layout = CacheLayout.for_config(ref.config, opts.block_size, w.dtype, w.device, num_mtp=len(captured) - 1)
    program = Program.from_captured(captured, ref.config, layout, state)
    report.seconds["capture"] = time.perf_counter() - t0
    progress.done("capture", ", ".join(program.names))

    t0 = time.perf_counter()
    phases, disabled = check_options(opts, state, parallel)   # as passes.pipeline.run_pipeline, plus the progress callback
    if dumper:
        for name, gm in program.graphs.items():
            dumper.write_captured(name, gm)
    manager = PassManager(phases, disabled, verify, dumper, on_phase=progress.done)
    program = manager.run_program(program, PassContext(program.model_config, opts, state=program.state))
    report.seconds["passes"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    executable = lowering.lower(program, opts)
    report.seconds["lower"] = time.perf_counter() - t0
    progress.done("lower", backend)
    progress.close()
    report.records = program.state.records
    report.notes.update(program.state.notes)
    report.notes["backend"] = backend
    if parallel is not None:
        report.notes["parallel"] = (f"tp={parallel.tp} ep={parallel.ep} rank {parallel.rank} of "
                                    f"{parallel.world_size} (process group {parallel.group_name!r})")
    if dumper:
        for name, gm in program.graphs.items():
            report.notes[f"{name} picture"] = dumper.write_final(name, gm)
        dumper.write_report(report.records, report.all_notes())
    wraps = "graphopt" if isinstance(model, DeepseekV3ForCausalLM) else "transformers"
    shard = None if parallel is None else {"tp": parallel.tp, "ep": parallel.ep, "rank": parallel.rank,
                                           "world_size": parallel.world_size, "group_name": parallel.group_name}
    return CompiledModel(executable, opts, state.spec, state.quant, backend, report, tokenizer, wraps, shard)


def load_compiled(directory: str | os.PathLike, device: torch.device | str | None = None,
                  backend: str | None = None, tokenizer: Any = None) -> CompiledModel:
    """The CompiledModel saved by `CompiledModel.save(directory)`: no capture, no passes, only the
    lowering. device: where weights and caches go (None: where it was compiled); backend: lower with
    another registered backend than the saved one; tokenizer: as for `compile`. A manifest from another graphopt or torch version,
    or a missing or corrupt file, is an error that names it. A sharded artefact (one directory per rank)
    loads only on its own rank of an initialised world of the size it was compiled for."""
    from .passes.program_io import load_program, read_manifest
    t0 = time.perf_counter()
    manifest = read_manifest(directory, _graphopt_version())
    _check_parallel(manifest.get("parallel"), directory)
    backend = resolve_backend(backend or manifest["backend"], device or manifest["cache"]["device"])
    lowering = backends.get(backend)
    lowering.check(device or manifest["cache"]["device"])
    opts = CompileOptions.from_kwargs(manifest["options"])
    program = load_program(directory, manifest, device)
    report = CompileReport(records=program.state.records, seconds=dict(manifest["report"]["seconds"]),
                           notes={**manifest["report"]["notes"], "backend": backend})
    report.seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = lowering.lower(program, opts)
    report.seconds["lower"] = time.perf_counter() - t0
    report.notes["loaded from"] = str(directory)
    return CompiledModel(executable, opts, program.state.spec, program.state.quant, backend, report,
                         _resolve_tokenizer(tokenizer, program.model_config), manifest.get("wraps", "graphopt"),
                         manifest.get("parallel"))


def _check_parallel(saved: dict | None, directory) -> None:
    """A sharded artefact's graphs hold one rank's slices and name its process group: before anything is
    read, the process must be that rank of an initialised world of the same size (ValueError otherwise)."""
    if saved is None:
        return
    import torch.distributed as dist
    want = (f"{directory} holds rank {saved['rank']} of a tp={saved['tp']} ep={saved['ep']} compile over "
            f"{saved['world_size']} process{'es' if saved['world_size'] != 1 else ''} (process group "
            f"{saved['group_name']!r}); load it on that rank of "
            f"an initialised world of {saved['world_size']} (e.g. torchrun --nproc-per-node {saved['world_size']}, "
            "each rank loading its own directory)")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{want}; this process has no initialised process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    group = getattr(dist.group.WORLD, "group_name", saved["group_name"])
    if (world, rank, group) != (saved["world_size"], saved["rank"], saved["group_name"]):
        raise ValueError(f"{want}; this process is rank {rank} of {world} (process group {group!r})")


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


_PARALLEL_BACKENDS = ("eager", "inductor")   # the backends that run torch.distributed's functional collectives


def _resolve_parallel(tp: int, ep: int, model: DeepseekV3ForCausalLM, backend: str, quant, shards, verify: bool,
                      one_rank: bool = False):
    """The ParallelPlan of this rank (None for tp = ep = 1 without the option shard_one_rank, `one_rank`);
    every error before capture."""
    from .passes.sharding import ParallelPlan, ShardError
    plan = ParallelPlan.resolve(tp, ep, model.config, one_rank=one_rank)
    if plan is None:
        if shards is not None:
            raise ShardError("shards= (from load_shard) needs tp= / ep= above 1 (or shard_one_rank=True)")
        return None
    if shards is not None:
        if shards.model is not model:
            raise ShardError("shards= belong to another model: pass the model load_shard returned with them")
        if quant is not None or verify:
            raise ShardError("a model from load_shard holds only this rank's slices: quant= (which quantises whole "
                             "weights) and verify mode (which runs the unsharded graphs) need models.load instead")
        plan = plan.with_shards(shards)
    if backend not in _PARALLEL_BACKENDS:
        raise ShardError(f"tp= / ep= (and shard_one_rank) run on backends {_PARALLEL_BACKENDS}; got backend "
                         f"{backend!r}")
    if quant is not None:
        schemes = {quant.scheme, quant.mtp_scheme, *(s for _, s in quant.overrides)} - {None}
        if schemes - {"w8a8"} or quant.kv_cache is not None:
            raise ShardError(f"tp= / ep= (and shard_one_rank) support quant scheme 'w8a8' (without a quantised KV "
                             f"cache); got schemes {sorted(schemes)}, kv_cache={quant.kv_cache!r}")
    return plan


def _calibration_inputs(model: DeepseekV3ForCausalLM, quant_config, block_size: int, tokenizer):
    """Real calibration windows (QuantConfig.calibration: its token ids or mixed sources) as each
    graph's step inputs, with a description of their data for the quant_calibrate record.

    Text sources are tokenised with `tokenizer` (the one compile resolved: given, or the embedded one
    for the embedded model); token ids need none. Every data error is raised here, before capture."""
    from .quant import calibration
    return calibration.graph_calibration(model, quant_config.calibration, tokenizer, block_size)


def _resolve_quant(quant: Any):
    if quant is None:
        return None
    from .quant.config import resolve_quant_config
    return resolve_quant_config(quant)


def _resolve_tokenizer(tokenizer: Any, config):
    from .models.tokenizer import tokenizer_for
    return tokenizer_for(config, tokenizer)


class _Progress:
    """One line per compile phase on stderr (tqdm): capture, each pass phase per graph, lowering."""

    def __init__(self, enabled: bool):
        from tqdm import tqdm   # tqdm's monitor thread is switched off when graphopt.models is imported
        self.bar = tqdm(desc="graphopt compile", unit="phase", disable=not enabled, file=sys.stderr,
                        bar_format="{desc}: {n} phases, {elapsed}{postfix}")
        self.start = time.perf_counter()

    def done(self, phase: str, graph: str) -> None:
        if self.bar.disable:
            return
        now = time.perf_counter()
        self.bar.write(f"graphopt compile: {phase:<10} {graph:<20} {now - self.start:6.2f} s", file=sys.stderr)
        self.bar.update()
        self.start = now

    def close(self) -> None:
        self.bar.close()


def _token_spans(mask: torch.Tensor, shape) -> list[tuple[int, int]]:
    """(start, end) of each row's ones; a ValueError unless every row is one contiguous run of ones."""
    if tuple(mask.shape) != tuple(shape) or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"attention_mask must be 0/1 of the input's shape {tuple(shape)}, got "
                         f"{tuple(mask.shape)}")
    spans = []
    for row, ones in enumerate(mask.bool().cpu()):
        where = ones.nonzero().flatten().tolist()
        if not where or where[-1] - where[0] + 1 != len(where):
            raise ValueError(f"attention_mask row {row} is not supported: each row must hold one contiguous "
                             f"run of at least one 1 (no padding, left padding or right padding)")
        spans.append((where[0], where[-1] + 1))
    return spans


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _aliases(module: torch.nn.Module) -> list[str]:
    """state_dict names of tensors already listed under an earlier name (graphs share their weights)."""
    seen, aliases = set(), []
    for name, t in torch.nn.Module.state_dict(module, keep_vars=True).items():
        if id(t) in seen:
            aliases.append(name)
        seen.add(id(t))
    return aliases


def _drop_aliases(module, state_dict, prefix, local_metadata) -> None:
    for name in module._aliases:
        state_dict.pop(prefix + name, None)


def _aliases_are_loaded(module, incompatible_keys) -> None:
    aliases = set(module._aliases)   # loaded through the name that is kept: the same tensor
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in aliases]
