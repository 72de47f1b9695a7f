"""What the sharding passes share: the parallel plan, the weight sites they split, the collectives they
insert, and the one shape re-propagation that makes a graph consistent again after its weights shrank.

    plan = ParallelPlan.resolve(tp=2, ep=2, config=model.config)   # checks the process group and the sizes
    ShardTensorParallelPass(plan), ShardExpertsPass(plan)          # passes/pipeline.py: the shard phase

A plan splits heads when tp spans the world (`splits_heads`) and experts when ep does
(`splits_experts`). A world of one rank with the compile option `shard_one_rank` gets the plan
tp = ep = world = 1, which splits both: every weight into its one piece (the whole tensor, shared,
not copied) and every collective a real graph node over the one-rank group, the sharded step whose
cost `benchmarks/shard_one_rank.py` measures against the unsharded one.

A rank's Program is its own: the sharding passes slice each weight to this rank's part and register the
slice on the graph (`_tp_<site>_<field>`, `_ep_<site>_<field>`), so the graphs of two ranks differ in
their tensors and in the rank-dependent constants (an expert-id offset), not in their ops. Collectives
are `torch.ops._c10d_functional` ops (the functional collectives of torch.distributed): graph nodes
like any other, with fake implementations, so the sharded graph is still an ordinary functional graph
that the spec fusion splices and a backend lowers; the eager backend runs them on the process group
named in the graph (`group_name`), inductor lowers them natively.

Re-propagation. A captured graph bakes sizes into its view shapes: `view(linear_2, [s5, s18, 8, 48])`
splits 8 heads. After a weight is sliced, every node downstream of it gets its `meta["val"]` recomputed
from its inputs' (fake implementations, the graph's own fake mode); a view whose input lost a factor f
on one dimension gets that factor taken off the output dimension that holds the input dimension's
outermost part (heads are the outer factor of `[.., H * d]`, and a rank's slice is a contiguous run
of heads): [s5, s18, 384] -> view [.., 8, 48] becomes [.., 4, 48]; [.., 4, 32] -> view [.., 256]
becomes [.., 128]; kv_b_proj [256, 64] -> view [8, 64, 64] becomes [4, 64, 64]. A view this rule
cannot place is an error naming the node, never a silent guess.
"""

from __future__ import annotations

import copy
import math
import operator
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher

from .patterns import fake_mode_of

__all__ = ["COLLECTIVES", "ParallelPlan", "ShardError", "all_gather_last", "all_reduce", "check_loaded", "copy_graph",
           "count_collectives", "repropagate", "shard_tensor", "snapshot", "weight_site"]

c10d = torch.ops._c10d_functional
aten = torch.ops.aten
COLLECTIVES = {"all_reduce": c10d.all_reduce.default, "all_gather": c10d.all_gather_into_tensor.default}
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


class ShardError(ValueError):
    """A model, plan or graph the sharding passes cannot shard; the message says which part and why."""


