"""Validated options of `graphopt.compile` (the public API's config dataclasses live here and in
`graphopt.spec` / `graphopt.quant.config`).

`CompileOptions` is defined in `graphopt.passes.program`, next to the Program the pipeline and the
backends read it with; this module is its public name. `BACKENDS` are the names `backend=` accepts:
"auto" plus every backend registered in `graphopt.backends`.
"""

from __future__ import annotations

import torch

from . import backends as _backends
from .passes.program import CompileOptions

__all__ = ["BACKENDS", "CompileOptions", "resolve_backend"]

BACKENDS = ("auto", *_backends.names())
# "auto" per device type (an "npu" device exists only with torch_npu loaded); anything else gets the
# eager reference (on the CPU inductor and onnx decode faster but compile ~60 s longer, which is the
# whole cost of the default model's typical job: docs/backends.md)
AUTO_BACKEND = {"cuda": "inductor", "npu": "ascend"}


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The registered name `backend` stands for on `device`; a ValueError listing the accepted names
    otherwise. "auto": inductor on CUDA, ascend on an NPU, eager elsewhere (docs/backends.md says why)."""
    accepted = ("auto", *_backends.names())
    if backend not in accepted:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(accepted)}")
    if backend != "auto":
        return backend
    if device is None:
        kind = "cpu"
    else:   # a string is read without torch.device(), which knows "npu" only once torch_npu is imported
        kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return AUTO_BACKEND.get(kind, "eager")
