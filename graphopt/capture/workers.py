"""Trace decoder layers in forked worker processes while the parent exports the model around them.

torch.export is Python bound: one process uses one core whatever the machine has. Regional capture
(`capture/step.py`) traces one decoder layer per kind (dense, MoE) and exports the model around
them; the layer traces are ~75% of capture and independent of the rest, so each runs in a child
process forked from the compiling one (the model's tensors are shared copy-on-write, nothing is
pickled on the way in) while the parent exports the model around the layers.

What comes back is the layer's graph with shapes only: `splice` rebuilds every value it copies
from the size expressions (sympy, picklable) in the parent's fake mode, so the child's fake tensors
never have to cross. `pack_graph` / `unpack_graph` are that transport: nodes (name, op, target,
args), each value as a `ShapeOnly` (sizes, strides, dtype, device), the other meta entries that pickle.

Fork is used only where it is safe: a POSIX "fork" start method, a CPU model and no CUDA on the
machine (a forked child cannot use CUDA, and CUDA can be initialised without Python knowing);
otherwise layers are traced in this process, as with the compile option `capture_workers=0`. A worker that fails raises its error here, naming it; one
that dies (killed, crashed) is an error naming its exit code.
"""

from __future__ import annotations

import multiprocessing
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
from torch import fx

__all__ = ["ShapeOnly", "Worker", "fork_available", "pack_graph", "unpack_graph"]


@dataclass(frozen=True)
class ShapeOnly:
    """A tensor value of a packed graph: sizes and strides are ints or sympy expressions over the
    capture's shape symbols (what `splice` substitutes); no storage, no fake mode."""

    shape: tuple
    strides: tuple
    dtype: torch.dtype
    device: torch.device

    def stride(self) -> tuple:
        return self.strides


@dataclass(frozen=True)
class SymValue:
    """A SymInt value of a packed graph (a `sym_size` node's), as its expression."""

    expr: Any


def fork_available(device: torch.device | str = "cpu") -> bool:
    """Whether layer traces of a model on `device` may run in forked children of this process: a CPU
    model on a machine without CUDA. Where CUDA exists it may be initialised below Python's view
    (a tensor created on the GPU initialises the driver without `torch.cuda.is_initialized()`
    saying so), and a forked child then fails or hangs on its first CUDA call."""
    return ("fork" in multiprocessing.get_all_start_methods() and torch.device(device).type == "cpu"
            and not torch.cuda.is_available())


# -- transport ----------------------------------------------------------------------------------------

def _size(s):
    if isinstance(s, torch.SymInt):
        return s.node.expr
    return int(s)


def _value(v):
    if isinstance(v, torch.Tensor):
        return ShapeOnly(tuple(_size(s) for s in v.shape), tuple(_size(s) for s in v.stride()), v.dtype, v.device)
    if isinstance(v, torch.SymInt):
        return SymValue(v.node.expr)
    if isinstance(v, (tuple, list)):
        return type(v)(_value(x) for x in v)
    if v is None or isinstance(v, (int, float, bool)):
        return v
    raise TypeError(f"cannot pack a graph value of type {type(v).__name__}")


def _target(node: fx.Node):
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return ("op", t.name())                       # "aten::view", "graphopt::rms_norm.default"
    if isinstance(t, str) or getattr(t, "__module__", None) in ("_operator", "operator", "builtins"):
        return ("obj", t)
    raise TypeError(f"cannot pack node {node.name}: target {t!r} is not an operator overload")


def _resolve(spec):
    kind, t = spec
    if kind == "obj":
        return t
    ns, _, rest = t.partition("::")
    name, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, ns), name), overload or "default")


def _picklable(v) -> bool:
    try:
        pickle.dumps(v)
    except Exception:      # noqa: BLE001 - a meta entry that does not pickle stays behind (e.g. source functions)
        return False
    return True


def pack_graph(graph: fx.Graph) -> bytes:
    """graph's nodes as bytes: values as ShapeOnly / SymValue, other pickleable meta kept."""
    nodes = []
    for n in graph.nodes:
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: _Ref(a.name))
        meta = {k: v for k, v in n.meta.items() if k not in ("val", "tensor_meta") and _picklable(v)}
        if "val" in n.meta:
            meta["val"] = _value(n.meta["val"])
        nodes.append((n.name, n.op, _target(n) if n.op == "call_function" else ("obj", n.target), args, meta))
    return pickle.dumps(nodes)


@dataclass(frozen=True)
class _Ref:
    name: str


def unpack_graph(data: bytes) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}

    def deref(a):
        if isinstance(a, _Ref):
            return env[a.name]
        if isinstance(a, (tuple, list)):
            return type(a)(deref(x) for x in a)
        if isinstance(a, dict):
            return {k: deref(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(deref(a.start), deref(a.stop), deref(a.step))
        return a

    for name, op, target, (args, kwargs), meta in pickle.loads(data):
        node = graph.create_node(op, _resolve(target), deref(args), deref(kwargs), name=name)
        node.meta = meta
        env[name] = node
    return graph


# -- workers ------------------------------------------------------------------------------------------

class Worker:
    """fn() -> bytes run in a forked child; `result()` waits for it. fn's exception is re-raised here
    as `error(message)`; a child that dies is `error` naming its exit code."""

    def __init__(self, fn: Callable[[], bytes], error: type[Exception]):
        ctx = multiprocessing.get_context("fork")
        self._recv, send = ctx.Pipe(duplex=False)
        self._error = error
        self._proc = ctx.Process(target=_child, args=(fn, send, error), daemon=True)
        self._proc.start()
        send.close()

    def result(self) -> bytes:
        try:
            data = self._recv.recv_bytes()
        except EOFError:
            self._proc.join()
            raise self._error(f"a capture worker process died (exit code {self._proc.exitcode}); "
                              "compile with capture_workers=0 to trace in this process") from None
        finally:
            self._recv.close()
        self._proc.join()
        if data[:1] == b"E":
            raise self._error(data[1:].decode())
        return data[1:]

    def cancel(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._recv.close()


def _child(fn, send, error) -> None:
    torch.set_num_threads(1)   # the parent and the other workers use the other cores
    try:
        out = b"O" + fn()
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, named
        out = b"E" + (str(e) if isinstance(e, error) else f"{type(e).__name__}: {e}").encode()
    send.send_bytes(out)
    send.close()