@dataclass(frozen=True)
class ParallelPlan:
    """tp: ranks that split attention heads, dense / shared MLPs and the vocabulary; ep: ranks that split
    the routed experts. Both are 1 or the world size (one group of ranks does both)."""

    tp: int
    ep: int
    rank: int
    world_size: int
    group_name: str
    # from models.shard_load.load_shard: id(full-shape placeholder) -> (dim, this rank's slice); the
    # placeholders were never filled, so the passes must take the slice instead of cutting one
    preloaded: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def splits_heads(self) -> bool:
        """ShardTensorParallelPass runs: tp spans the world (at world size 1: one piece, real collectives)."""
        return self.tp == self.world_size

    @property
    def splits_experts(self) -> bool:
        """ShardExpertsPass runs: ep spans the world."""
        return self.ep == self.world_size

    def with_shards(self, shards) -> "ParallelPlan":
        """This plan reading the slices `shards` (a models.shard_load.RankShards) loaded; a ShardError
        when they were loaded for another tp, ep or rank."""
        if (shards.tp, shards.ep, shards.rank) != (self.tp, self.ep, self.rank):
            raise ShardError(f"shards= were loaded for tp={shards.tp} ep={shards.ep} rank {shards.rank}; this "
                             f"compile is tp={self.tp} ep={self.ep} on rank {self.rank}")
        return replace(self, preloaded={id(full): (dim, part) for full, dim, part in shards.parts()})

    @classmethod
    def resolve(cls, tp: int, ep: int, config, group=None, one_rank: bool = False) -> "ParallelPlan | None":
        """The plan for this process, or None for tp = ep = 1; a ShardError before any capture for a
        process group that is missing or of another size, or for sizes the model does not divide by.
        one_rank (the compile option shard_one_rank): the plan tp = ep = 1 over a world of one rank,
        which still shards (see the module doc)."""
        for name, n in (("tp", tp), ("ep", ep)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ShardError(f"{name} must be a positive int, got {n!r}")
        if one_rank:
            return cls._one_rank(tp, ep, group)
        if tp == 1 and ep == 1:
            return None
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ShardError(f"tp={tp}, ep={ep} needs torch.distributed initialised first: launch with torchrun "
                             f"and call torch.distributed.init_process_group (see docs/distributed.md)")
        group = group or dist.group.WORLD
        world = dist.get_world_size(group)
        for name, n in (("tp", tp), ("ep", ep)):
            if n not in (1, world):
                raise ShardError(f"{name}={n} does not match the process group's world size {world}: "
                                 f"{name} must be 1 or {world} (one group of ranks shards heads and experts)")
        _check_divisible(config, tp, ep)
        return cls(tp, ep, dist.get_rank(group), world, group.group_name)

    @classmethod
    def _one_rank(cls, tp: int, ep: int, group) -> "ParallelPlan":
        if (tp, ep) != (1, 1):
            raise ShardError(f"shard_one_rank=True shards over a world of one rank and takes tp=1, ep=1; got tp={tp}, "
                             f"ep={ep} (over more ranks, pass tp= / ep= without shard_one_rank)")
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ShardError("shard_one_rank=True needs torch.distributed initialised over a world of one rank first, "
                             "e.g. torch.distributed.init_process_group('gloo' or 'nccl', rank=0, world_size=1) "
                             "(see docs/distributed.md)")
        group = group or dist.group.WORLD
        world = dist.get_world_size(group)
        if world != 1:
            raise ShardError(f"shard_one_rank=True needs a world of one rank; the process group has {world} ranks "
                             f"(to shard over them, pass tp={world} and / or ep={world} without shard_one_rank)")
        return cls(1, 1, dist.get_rank(group), 1, group.group_name)


def _check_divisible(config, tp: int, ep: int) -> None:
    sizes = {"num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size,
             "intermediate_size": config.intermediate_size}
    if config.n_shared_experts:
        sizes["moe_intermediate_size * n_shared_experts"] = config.moe_intermediate_size * config.n_shared_experts
    bad = [f"{k} = {v}" for k, v in sizes.items() if v % tp]
    if bad:
        raise ShardError(f"tp={tp} must divide {', '.join(bad)}")
    if config.n_routed_experts and config.n_routed_experts % ep:
        raise ShardError(f"ep={ep} must divide n_routed_experts = {config.n_routed_experts}")


# -- weight sites -------------------------------------------------------------------------------------

_FLOAT = re.compile(r"(?:^|\.)((?:model\.layers|mtp)\.\d+\..+|lm_head)\.(weight|gate_up_proj|down_proj)$")
_QUANT = re.compile(r"^_quant_(.+?)_(weight|scale|group_scale|zero|smooth_inv|input_scale|bias|codebook)$")


def weight_site(target: str) -> tuple[str, str] | None:
    """(model-level site, field) of a get_attr target: `model.model.layers.0.self_attn.o_proj.weight` ->
    ("model.layers.0.self_attn.o_proj", "weight"); a quantised tensor `_quant_model__layers__0__self_attn
    __o_proj_scale` -> ("model.layers.0.self_attn.o_proj", "scale"); stacked experts
    `model.model.layers.1.mlp.experts.gate_up_proj` -> ("model.layers.1.mlp.experts", "gate_up_proj")."""
    m = _QUANT.match(target)
    if m:
        return m[1].replace("__", "."), m[2]
    m = _FLOAT.search(target)
    return (m[1], m[2]) if m else None


def shard_tensor(gm: fx.GraphModule, node: fx.Node, dim: int, parts: int, index: int, prefix: str,
                 cache: dict, preloaded: dict | None = None) -> fx.Node:
    """Point get_attr `node` at part `index` of `parts` of its tensor along `dim` (a copy of its own, so
    the full tensor can go once nothing holds it; a single part is the tensor itself, shared, not
    copied), registered on gm as `_<prefix>_<target>`. `cache` (one per pass run) makes a tensor that
    several graphs read (lm_head in main and MTP) one slice; `preloaded` (ParallelPlan.preloaded)
    gives the slice the shard-only loader read instead."""
    full = _attr(gm, node.target)
    size = full.shape[dim]
    if size % parts:
        raise ShardError(f"{node.target}: dimension {dim} of shape {tuple(full.shape)} is not divisible by {parts}")
    step = size // parts
    key = (id(full), dim)
    if key not in cache:
        loaded = (preloaded or {}).get(id(full))
        if loaded is not None:
            want = full.shape[:dim] + (step,) + full.shape[dim + 1:]
            if loaded[0] != dim or tuple(loaded[1].shape) != tuple(want):
                raise ShardError(f"{node.target}: the loaded shard is dim {loaded[0]} {tuple(loaded[1].shape)}; "
                                 f"this pass splits dim {dim} into {tuple(want)}")
            part = loaded[1]
        elif parts == 1:
            part = full.detach()     # a world of one rank: the whole tensor is this rank's piece
        else:
            part = full.detach().narrow(dim, index * step, step).clone()
        cache[key] = (full, part)   # full: keeps id(full) from being reused while the pass runs
    part = cache[key][1]
    name = f"_{prefix}_" + re.sub(r"\W", "_", node.target.replace(".", "__"))
    if isinstance(full, torch.nn.Parameter):
        gm.register_parameter(name, torch.nn.Parameter(part, requires_grad=False))
    else:
        gm.register_buffer(name, part)
    node.target = name
    node.meta.pop("val", None)          # repropagate() sets it from the new tensor
    return node


def check_loaded(program, plan: ParallelPlan) -> None:
    """After the shard phase: no graph may still read a placeholder of the shard-only loader (a weight
    no pass split would be read as the uninitialised memory it is)."""
    if not plan.preloaded:
        return
    for name, gm in program.graphs.items():
        for node in gm.graph.nodes:
            if node.op == "get_attr" and id(_attr(gm, node.target)) in plan.preloaded:
                raise ShardError(f"graph {name!r} still reads {node.target} whole, but load_shard loaded only this "
                                 f"rank's slice of it; a sharding pass that should split it did not run")


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph, reading gm's tensors: the sharding passes rewrite the
    copy, so the Program's graph before the pass stays as it was (the dumps show before and after)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    return new


# -- collectives --------------------------------------------------------------------------------------

def all_reduce(graph: fx.Graph, x: fx.Node, plan: ParallelPlan) -> fx.Node:
    """sum over ranks of x (same shape); every use of x after this point should read the result."""
    reduced = graph.call_function(COLLECTIVES["all_reduce"], (x, "sum", plan.group_name))
    return graph.call_function(c10d.wait_tensor.default, (reduced,))


def all_gather_last(graph: fx.Graph, x: fx.Node, plan: ParallelPlan) -> fx.Node:
    """x [..., n] on each rank -> [..., world * n], rank r's part at [r * n, (r + 1) * n): the collective
    gathers along dim 0, so the parts are split off it again and joined on the last dim (over one rank
    the gathered tensor is x's own layout: no split and join, which would copy the logits)."""
    gathered = graph.call_function(COLLECTIVES["all_gather"], (x, plan.world_size, plan.group_name))
    waited = graph.call_function(c10d.wait_tensor.default, (gathered,))
    if plan.world_size == 1:
        return waited
    chunks = graph.call_function(aten.chunk.default, (waited, plan.world_size, 0))
    parts = [graph.call_function(operator.getitem, (chunks, i)) for i in range(plan.world_size)]
    return graph.call_function(aten.cat.default, (parts, -1))


def count_collectives(gm: fx.GraphModule) -> dict[str, int]:
    """{"all_reduce": n, "all_gather": m}: the collectives a step of this graph issues."""
    targets = {t: k for k, t in COLLECTIVES.items()}
    counts = dict.fromkeys(COLLECTIVES, 0)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            counts[targets[node.target]] += 1
    return counts


# -- re-propagation -----------------------------------------------------------------------------------

def snapshot(gm: fx.GraphModule) -> dict:
    """What repropagate() needs to know of the graph before a pass changes it: node -> meta["val"], and
    (node, "input") -> the meta["val"] a view's input had (that input may be replaced meanwhile)."""
    old: dict[Any, Any] = {n: n.meta.get("val") for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _VIEWS and isinstance(n.args[0], fx.Node):
            old[(n, "input")] = n.args[0].meta.get("val")
    return old


def repropagate(gm: fx.GraphModule, old: dict) -> None:
    """Recompute meta["val"] of every node downstream of a changed one (a resharded get_attr, a new node,
    one whose inputs changed), fixing view shapes as the module doc says. `old`: snapshot(gm) taken
    before the pass changed anything (the view rule reads the sizes the graph had)."""
    fake = fake_mode_of(gm)
    dirty: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if "val" not in node.meta:
                t = _attr(gm, node.target)
                node.meta["val"] = fake.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t
                dirty.add(node)
            continue
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        if "val" in node.meta and not any(n in dirty for n in inputs):
            continue
        if node.target in _VIEWS and node.args[0] in dirty and (node, "input") in old:
            _fix_view(node, old[(node, "input")], node.args[0].meta["val"], old[node])
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        try:
            with fake, enable_python_dispatcher():
                val = node.target(*args, **kwargs)
        except Exception as e:
            raise ShardError(f"after sharding, node {node.format_node()} no longer fits its inputs: "
                             f"{type(e).__name__}: {e}") from e
        before = node.meta.get("val")
        node.meta["val"] = val
        if before is None or not _same(before, val):
            dirty.add(node)
    gm.graph.lint()
    gm.recompile()


def _fix_view(node: fx.Node, old_in, new_in, old_out) -> None:
    changed = [d for d, (a, b) in enumerate(zip(old_in.shape, new_in.shape)) if not _same_size(a, b)]
    if not changed:
        return
    where = f"view {node.format_node()}"
    if len(changed) != 1 or not all(isinstance(s, int) for s in old_in.shape[changed[0]:]):
        raise ShardError(f"{where}: its input changed on dimensions {changed} ({tuple(old_in.shape)} -> "
                         f"{tuple(new_in.shape)}); the sharding rule places one static dimension")
    d = changed[0]
    factor = old_in.shape[d] // new_in.shape[d]
    extent = math.prod(old_in.shape[d:])          # elements of one step of the dimension before d
    stride, shape = 1, list(node.args[1])
    for j in reversed(range(len(old_out.shape))):
        size = old_out.shape[j]
        if not isinstance(size, int):
            break
        if stride * size == extent and size % factor == 0 and isinstance(shape[j], int):
            if shape[j] != -1:
                shape[j] = size // factor
            node.args = (node.args[0], shape, *node.args[2:])
            return
        stride *= size
        if stride > extent:
            break
    raise ShardError(f"{where}: cannot tell which output dimension holds the sharded input dimension {d} "
                     f"({tuple(old_in.shape)} -> {tuple(new_in.shape)}, output {tuple(old_out.shape)})")


def _same_size(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.dim() == b.dim() and all(_same_size(x, y) for x, y in zip(a.shape, b.shape))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b)
