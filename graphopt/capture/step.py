"""torch.export capture of the step functions: the main model and each MTP module over the paged cache.

One capture serves prefill and decode: the batch (B), token (T), block-table (M) and cache-block
(N) dimensions are dynamic, so a prompt chunk of 512 tokens and a decode step of 1+k tokens run
the same graph. Two captures exist because the MTP module has different inputs (the main model's
hidden states) and runs after the main model's acceptance, which a later pass fuses into one graph.

Graph signature of the main step (what every pass sees as placeholders, in order):
    input_ids    [B, T]  int64      positions  [B, T]  int64
    slot_mapping [B, T]  int64      block_tables [B, M] int64
    kv_caches_0 .. kv_caches_{L-1}  [N, block_size, kv_lora_rank + rope_dim], mutated in place
  outputs: logits [B, T, vocab], hidden [B, T, hidden] (pre-norm, the MTP's input).
MTP step d: next_ids [B, T], hidden [B, T, hidden], positions, slot_mapping, block_tables, mtp_cache
  -> logits, mtp_hidden.

The captured graph is the functional ATen graph of `ExportedProgram.run_decompositions({})`,
unlifted (`.module()`): weights are get_attr nodes, cache writes are functional `index_copy`
results copied back into the cache inputs by `copy_` nodes (one after each layer: each kind of
decoder layer is traced once and spliced in per layer, see "regional capture" below).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.export import Dim

from ..models.deepseek import DeepseekV3ForCausalLM
from ..step.model_step import MainStep, MTPStep
from ..step.paged import slot_mapping
from .splice import GraphCall, out_shapes, splice
from .workers import Worker, fork_available, pack_graph, unpack_graph


class CaptureError(RuntimeError):
    """torch.export could not capture the step; the message names the module and the operation."""


@dataclass
class CapturedGraph:
    """A captured step: the graph module plus what a pass or verifier needs to run it."""

    name: str
    graph_module: torch.fx.GraphModule
    make_inputs: Callable[[int], tuple]   # seed -> fresh valid inputs (fresh caches: they are mutated)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


class StepInputFactory:
    """Valid random step inputs: ragged positions, a shuffled block table, padding in the sink slot."""

    def __init__(self, model: DeepseekV3ForCausalLM, block_size: int, batch: int = 2, tokens: int = 3):
        self.config = model.config
        self.dtype = model.lm_head.weight.dtype
        self.device = model.lm_head.weight.device
        self.block_size, self.batch, self.tokens = block_size, batch, tokens

    def common(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        B, T, bs = self.batch, self.tokens, self.block_size
        start = torch.randint(0, 3 * bs, (B,), generator=g)                     # cached tokens before
        positions = start[:, None] + torch.arange(T)                            # [B, T]
        max_blocks = int(positions.max()) // bs + 1
        num_blocks = 1 + B * max_blocks
        blocks = (torch.randperm(num_blocks - 1, generator=g) + 1).view(B, max_blocks)  # never block 0
        slots = slot_mapping(positions, blocks, bs)
        ids = torch.randint(0, self.config.vocab_size, (B, T), generator=g)
        caches = lambda n: [(torch.randn(num_blocks, bs, self.config.kv_cache_dim, generator=g) * 0.5)
                            .to(self.dtype) for _ in range(n)]
        dev = lambda t: t.to(self.device)
        return g, dev(ids), dev(positions), dev(slots), dev(blocks), caches

    # random values are drawn on the host from a CPU generator (the same draws on every device), then
    # moved to the model's device once; explicit, so a default device set elsewhere cannot leak in
    def main(self, seed: int) -> tuple:
        with torch.device("cpu"):
            _, ids, pos, slots, blocks, caches = self.common(seed)
            return ids, pos, slots, blocks, [c.to(self.device) for c in caches(self.config.num_hidden_layers)]

    def mtp(self, seed: int) -> tuple:
        with torch.device("cpu"):
            g, ids, pos, slots, blocks, caches = self.common(seed)
            hidden = torch.randn(*ids.shape, self.config.hidden_size, generator=g).to(self.dtype).to(self.device)
            return ids, hidden, pos, slots, blocks, caches(1)[0].to(self.device)


def _dims():
    """The dynamic dimensions of every capture: batch, tokens, blocks per sequence, cache blocks."""
    return Dim("batch", min=1, max=4096), Dim("tokens", min=1, max=65536), Dim("blocks_per_seq", max=65536), \
        Dim("num_blocks", max=1 << 24)


def _dynamic_shapes(num_layers: int, mtp: bool):
    B, T, M, N = _dims()
    bt, btm, cache = {0: B, 1: T}, {0: B, 1: M}, {0: N}
    if mtp:
        return (bt, {0: B, 1: T}, bt, bt, btm, cache)
    return (bt, bt, bt, btm, [cache] * num_layers)


def _export(module: nn.Module, args: tuple, dynamic_shapes, what: str) -> torch.fx.GraphModule:
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            ep = ep.run_decompositions({})
    except Exception as e:  # export errors are long; keep the first lines and name the step
        first = "\n".join(str(e).strip().splitlines()[:12])
        raise CaptureError(f"torch.export failed while capturing {what}: {type(e).__name__}: {first}") from e
    gm = ep.module()
    # export re-checks the dtype of every .to() at run time; meta["val"] already records those
    # dtypes, and the checks would sit between the ops every pattern has to match
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


# -- regional capture: each distinct decoder layer is traced once -------------------------------------
#
# Tracing is paid per op (symbolic shapes make it ~10 ms per node on the 2-core machine), and a
# DeepSeek model is the same decoder layer repeated: 6 layers in the embedded model, 27 in V2-Lite,
# 61 in V3. Capture therefore exports one layer of each kind (the dense layers, the MoE layers, the
# MTP module's block), exports the model around them with each layer as a one-node stand-in
# (`splice.GraphCall`), and splices the layer's graph in at every call site, each over that layer's
# own weights. The result is the graph a whole-model trace gives (the same ops, weights at the same
# paths, tests/capture/test_step.py checks it), at the cost of tracing ~2 layers instead of all.

_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")   # what DecoderLayer.forward runs


class _LayerStep(nn.Module):
    """One decoder layer in capture's order: (h, cos, sin, positions, slot_mapping, block_tables, cache) -> h."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h, cos, sin, positions, slot_mapping, block_tables, cache):
        return self.layer(h, cos, sin, positions, cache, slot_mapping, block_tables)


