"""Write the KV cache in place: functional `index_copy` chains + write-back `copy_` -> `graphopt.kv_cache_write`.

Why. torch.export hands us the model's in-place cache write (`flat.index_copy_(0, slots, entry)`)
in functional form: `index_copy` builds a whole new cache tensor, later reads use it, and a trailing
`copy_` puts it back into the cache input. Run as written, every layer copies its whole cache twice
per step (the step's cost then grows with cache capacity, and peak memory holds a second cache).
After this pass each write is one `graphopt.kv_cache_write(cache, slots, entry)` node that mutates
the cache input (its schema says so), reads go to the cache input itself, and the `copy_` is gone:
a step touches the slots it writes and the blocks it reads, nothing else.

What is matched, from each `copy_(cache_placeholder, value)`: `value` is a view of the result of a
chain of `index_copy(base, 0, slots, entry)` nodes, each one's base a flat [N * bs, D] view of the
previous version (the first one's of the cache input) -- one write (main model layer) or several
(the MTP layer written by the draft window, then by each chained draft). Views are view / reshape /
_unsafe_view / alias of a contiguous cache, so they alias it.
Checked (else the chain is left functional): every reader of an older version runs before the write
that replaces it (after the rewrite there is only one version, the current one).
Not matched: writes along another dim, into a non-flat view, or a copy_ of something else.

Runs last, on every graph (main, mtp*, step, prefill): the spec fusion reads the captured graphs'
functional form (`FunctionalStep`), so this must come after it.

Before (main graph, layer 0):
    view_2 = torch.ops.aten.view.default(kv_caches_0, [-1, 80])
    index_copy = torch.ops.aten.index_copy.default(view_2, 0, view_3, view_4)
    view_5 = torch.ops.aten.view.default(index_copy, [sym_size_int, 16, 80])
    index = torch.ops.aten.index.Tensor(view_5, [block_tables])
    ...
    copy_ = torch.ops.aten.copy_.default(kv_caches_0, view_5)
After:
    view_2 = torch.ops.aten.view.default(kv_caches_0, [-1, 80])
    kv_cache_write = torch.ops.graphopt.kv_cache_write.default(kv_caches_0, view_3, view_4)
    view_5 = torch.ops.aten.view.default(view_2, [sym_size_int, 16, 80])
    index = torch.ops.aten.index.Tensor(view_5, [block_tables])
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import cache  # noqa: F401  registers torch.ops.graphopt.kv_cache_write
from .base import GraphPass, PassContext, PassResult

__all__ = ["ReinplaceCacheWritesPass", "find_chains"]

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default}
_WRITE = torch.ops.graphopt.kv_cache_write.default


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _root(node: fx.Node) -> fx.Node:
    while _is(node, *_VIEWS):
        node = node.args[0]
    return node


def _aliases(root: fx.Node) -> set[fx.Node]:
    """root and every view of it (transitively)."""
    out, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if _is(user, *_VIEWS) and user not in out:
                out.add(user)
                todo.append(user)
    return out


def _flat_view(base: fx.Node, cache: fx.Node) -> bool:
    b, c = base.meta.get("val"), cache.meta.get("val")
    return (isinstance(b, torch.Tensor) and isinstance(c, torch.Tensor) and b.dim() == 2 and c.dim() == 3
            and b.shape[-1] == c.shape[-1])


def find_chains(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """(cache placeholder, write-back copy_, index_copy chain in order) for every rewritable chain."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = []
    for copy in [n for n in gm.graph.nodes if _is(n, aten.copy_.default)]:
        cache, value = copy.args[0], copy.args[1]
        if not isinstance(cache, fx.Node) or cache.op != "placeholder":
            continue
        chain, node = [], _root(value)
        while _is(node, aten.index_copy.default) and node.args[1] == 0 and _flat_view(node.args[0], cache):
            chain.append(node)
            node = _root(node.args[0])
        if node is not cache or not chain:
            continue
        chain.reverse()
        versions = [cache] + chain
        legal = True
        for i, write in enumerate(chain):   # readers of version i must run before write i
            aliases = _aliases(versions[i])
            readers = {u for a in aliases for u in a.users} - aliases - {write, copy}
            if any(order[r] > order[write] for r in readers):
                legal = False
                break
        if legal:
            found.append((cache, copy, chain))
    return found


class ReinplaceCacheWritesPass(GraphPass):
    name = "reinplace_cache_writes"
    rtol = atol = 0.0   # the same index_copy, into the cache itself

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chains = find_chains(gm)
        for cache, copy, chain in chains:
            for write in chain:
                base, _, slots, entry = write.args
                with gm.graph.inserting_before(write):
                    node = gm.graph.call_function(_WRITE, (cache, slots, entry))
                node.meta["val"] = None
                write.replace_all_uses_with(base)   # base aliases the cache: it now holds the write
                gm.graph.erase_node(write)
            gm.graph.erase_node(copy)
        n = sum(len(c) for _, _, c in chains)
        notes = [f"{n} cache write(s) in place over {len(chains)} cache input(s)"] if chains else []
        return PassResult(gm, modified=bool(chains), matches=n, notes=notes)
