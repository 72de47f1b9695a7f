"""Validated options of `graphopt.compile` (the public API's config dataclasses live here and in
`graphopt.spec` / `graphopt.quant.config`).

`CompileOptions` is defined in `graphopt.passes.program`, next to the Program the pipeline and the
backends read it with; this module is its public name. `BACKENDS` are the names `backend=` accepts:
"auto" plus every backend registered in `graphopt.backends`.
"""

from __future__ import annotations

from . import backends as _backends
from .passes.program import CompileOptions

__all__ = ["BACKENDS", "CompileOptions", "resolve_backend"]

BACKENDS = ("auto", *_backends.names())
AUTO_BACKEND = "eager"   # the reference; "auto" will pick the fastest backend that supports the device


def resolve_backend(backend: str) -> str:
    """The registered name `backend` stands for; a ValueError listing the accepted names otherwise."""
    accepted = ("auto", *_backends.names())
    if backend not in accepted:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(accepted)}")
    return AUTO_BACKEND if backend == "auto" else backend
