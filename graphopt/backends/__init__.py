"""The backend registry: a name -> a `Backend` whose `lower(program, options)` returns an Executable.

    backend = graphopt.backends.get("eager")
    executable = backend.lower(program, options)

A backend is registered with a factory, so that importing graphopt does not import every backend's
dependencies; `get` builds it on first use. `names()` is what `graphopt.config.BACKENDS` lists and an
unknown name's error quotes. Later entries (inductor, onnx, ascend) register here the same way.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .base import Backend, Executable

__all__ = ["Backend", "Executable", "get", "names", "register"]

_FACTORIES: dict[str, Callable[[], Backend]] = {}
_BUILT: dict[str, Backend] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Register `factory() -> Backend` under `name` (a name registered twice is an error)."""
    if name in _FACTORIES:
        raise ValueError(f"backend {name!r} is already registered")
    _FACTORIES[name] = factory


def names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def get(name: str) -> Backend:
    """The registered backend `name`; a ValueError listing the registered ones otherwise."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(names())}")
    if name not in _BUILT:
        _BUILT[name] = _FACTORIES[name]()
    return _BUILT[name]


def _lazy(module: str, cls: str) -> Callable[[], Backend]:
    return lambda: getattr(importlib.import_module(module, __name__), cls)()


register("eager", _lazy(".eager", "EagerBackend"))          # the reference; what "auto" picks on the CPU
register("inductor", _lazy(".inductor", "InductorBackend"))  # Inductor + CUDA graphs; what "auto" picks on CUDA
register("onnx", _lazy(".onnx", "OnnxBackend"))              # onnxruntime on the CPU (docs/onnx.md)
register("ascend", _lazy(".ascend", "AscendBackend"))        # torchair on Ascend NPUs; not run here (docs/backends.md)
