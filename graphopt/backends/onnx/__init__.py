"""The onnx backend: the Program's step, greedy step, prefill (and, on first forward, main) graphs
exported to ONNX and run by onnxruntime on the CPU, one InferenceSession per graph.

    functional.py      the graph made functional: kv_cache_write -> a scatter that returns the new
                       cache, the caches appended to the outputs, graphopt ops -> ONNX-friendly torch
    decompositions.py  those torch formulations, op by op (the same numbers as the references)
    export.py          torch.onnx.export(dynamo=True) of one graph + onnx.checker; export_program
    backend.py         OnnxSession (IO binding: caches bound in place), OnnxExecutable, OnnxBackend

docs/onnx.md has the op mapping, how caches are bound and what was measured.
"""

from .backend import CACHE_BINDINGS, OnnxBackend, OnnxExecutable, OnnxSession
from .export import OnnxGraph, export_graph, export_program
from .functional import functional_graph

__all__ = ["CACHE_BINDINGS", "OnnxBackend", "OnnxExecutable", "OnnxGraph", "OnnxSession", "export_graph",
           "export_program", "functional_graph"]
