"""Attend over the paged cache directly: gather + position mask + `graphopt.mla_attention` -> `graphopt.mla_paged_attention`.

Why. The captured model reads each sequence's context by gathering its blocks (`cache[block_tables]`,
a [B, M * bs, R + r] copy per layer and step, M the block-table width) and masks slots past each
query's position. The paged op receives the cache, the block tables and the positions instead, so
a kernel (backends/inductor/kernels/mla_decode.py) reads only the blocks a row needs, straight from
the cache, and nothing of size M * bs is materialised. Its reference is that same gather and mask,
so on the CPU the numbers are bit for bit those of the graph it replaces.

What is matched, from each mla_attention node (after rewrite_mla_absorbed):
    latent, k_pe = split(view(index(cache, [block_tables])), [R, r], -1)   (a cast to q's dtype allowed)
    mask         = arange(S)[None, None, None, :] <= positions[:, None, :, None]   (unsqueeze / expand)
Checked: the cache is 3-d [N, bs, R + r], the gathered view is [B, M * bs, R + r], positions is a
[B, T] integer tensor, the arange starts at 0 with step 1.
Not matched: any other mask (additive, sliding window), a context not gathered from one cache.

Before (main graph, layer 0):
    index = torch.ops.aten.index.Tensor(view_4, [block_tables])
    view_6 = torch.ops.aten.view.default(index, [sym_size_int_34, mul_214, 40])
    split_with_sizes_2 = torch.ops.aten.split_with_sizes.default(view_6, [32, 8], -1)
    arange = torch.ops.aten.arange.default(mul_214, device = cpu, pin_memory = False)
    le_4 = torch.ops.aten.le.Tensor(unsqueeze_7, unsqueeze_9)
    mla_attention = torch.ops.graphopt.mla_attention.default(getitem, cat, getitem_4, getitem_5, w, slice_1, slice_2, le_4, 0.25, 8)
After:
    mla_paged_attention = torch.ops.graphopt.mla_paged_attention.default(getitem, cat, view_4, block_tables, positions, w, slice_1, slice_2, 0.25, 8)
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..ops import paged_attention  # noqa: F401  registers torch.ops.graphopt.mla_paged_attention
from .base import GraphPass, PassContext, PassResult
from .patterns import call_op, fake_mode_of

__all__ = ["UsePagedAttentionPass"]

aten = torch.ops.aten
_MLA = torch.ops.graphopt.mla_attention.default
_PAGED = torch.ops.graphopt.mla_paged_attention.default
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default}
_CASTS = {aten._to_copy.default, aten.to.dtype}
_BROADCAST = {aten.unsqueeze.default, aten.expand.default}


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _skip(node, targets):
    while _is(node, *targets):
        node = node.args[0]
    return node


def _context(latent: fx.Node, k_pe: fx.Node, dtype) -> tuple[fx.Node, fx.Node] | None:
    """(cache, block_tables) when latent / k_pe are the two halves of a gathered, flattened cache."""
    if not (_is(latent, operator.getitem) and _is(k_pe, operator.getitem) and latent.args[0] is k_pe.args[0]
            and (latent.args[1], k_pe.args[1]) == (0, 1)):
        return None
    split = latent.args[0]
    if not _is(split, aten.split_with_sizes.default) or split.args[2] not in (-1, 2):
        return None
    node = _skip(split.args[0], _VIEWS)
    if _is(node, *_CASTS):
        node = _skip(node.args[0], _VIEWS)
    if not _is(node, aten.index.Tensor) or len(node.args[1]) != 1:
        return None
    cache, tables = node.args[0], node.args[1][0]
    c, t, gathered = _val(cache), _val(tables), _val(split.args[0])
    if not (isinstance(c, torch.Tensor) and c.dim() == 3 and isinstance(t, torch.Tensor) and t.dim() == 2
            and isinstance(gathered, torch.Tensor) and gathered.dim() == 3 and gathered.dtype == dtype
            and c.shape[-1] == sum(split.args[1])):
        return None
    return cache, tables


def _positions(mask: fx.Node) -> fx.Node | None:
    """positions [B, T] when mask = arange(S)[None, None, None, :] <= positions[:, None, :, None]."""
    if not _is(mask, aten.le.Tensor):
        return None
    keys, queries = _skip(mask.args[0], _BROADCAST), _skip(mask.args[1], _BROADCAST)
    if not (_is(keys, aten.arange.default) and len(keys.args) == 1):    # arange(end): start 0, step 1
        return None
    q, m = _val(queries), _val(mask)
    if not (isinstance(q, torch.Tensor) and q.dim() == 2 and not q.dtype.is_floating_point
            and isinstance(m, torch.Tensor) and m.dim() == 4):
        return None
    return queries


class UsePagedAttentionPass(GraphPass):
    name = "use_paged_attention"
    rtol = atol = 0.0   # the op's reference is the same gather, mask and attention

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fake = fake_mode_of(gm)
        count = 0
        for node in [n for n in gm.graph.nodes if _is(n, _MLA)]:
            q_nope, q_pe, latent, k_pe, kvb, w_uk, w_uv, mask, scale = node.args[:9]
            rest = node.args[9:]
            found = _context(latent, k_pe, _val(q_nope).dtype) if _val(q_nope) is not None else None
            positions = _positions(mask) if isinstance(mask, fx.Node) else None
            if found is None or positions is None:
                continue
            cache, tables = found
            with gm.graph.inserting_before(node):
                paged = call_op(gm.graph, fake, _PAGED, (q_nope, q_pe, cache, tables, positions, kvb, w_uk, w_uv,
                                                         scale, *rest))
            node.replace_all_uses_with(paged)
            gm.graph.erase_node(node)
            count += 1
        if count:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=count > 0, matches=count,
                          notes=[f"{count} attention(s) read the paged cache directly"] if count else [])
