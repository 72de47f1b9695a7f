"""Eager backend: runs the transformed FX graph as is, with the reference implementations of the
graphopt:: ops. It is the numerical reference for every other backend and runs on CPU or GPU."""

from __future__ import annotations

import torch


def lower(gm: torch.fx.GraphModule, example_inputs: tuple | None = None) -> torch.fx.GraphModule:
    """Nothing to compile: check the graph's ops are all registered, and return it."""
    import graphopt.ops  # noqa: F401  registers the graphopt:: ops the graph may call

    gm.graph.lint()
    gm.recompile()
    return gm
