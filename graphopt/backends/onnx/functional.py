"""`functional_graph(gm)`: a flat, functional copy of a Program graph, the form ONNX needs.

ONNX has no mutation, so a graph that writes its caches in place (`graphopt.kv_cache_write`, after
passes/reinplace_cache_writes.py) is turned back into one that returns them:

  * every `kv_cache_write(cache, slots, entry)` becomes `cache_write(cache, slots, entry) -> new cache`
    (an `index_put` on the flat [N * bs, D] view: one ScatterND in ONNX), and every later read of that
    cache, or of a view of it taken before the write, reads the new version;
  * the updated caches are appended to the outputs, in placeholder order (`cache_inputs(gm)`);
  * every other graphopt:: op is replaced by its ONNX-friendly torch function (decompositions.py),
    which torch.export then traces into ATen;
  * the pytree signature (kv_caches: list) becomes flat placeholders, export's guard call is dropped.

Weights are shared with `gm`, nothing is copied. Before / after, layer 0 of the main graph:

    view_2 = torch.ops.aten.view.default(kv_caches_0, [-1, 80])
    kv_cache_write = torch.ops.graphopt.kv_cache_write.default(kv_caches_0, view_3, view_4)
    view_5 = torch.ops.aten.view.default(view_2, [sym_size_int, 16, 80])
    index = torch.ops.aten.index.Tensor(view_5, [block_tables])
->
    cache_write = graphopt_backends_onnx_functional_cache_write(kv_caches_0, view_3, view_4)
    view_2 = torch.ops.aten.view.default(cache_write, [-1, 80])
    view_5 = torch.ops.aten.view.default(view_2, [sym_size_int, 16, 80])
    index = torch.ops.aten.index.Tensor(view_5, [block_tables])
    ...
    return (linear, add_3, cache_write, ...)
"""

from __future__ import annotations

import torch
from torch import fx

from .decompositions import decomposition

__all__ = ["cache_inputs", "cache_write", "functional_graph"]

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default}
_WRITE = torch.ops.graphopt.kv_cache_write.default
_CACHE_PREFIXES = ("kv_cache", "mtp_cache")


def cache_write(cache: torch.Tensor, slots: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
    """kv_cache_write as a value: cache [N, bs, D] with cache.view(-1, D)[slots] = entry -> new cache."""
    D = cache.shape[-1]
    flat = cache.reshape(-1, D).index_put((slots.reshape(-1),), entry.reshape(-1, D).to(cache.dtype))
    return flat.view(cache.shape)


def cache_inputs(gm: fx.GraphModule) -> list[str]:
    """The cache placeholders of a Program graph, in order (kv_caches_*, mtp_caches_* / mtp_cache)."""
    return [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith(_CACHE_PREFIXES)]


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _VIEWS


def functional_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The flat functional copy described in the module doc; outputs: gm's outputs, then the caches."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    caches = set(cache_inputs(gm))
    current: dict[fx.Node, fx.Node] = {}               # cache placeholder -> its latest version
    views: dict[fx.Node, fx.Node] = {}                 # view of a cache -> the placeholder it views
    made: dict[tuple[fx.Node, fx.Node], fx.Node] = {}  # (view, version) -> the view over that version

    def value(node):
        if not isinstance(node, fx.Node):
            return node
        if node in current:
            return current[node]
        if node in views:                              # re-taken over the cache's latest version
            version = current[views[node]]
            if (node, version) not in made:
                src = value(node.args[0])
                rest = fx.node.map_arg((node.args[1:], node.kwargs), value)
                made[(node, version)] = graph.call_function(node.target, (src, *rest[0]), rest[1])
            return made[(node, version)]
        return env[node]

    out_node = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
            if node.name in caches:
                current[node] = env[node]
        elif node.op == "call_module" and node.target == "_guards_fn":
            continue
        elif _is_view(node) and isinstance(node.args[0], fx.Node) and (node.args[0] in current or node.args[0] in views):
            views[node] = node.args[0] if node.args[0] in current else views[node.args[0]]
        elif node.op == "call_function" and node.target is _WRITE:
            cache, slots, entry = node.args
            root = cache if cache in current else views[cache]
            current[root] = graph.call_function(cache_write, (current[root], value(slots), value(entry)))
        elif node.op == "output":
            out_node = node
        else:
            new = graph.node_copy(node, value)
            if node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "graphopt":
                fn = decomposition(node.target)
                if fn is None:
                    raise NotImplementedError(f"onnx backend: no ONNX lowering for {node.target} (node {node.name})")
                new.target = fn
            env[node] = new
    outputs = fx.node.map_arg(out_node.args[0], value)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    graph.output((*outputs, *(current[n] for n in current)))
    out = fx.GraphModule(gm, graph)
    if hasattr(out, "_guards_fn"):
        delattr(out, "_guards_fn")
    out.graph.eliminate_dead_code()
    out.recompile()
    return out
