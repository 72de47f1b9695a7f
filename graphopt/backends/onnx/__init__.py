"""The onnx backend: the Program's step, greedy step, prefill (and, on first forward, main) graphs
exported to ONNX and run by onnxruntime on the CPU, one InferenceSession per graph.

    functional.py      the graph made functional: kv_cache_write -> a scatter that returns the new
                       cache, the caches appended to the outputs, graphopt ops -> ONNX-friendly torch
    decompositions.py  those torch formulations, op by op (the same numbers as the references)
    export.py          torch.onnx.export(dynamo=True) of one graph + onnx.checker; export_program
                       (what `graphopt dump --format onnx` writes)
    backend.py         OnnxSession (IO binding: caches bound in place), OnnxExecutable, OnnxBackend

onnx, onnxruntime and onnxscript (torch.onnx's translator) are the `onnx` extra, not core
dependencies: importing this package without them is an ImportError that says
`pip install graphopt[onnx]`, raised by `graphopt.compile(backend="onnx")` before any capture.

docs/onnx.md has the op mapping, how caches are bound and what was measured.
"""

import importlib.util

REQUIRES = ("onnx", "onnxruntime", "onnxscript")


def _missing() -> list[str]:
    return [m for m in REQUIRES if importlib.util.find_spec(m) is None]


if _missing():
    raise ImportError(f"the onnx backend needs {', '.join(REQUIRES)}; missing: {', '.join(_missing())}. "
                      "Install them with `pip install graphopt[onnx]`")

from .backend import CACHE_BINDINGS, OnnxBackend, OnnxExecutable, OnnxSession  # noqa: E402
from .export import OnnxGraph, export_graph, export_program  # noqa: E402
from .functional import functional_graph  # noqa: E402

__all__ = ["CACHE_BINDINGS", "OnnxBackend", "OnnxExecutable", "OnnxGraph", "OnnxSession", "export_graph",
           "export_program", "functional_graph"]
