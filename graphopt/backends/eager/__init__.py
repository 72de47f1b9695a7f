"""Eager backend: runs the transformed FX graphs as they are, with the reference implementations of the
graphopt:: ops. It is the numerical reference for every other backend and runs on CPU or GPU.

Its Executable serves steps with the SpecStepProvider over the fused step and prefill graphs, or,
when fuse_spec_step was switched off, with the ReferenceStepProvider over the main graph (plain
decoding, the bookkeeping in eager ops). `forward` runs the main graph over a fresh dense cache.
"""

from .backend import EagerBackend, EagerExecutable, check_graph

__all__ = ["EagerBackend", "EagerExecutable", "check_graph"]
