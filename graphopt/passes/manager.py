"""Runs the pipeline's phases over one graph: timing, switches, dumps, verification, error naming.

Switching passes off: `CompileConfig.disable_passes` and the `GRAPHOPT_DISABLE_PASSES` environment
variable (comma-separated pass names) are merged. Verify mode (`verify=True` or `GRAPHOPT_VERIFY=1`)
runs each pass's graph before and after on the same fresh random inputs and compares outputs with
the pass's tolerance, and checks the graph invariants at every phase boundary.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import torch

from .base import GraphPass, PassContext, count_ops
from .invariants import check_invariants


class PassError(RuntimeError):
    """A pass raised, or (verify mode) changed the numerics beyond its tolerance."""


@dataclass
class Phase:
    name: str
    why: str
    passes: list[GraphPass]


@dataclass
class PassRecord:
    graph: str
    phase: str
    name: str
    ran: bool
    modified: bool = False
    matches: int = 0
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    max_error: float | None = None
    notes: list[str] = field(default_factory=list)


def disabled_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get("GRAPHOPT_DISABLE_PASSES", "").split(",") if n.strip()}


def verify_from_env() -> bool:
    return os.environ.get("GRAPHOPT_VERIFY", "") not in ("", "0", "false", "False")


class PassManager:
    def __init__(self, phases: list[Phase], disabled: set[str] = frozenset(), verify: bool = False,
                 dumper=None, known: set[str] | None = None):
        known = known if known is not None else {p.name for ph in phases for p in ph.passes}
        unknown = set(disabled) - known
        if unknown:
            raise ValueError(f"cannot disable unknown pass(es) {sorted(unknown)}; passes: {sorted(known)}")
        self.phases, self.disabled, self.verify, self.dumper = phases, set(disabled), verify, dumper
        self.records: list[PassRecord] = []

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, phases: list[Phase] | None = None,
            ran: list[str] | None = None) -> torch.fx.GraphModule:
        ran = [] if ran is None else ran
        if self.verify and phases is None:
            check_invariants(gm, f"{ctx.graph_name}: after capture")
        for phase in phases if phases is not None else self.phases:
            for p in phase.passes:
                gm = self._run_one(p, phase, gm, ctx, ran)
            if self.verify:
                check_invariants(gm, f"{ctx.graph_name}: after phase {phase.name!r}")
        return gm

    def _run_one(self, p: GraphPass, phase: Phase, gm, ctx: PassContext, ran: list[str]):
        rec = PassRecord(ctx.graph_name, phase.name, p.name, ran=p.name not in self.disabled)
        self.records.append(rec)
        if not rec.ran:
            return gm
        rec.nodes_before, rec.ops_before = len(gm.graph.nodes), count_ops(gm)
        index = len([r for r in self.records if r.graph == ctx.graph_name and r.ran]) - 1
        if self.dumper:
            self.dumper.write_graph(ctx.graph_name, index, p.name, "before", gm)
        before = copy.deepcopy(gm) if self.verify else None
        start = time.perf_counter()
        try:
            result = p.run(gm, ctx)
            gm = result.graph_module
            gm.recompile()
        except Exception as e:
            after = f" after {', '.join(ran)}" if ran else " (the first pass)"
            raise PassError(f"pass {p.name!r} (phase {phase.name!r}) failed on graph {ctx.graph_name!r}"
                            f"{after}: {type(e).__name__}: {e}") from e
        rec.seconds = time.perf_counter() - start
        rec.modified, rec.matches, rec.notes = result.modified, result.matches, list(result.notes)
        rec.nodes_after, rec.ops_after = len(gm.graph.nodes), count_ops(gm)
        if self.dumper:
            self.dumper.write_graph(ctx.graph_name, index, p.name, "after", gm)
        # a pass that changes the graph's signature (the step fusion) is checked by its own tests
        if self.verify and ctx.make_inputs is not None and result.modified \
                and not getattr(p, "changes_signature", False):
            rec.max_error = compare_outputs(before, gm, ctx, p, ran)
        ran.append(p.name)
        return gm


def compare_outputs(before, after, ctx: PassContext, p: GraphPass, ran: list[str]) -> float:
    """Run both graphs on the same fresh inputs and compare outputs AND the mutated inputs (caches)."""
    seed = 1234 + len(ran)
    with torch.no_grad():
        args_ref, args_got = ctx.make_inputs(seed), ctx.make_inputs(seed)
        ref = _flat(before(*args_ref)) + _flat(args_ref)
        got = _flat(after(*args_got)) + _flat(args_got)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.dtype.is_floating_point:
            err = (b.double() - a.double()).abs()
            bound = p.atol + p.rtol * a.double().abs()
            if bool(torch.isnan(b).any() & ~torch.isnan(a).any()) or bool((err > bound).any()):
                rel = float(err.max() / a.double().abs().max().clamp_min(1e-30))
                raise PassError(f"verify: pass {p.name!r} changed output {i} of graph {ctx.graph_name!r} "
                                f"beyond its tolerance (rtol={p.rtol}, atol={p.atol}): max abs error "
                                f"{float(err.max()):.3g}, relative {rel:.3g}; passes before it: "
                                f"{', '.join(ran) or 'none'}")
            worst = max(worst, float(err.max()) if err.numel() else 0.0)
        elif not torch.equal(a, b):
            raise PassError(f"verify: pass {p.name!r} changed integer output {i} of graph {ctx.graph_name!r}")
    return worst


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)] if isinstance(out, (list, tuple)) else []
