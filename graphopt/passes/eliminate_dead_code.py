"""Remove nodes whose values nobody uses (and that have no side effects).

Handles: unused views, casts and arithmetic left behind by capture or by earlier rewrites; unused
get_attr nodes (weights a fusion no longer reads). Keeps: placeholders, outputs, the cache
write-back `copy_` nodes and any op with side effects (fx's `is_impure`).

Before:                                           After:
    view = torch.ops.aten.view.default(x, [6])        add = torch.ops.aten.add.Tensor(x, 1)
    add = torch.ops.aten.add.Tensor(x, 1)             return (add,)
    return (add,)
"""

from __future__ import annotations

import torch

from .base import GraphPass, PassContext, PassResult


class EliminateDeadCodePass(GraphPass):
    name = "eliminate_dead_code"
    rtol = atol = 0.0

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        for node in list(gm.graph.nodes):  # fx keeps get_attr nodes; drop the unused ones too
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        removed = before - len(gm.graph.nodes)
        return PassResult(gm, modified=removed > 0, matches=removed)