class _LayerStandIn(nn.Module):
    """A decoder layer while the model around it is exported: the layer's forward is one stand-in
    node; its other children (an MTP module's embedding, norms and projection) stay real."""

    def __init__(self, layer: nn.Module, call: GraphCall):
        super().__init__()
        for name, child in layer.named_children():
            if name not in _LAYER_PARTS:
                setattr(self, name, child)
        self.call = call

    def forward(self, h, cos, sin, positions, kv_cache=None, slot_mapping=None, block_tables=None):
        return self.call(h, cos, sin, positions, slot_mapping, block_tables, kv_cache)[0]


def _layer_kind(layer: nn.Module) -> tuple:
    """Layers of one kind trace to the same graph: same module types, parameter shapes and dtypes."""
    kind = []
    for part in _LAYER_PARTS:
        mod = getattr(layer, part)
        kind.append(tuple((n, type(m).__name__) for n, m in mod.named_modules()))
        kind.append(tuple((n, tuple(t.shape), t.stride(), t.dtype, t.device)
                          for n, t in (*mod.named_parameters(), *mod.named_buffers())))
    return tuple(kind)


class LayerGraphs:
    """The decoder-layer graphs of one model, one per kind, traced on first use. Pass one instance to
    `capture_main` and `capture_mtp` of the same model and the MTP block reuses the main layers' graph.

    workers: layer kinds traced at once in forked processes (`capture/workers.py`) while the model
    around them is exported here; None: one per kind where fork is safe, 0: all in this process."""

    def __init__(self, model: DeepseekV3ForCausalLM, block_size: int = 16, workers: int | None = None):
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise ValueError(f"capture_workers must be None or an int >= 0, got {workers!r}")
        self.model, self.inputs = model, StepInputFactory(model, block_size)
        self.graphs: dict[tuple, torch.fx.GraphModule] = {}
        self.workers = workers
        self._pending: dict[tuple, Worker] = {}

    def start(self, layers: dict[str, nn.Module], what: str) -> None:
        """Start tracing the kinds among `layers` (path -> layer) not traced yet, in workers."""
        if self.workers == 0 or not fork_available(self.inputs.device):
            return
        for path, layer in layers.items():
            kind = _layer_kind(layer)
            if kind in self.graphs or kind in self._pending:
                continue
            if self.workers is not None and len(self._pending) >= self.workers:
                break
            name = f"{what}, layer {path}"
            self._pending[kind] = Worker(lambda layer=layer, name=name: pack_graph(self._trace_graph(layer, name)),
                                         CaptureError)

    def out_shapes(self, layer: nn.Module) -> list:
        """The layer graph's output as `splice.out_shapes` gives it: h's sizes, dtype and device (a
        decoder layer returns the next hidden states); checked against the graph in `graph()`."""
        return [([(0, 0), (0, 1), self.model.config.hidden_size], self.inputs.dtype, self.inputs.device)]

    def graph(self, layer: nn.Module, what: str) -> torch.fx.GraphModule:
        kind = _layer_kind(layer)
        if kind not in self.graphs:
            worker = self._pending.pop(kind, None)
            graph = unpack_graph(worker.result()) if worker is not None else self._trace_graph(layer, what)
            graph._codegen = torch.fx.graph.CodeGen()     # flat arguments, a flat tuple out (splice's form)
            gm = torch.fx.GraphModule(layer, graph)       # get_attr targets relative to the layer
            if out_shapes(gm) != self.out_shapes(layer):
                raise CaptureError(f"capturing {what}: the layer's outputs {out_shapes(gm)} are not the "
                                   f"hidden states {self.out_shapes(layer)} a decoder layer returns")
            self.graphs[kind] = gm
        return self.graphs[kind]

    def cancel(self) -> None:
        """Stop the workers still running (the capture that wanted them failed)."""
        for worker in self._pending.values():
            worker.cancel()
        self._pending.clear()

    def _trace_graph(self, layer: nn.Module, what: str) -> torch.fx.Graph:
        with torch.device("cpu"):
            g, _, pos, slots, blocks, caches = self.inputs.common(0)
            c = self.model.config
            h = torch.randn(*pos.shape, c.hidden_size, generator=g).to(self.inputs.dtype).to(self.inputs.device)
        with torch.no_grad():
            cos, sin = self.model.model.rotary_emb(pos, h.dtype)
        B, T, M, N = _dims()
        bt = {0: B, 1: T}
        gm = _export(_LayerStep(layer), (h, cos, sin, pos, slots, blocks, caches(1)[0].to(self.inputs.device)),
                     (bt, bt, bt, bt, bt, {0: B, 1: M}, {0: N}), what)
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op == "call_module" and not node.users:   # export's input guards: the model checks its own
                graph.erase_node(node)
            elif node.op == "get_attr":
                if not node.target.startswith("layer."):
                    raise CaptureError(f"capturing {what}: the layer's graph reads {node.target}, which is not one "
                                       "of the layer's own tensors; regional capture cannot rebind it per layer")
                node.target = node.target[len("layer."):]
        out = next(n for n in graph.nodes if n.op == "output")
        if not isinstance(out.args[0], (tuple, list)):
            out.args = ((out.args[0],),)
        return graph


