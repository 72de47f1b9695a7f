"""Graph invariants, written down once and checked at phase boundaries in verify mode.

Between phases every graph graphopt hands on is:
  1. well formed: `graph.lint()` passes (topological order, no dangling uses);
  2. typed: every placeholder and call_function node that returns a value carries `meta["val"]`
     (a FakeTensor or a tuple of them), so later passes can read shapes and dtypes without running
     anything (assertion ops that export inserts return nothing and are exempt);
  3. functional: no in-place or out= ATen op except the trailing `aten.copy_` nodes that write a
     mutated input (a KV cache) back, each as the last user of that placeholder, and, once the
     memory phase ran, `graphopt.kv_cache_write` into a cache input (passes/reinplace_cache_writes.py);
  4. resolvable: every get_attr target exists on the module.
"""

from __future__ import annotations

import torch

from ..ops import cache as _cache  # noqa: F401  registers graphopt.kv_cache_write


class InvariantError(AssertionError):
    pass


def check_invariants(gm: torch.fx.GraphModule, where: str) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise InvariantError(f"{where}: graph is malformed: {e}") from e
    for node in gm.graph.nodes:
        if (node.op in ("placeholder", "call_function") and "val" not in node.meta and _returns(node)
                and not _is_cache_writeback(node)):
            raise InvariantError(f"{where}: node {node.name} ({node.op} {node.target}) has no meta['val']")
        if node.op == "call_function" and _is_inplace(node.target) and not _is_cache_writeback(node):
            raise InvariantError(f"{where}: node {node.name} is an in-place op ({node.target}); "
                                 "graphs must be functional except the cache write-back copy_")
        if node.op == "get_attr" and not _has_attr(gm, node.target):
            raise InvariantError(f"{where}: get_attr {node.target!r} does not exist on the module")


def _returns(node: torch.fx.Node) -> bool:
    """False for assertion ops (aten._assert_tensor_metadata, _assert_scalar) that return nothing."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return len(target._schema.returns) > 0
    return True


def _is_inplace(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _is_cache_writeback(node: torch.fx.Node) -> bool:
    return (node.target in (torch.ops.aten.copy_.default, torch.ops.graphopt.kv_cache_write.default)
            and node.args[0].op == "placeholder")


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
