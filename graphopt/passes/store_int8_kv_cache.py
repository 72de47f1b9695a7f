"""C8 storage: the Program's KV caches become int8 tensors (QuantConfig kv_cache="int8").

Why. quant_insert makes the cached latent what an int8 cache returns (quantize_kv -> dequantize_kv
after kv_a_layernorm), but the write still stores the dequantised value in a 16/32-bit cache: the
numbers of C8 without its memory. This pass stores the int8 codes instead (layout: ops/kv_int8.py,
512 latent codes + the rope part's bytes) and reads them through graphopt.mla_paged_attention_int8,
which decodes each gathered entry to the very value the float cache held: the logits are unchanged
bit for bit, the cache costs 640 instead of 1152 bytes a token a layer for a bf16 model.

A module pass (the caches' dtype and width are the Program's `CacheLayout`, shared by every graph),
run last, on the in-place form (after reinplace_cache_writes), in every graph. For each cache input:
    write  kv_cache_write(cache, slots, view(cat([dequantize_kv(q, s, dt), k_pe], -1)))
        -> kv_cache_write(cache, slots, view(kv_int8_entry(q, k_pe, rope_dtype)))
    read   mla_paged_attention(q_nope, q_pe, view(view(cache, [-1, D]), [N, bs, D]), ...)
        -> mla_paged_attention_int8(q_nope, q_pe, view(view(cache, [-1, D']), [N, bs, D']), s, rope_dtype, ...)
with D = R + r, D' = R + r * itemsize(rope_dtype) and rope_dtype the float dtype the cache had.
Not matched (a clear error naming the graph and node, since every cache shares one layout): a cache
written with anything but the C8 latent (quant_insert's C8 not applied, e.g. to an MTP module), or
read by anything but mla_paged_attention (use_paged_attention switched off), or a graph without
in-place writes (reinplace_cache_writes switched off). Each graph's
`make_inputs` is wrapped to hand int8 caches (the float ones encoded with that layer's scales).
On CUDA the Triton MLA decode kernel also serves mla_paged_attention_int8 (it decodes each latent tile
as it loads it: the values the float cache held, 1 byte a value read), but that path has run in
Triton's interpreter only, not yet on a GPU. So on CUDA the pass leaves the Program as it is (C8
emulated over the model-dtype cache, the verified layout) unless GRAPHOPT_INT8_KV_CACHE_ON_CUDA=1
asks for int8 storage, and says which in its note; elsewhere an int8 cache runs the reference gather
+ decode + attention. (The one earlier GPU run of int8 caches, before that kernel, inductor against
eager in bf16 with exact tokens, failed without a message left to read.)

Before (main graph of the random test model, layer 0, after the memory phase):
    dequantize_kv_default = torch.ops.graphopt.dequantize_kv.default(quantize_kv_default, _quant_model__layers__0__self_attn__kv_a_layernorm_kv_scale, torch.float32)
    cat_2 = torch.ops.aten.cat.default([dequantize_kv_default, squeeze], -1)
    view_3 = torch.ops.aten.view.default(cat_2, [mul_170, -1])
    kv_cache_write_default = torch.ops.graphopt.kv_cache_write.default(kv_caches_0, view_2, view_3)
    mla_paged_attention_default = torch.ops.graphopt.mla_paged_attention.default(getitem_3, cat, view_4, block_tables, positions, model_model_layers_0_self_attn_kv_b_proj_weight, slice_tensor, slice_tensor_1, 0.2041241452319315, 8)
After (view_1 / view_4, the cache's views, now [-1, 64] / [N, 4, 64] instead of 40):
    kv_int8_entry_default = torch.ops.graphopt.kv_int8_entry.default(quantize_kv_default, squeeze, torch.float32)
    view_default_3 = torch.ops.aten.view.default(kv_int8_entry_default, [mul_170, -1])
    kv_cache_write_default = torch.ops.graphopt.kv_cache_write.default(kv_caches_0, view_2, view_default_3)
    mla_paged_attention_int8_default = torch.ops.graphopt.mla_paged_attention_int8.default(getitem_3, cat, view_4, _quant_model__layers__0__self_attn__kv_a_layernorm_kv_scale, torch.float32, block_tables, positions, model_model_layers_0_self_attn_kv_b_proj_weight, slice_tensor, slice_tensor_1, 0.2041241452319315, 8)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..ops import kv_int8 as _kv_int8  # noqa: F401  registers graphopt::kv_int8_entry
from ..ops import paged_attention as _paged  # noqa: F401  registers graphopt::mla_paged_attention_int8
from ..ops.kv_int8 import encode_kv_int8, int8_kv_dim
from .base import ModulePass, ModuleResult, PassContext
from .patterns import call_op, fake_mode_of
from .program import Program

__all__ = ["StoreInt8KVCachePass", "C8StorageError", "CUDA_OPT_IN", "int8_storage_on_cuda"]

aten, OPS = torch.ops.aten, torch.ops.graphopt
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default}


CUDA_OPT_IN = "GRAPHOPT_INT8_KV_CACHE_ON_CUDA"


def int8_storage_on_cuda() -> bool:
    """Whether CUDA Programs store int8 caches (opt-in until the int8 kernel path has run on a GPU)."""
    return os.environ.get(CUDA_OPT_IN, "") not in ("", "0", "false", "False")


class C8StorageError(ValueError):
    """A cache of the Program cannot be stored as int8 (the message names the graph and the node)."""


@dataclass
class _Cache:
    placeholder: fx.Node
    write: fx.Node            # kv_cache_write
    entry_views: list         # views from the cat to the written entry, innermost first
    cat: fx.Node
    codes: fx.Node            # quantize_kv output (int8 latent)
    k_pe: fx.Node
    scale: fx.Node            # get_attr of the layer's kv_scale
    views: list               # views of the cache, in graph order
    reads: list               # mla_paged_attention nodes


class StoreInt8KVCachePass(ModulePass):
    name = "store_int8_kv_cache"

    def run(self, program: Program, ctx: PassContext) -> ModuleResult:
        quant = program.state.quant
        if quant is None or quant.kv_cache != "int8" or program.cache.cache_dtype is not None:
            return ModuleResult(program, modified=False)
        layout = program.cache
        if layout.device.type == "cuda" and not int8_storage_on_cuda():
            return ModuleResult(program, modified=False, notes=[
                "C8 on CUDA keeps its emulated layout (the int8 round trip stored in the model-dtype cache) "
                f"until the Triton kernel that reads int8 caches has run on a GPU; {CUDA_OPT_IN}=1 stores int8"])
        R = program.model_config.kv_lora_rank
        r = program.model_config.qk_rope_head_dim
        rope_dtype, old_dim = layout.dtype, layout.kv_cache_dim
        new_dim = int8_kv_dim(R, r, rope_dtype)
        if old_dim != R + r:
            raise C8StorageError(f"store_int8_kv_cache: the cache width {old_dim} is not kv_lora_rank + "
                                 f"qk_rope_head_dim = {R} + {r}")
        plans = {name: [_match(program[name], name, p) for p in _cache_inputs(program[name])]
                 for name in program.names}
        for name, caches in plans.items():
            if not caches:                         # every step graph has caches; their writes are in place
                raise C8StorageError(f"store_int8_kv_cache: graph {name!r} has no in-place cache write "
                                     "(graphopt.kv_cache_write); it needs reinplace_cache_writes before it")
        for name, caches in plans.items():
            gm = program[name]
            for c in caches:
                _rewrite(gm, c, rope_dtype, old_dim, new_dim)
            if caches:
                _drop_export_guards(gm)
            gm.graph.lint()
            gm.recompile()
            if name in program.make_inputs:
                program.make_inputs[name] = _int8_inputs(program.make_inputs[name], gm, caches, rope_dtype)
        program.cache = dataclasses.replace(layout, kv_cache_dim=new_dim, cache_dtype=torch.int8)
        n = sum(len(c) for c in plans.values())
        now, was = program.cache.bytes_per_token(False), layout.bytes_per_token(False)
        note = (f"{n} cache input(s) stored as int8 in {len(plans)} graph(s): {now} bytes per token over "
                f"{layout.num_layers} layers, was {was} in {str(rope_dtype).removeprefix('torch.')} (x{now / was:.3f})")
        return ModuleResult(program, modified=n > 0, matches=n, notes=[note])


def _cache_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Placeholders some graphopt.kv_cache_write writes into: the graph's KV caches."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"
            and any(u.target is OPS.kv_cache_write.default and u.args[0] is n for u in n.users)]


def _fail(graph: str, node: fx.Node, why: str):
    raise C8StorageError(f"store_int8_kv_cache: graph {graph!r}, {node.format_node()}: {why}. Every cache shares "
                         "one layout, so C8 storage needs every cache written with the C8 latent and read by "
                         "mla_paged_attention; disable_passes=('store_int8_kv_cache',) keeps float caches "
                         "with C8 numerics")


def _match(gm: fx.GraphModule, graph: str, cache: fx.Node) -> _Cache:
    views, reads, writes, todo = [], [], [], [cache]
    while todo:
        for u in todo.pop(0).users:
            if u.op == "call_module" or u.target is aten.sym_size.int:
                continue
            if u.target in _VIEWS:
                views.append(u)
                todo.append(u)
            elif u.target is OPS.kv_cache_write.default and u.args[0] is cache:
                writes.append(u)
            elif u.target is OPS.mla_paged_attention.default and u.args[2] in views:
                reads.append(u)
            else:
                _fail(graph, u, f"reads the cache {cache.name}; only views, kv_cache_write and mla_paged_attention can")
    if len(writes) != 1 or not reads:
        _fail(graph, cache, f"{len(writes)} write(s) and {len(reads)} read(s) of the cache; expected one and some")
    write = writes[0]
    entry_views, node = [], write.args[2]
    while node.target in _VIEWS:
        entry_views.insert(0, node)
        node = node.args[0]
    cat = node
    parts = cat.args[0] if cat.target is aten.cat.default and len(cat.args[0]) == 2 else None
    dq = parts[0] if parts else None
    if dq is None or dq.target is not OPS.dequantize_kv.default or dq.args[0].target is not OPS.quantize_kv.default:
        _fail(graph, write, f"the entry written into {cache.name} is not cat([dequantize_kv(quantize_kv(latent)), k_pe])")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return _Cache(cache, write, entry_views, cat, dq.args[0], parts[1], dq.args[1],
                  sorted(views, key=order.get), reads)


def _rewrite(gm: fx.GraphModule, c: _Cache, rope_dtype: torch.dtype, old_dim: int, new_dim: int) -> None:
    fake = fake_mode_of(gm)
    graph = gm.graph
    with graph.inserting_before(c.write):                     # the write: int8 codes + rope bytes
        entry = call_op(graph, fake, OPS.kv_int8_entry.default, (c.codes, c.k_pe, rope_dtype))
        for v in c.entry_views:
            entry = call_op(graph, fake, v.target, (entry, _widen(v.args[1], old_dim, new_dim), *v.args[2:]))
    c.write.args = (c.placeholder, c.write.args[1], entry)
    dequantized = c.cat.args[0][0]
    for node in (*reversed(c.entry_views), c.cat, dequantized):  # the float entry, now unused
        if not node.users:
            graph.erase_node(node)
    old = c.placeholder.meta["val"]                            # the cache: int8 [N, bs, D']
    with fake:
        c.placeholder.meta["val"] = old.new_empty((old.shape[0], old.shape[1], new_dim), dtype=torch.int8)
    for v in c.views:                                          # its views: D -> D'
        v.args = (v.args[0], _widen(v.args[1], old_dim, new_dim), *v.args[2:])
        args, kwargs = fx.node.map_arg((v.args, v.kwargs), lambda n: n.meta["val"])
        with fake:
            v.meta["val"] = v.target(*args, **kwargs)
    for read in c.reads:                                       # the read: decode inside the attention
        q_nope, q_pe, view, *rest = read.args
        with graph.inserting_before(read):
            new = call_op(graph, fake, OPS.mla_paged_attention_int8.default,
                          (q_nope, q_pe, view, c.scale, rope_dtype, *rest))
        new.meta.setdefault("stack_trace", read.meta.get("stack_trace"))
        read.replace_all_uses_with(new)
        graph.erase_node(read)


def _drop_export_guards(gm: fx.GraphModule) -> None:
    """torch.export's `_guards_fn` asserts the float cache's width (size()[2] == R + r); the int8 cache
    is wider by design. Lowering and saving drop the call anyway (backends, program_io)."""
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def _widen(shape, old_dim: int, new_dim: int):
    """A view's shape with the cache width D (its last entry) replaced by D'."""
    shape = list(shape)
    if shape and isinstance(shape[-1], int) and shape[-1] == old_dim:
        shape[-1] = new_dim
    return shape


def _int8_inputs(make_inputs, gm: fx.GraphModule, caches: list[_Cache], rope_dtype: torch.dtype):
    """make_inputs with each float cache input encoded in the int8 layout, with its own layer's scales."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scales = {placeholders.index(c.placeholder): _attr(gm, c.scale.target) for c in caches}

    def make(seed: int):
        leaves, spec = pytree.tree_flatten(make_inputs(seed))
        for i, scale in scales.items():
            leaves[i] = encode_kv_int8(leaves[i], scale, rope_dtype)
        return pytree.tree_unflatten(leaves, spec)

    return make


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