def _export_regional(make_step: Callable[[nn.Module], nn.Module], model: DeepseekV3ForCausalLM,
                     layers: dict[str, nn.Module], args, dynamic, traced: LayerGraphs,
                     what: str) -> torch.fx.GraphModule:
    """Export make_step(model) with each layer in `layers` (attribute path under model ->
    layer) as a stand-in, then splice each layer's kind graph in over that layer's weights."""
    shallow = _shallow_copy(model, layers)
    calls = {}
    traced.start(layers, what)    # layer kinds trace in workers while the model around them exports here
    try:
        for path, layer in layers.items():
            calls[path] = GraphCall(None, id(layer), traced.out_shapes(layer))
            _set_path(shallow, path, _LayerStandIn(layer, calls[path]))
        gm = _export(make_step(shallow), args, dynamic, what)
        graphs = {id(layer): (f"model.{path}", traced.graph(layer, f"{what}, layer {path}"), layer)
                  for path, layer in layers.items()}
    except BaseException:
        traced.cancel()
        raise
    finally:
        for call in calls.values():
            call.release()
    splice(gm, graphs)
    _dedupe_sizes(gm)
    return gm


_SIZE_OPS = {torch.ops.aten.sym_size.int, operator.mul, operator.add, operator.sub, operator.floordiv}


def _dedupe_sizes(gm: torch.fx.GraphModule) -> None:
    """One node per distinct size expression: every spliced layer reads B and T of its inputs again."""
    seen = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SIZE_OPS or node.kwargs:
            continue
        key = (node.target, node.args)
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
        else:
            seen[key] = node
    gm.recompile()


def _layers(model, block_size: int, layers: LayerGraphs | None) -> LayerGraphs:
    if layers is None:
        return LayerGraphs(model, block_size)
    if layers.model is not model:
        raise ValueError("LayerGraphs belongs to another model; make one per model")
    if layers.inputs.block_size != block_size:
        raise ValueError(f"LayerGraphs traced with block_size {layers.inputs.block_size}, capture asks {block_size}")
    return layers


def _shallow_copy(model: nn.Module, layers) -> nn.Module:
    """A copy of model sharing every tensor, whose module dicts along each layer's path are its own,
    so stand-ins can replace layers without touching the user's model."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    for path in layers:
        mod = root
        for part in path.split(".")[:-1]:
            child = copy.copy(mod._modules[part])
            child._modules = dict(child._modules)
            mod._modules[part] = child
            mod = child
    return root


def _set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for part in parents:
        mod = mod._modules[part]
    mod._modules[leaf] = value


def capture_main(model: DeepseekV3ForCausalLM, block_size: int = 16, layers: LayerGraphs | None = None) -> CapturedGraph:
    """The main model step; `layers` shares traced decoder layers with other captures of the model."""
    inputs = StepInputFactory(model, block_size)
    blocks = {f"model.layers.{i}": layer for i, layer in enumerate(model.model.layers)}
    gm = _export_regional(MainStep, model, blocks, inputs.main(0),
                          _dynamic_shapes(model.config.num_hidden_layers, False), _layers(model, block_size, layers),
                          f"the main model step ({type(model).__name__}, {model.config.num_hidden_layers} layers)")
    names = ["input_ids", "positions", "slot_mapping", "block_tables"] + \
        [f"kv_caches_{i}" for i in range(model.config.num_hidden_layers)]
    return CapturedGraph("main", gm, inputs.main, names, ["logits", "hidden"])


def capture_mtp(model: DeepseekV3ForCausalLM, depth: int, block_size: int = 16,
                layers: LayerGraphs | None = None) -> CapturedGraph:
    """MTP module `depth`'s step; `layers` as for capture_main."""
    inputs = StepInputFactory(model, block_size)
    gm = _export_regional(lambda m: MTPStep(m, depth), model, {f"mtp.{depth}": model.mtp[depth]}, inputs.mtp(0),
                          _dynamic_shapes(1, True), _layers(model, block_size, layers), f"MTP module {depth}")
    names = ["next_ids", "hidden", "positions", "slot_mapping", "block_tables", "mtp_cache"]
    return CapturedGraph(f"mtp{depth}", gm, inputs.mtp, names, ["logits", "hidden"])
