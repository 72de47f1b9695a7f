"""Runs the pipeline's phases over a Program: timing, switches, dumps, verification, error naming.

A phase of graph passes runs over each graph of the Program (consecutive graph phases run graph by
graph: main through all of them, then mtp0, ...); a phase of module passes runs once over the whole
Program. `run(gm, ctx)` runs graph phases over one graph (tests, tools).

Switching passes off: `CompileConfig.disable_passes` and the `GRAPHOPT_DISABLE_PASSES` environment
variable (comma-separated pass names) are merged. Verify mode (`verify=True` or `GRAPHOPT_VERIFY=1`)
runs each pass's graph before and after on the same fresh random inputs and judges the difference by
what the pass declares it may change (`GraphPass.numerics`, a key of `verify.CHECKS`): a "close"
pass keeps every output and mutated cache within its rtol/atol, a "quantised" pass keeps the
next-token distributions within its scheme's budget (`verify.QUANT_BUDGETS`). It also checks the
graph invariants of every graph as captured and at every phase boundary. Pass notes go to
`CompileState.notes` ("graph/pass" -> text), which the report shows.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import torch

from .base import GraphPass, ModulePass, PassContext, count_ops
from .invariants import check_invariants
from .program import Program
from .verify import CHECKS, Mismatch, Run, flat, values


class PassError(RuntimeError):
    """A pass raised, or (verify mode) changed the numerics beyond its tolerance."""


@dataclass
class Phase:
    """A named list of passes: all graph passes (run per graph) or all module passes (run once)."""

    name: str
    why: str
    passes: list[GraphPass | ModulePass]

    def __post_init__(self):
        kinds = {isinstance(p, ModulePass) for p in self.passes}
        if len(kinds) > 1:
            raise TypeError(f"phase {self.name!r} mixes graph passes and module passes; split it in two")

    @property
    def is_module(self) -> bool:
        return bool(self.passes) and isinstance(self.passes[0], ModulePass)


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
                 dumper=None, known: set[str] | None = None, on_phase=None):
        known = known if known is not None else {p.name for ph in phases for p in ph.passes}
        unknown = set(disabled) - known
        if unknown:
            raise ValueError(f"cannot disable unknown pass(es) {sorted(unknown)}; passes: {sorted(known)}")
        for p in (p for ph in phases for p in ph.passes if isinstance(p, GraphPass)):
            if p.numerics not in CHECKS:
                raise ValueError(f"pass {p.name!r} declares numerics={p.numerics!r}; verify knows {sorted(CHECKS)}")
        self.phases, self.disabled, self.verify, self.dumper = phases, set(disabled), verify, dumper
        self.records: list[PassRecord] = []
        # on_phase(phase, graph): called when a phase has run over one graph ("program" for module phases)
        self.on_phase = on_phase or (lambda phase, graph: None)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, phases: list[Phase] | None = None,
            ran: list[str] | None = None) -> torch.fx.GraphModule:
        """Graph phases over one graph; verify mode checks the graph as given first."""
        if self.verify:
            check_invariants(gm, f"{ctx.graph_name}: after capture")
        return self._run_graph(gm, ctx, phases if phases is not None else self.phases, [] if ran is None else ran)

    def run_program(self, program: Program, ctx: PassContext) -> Program:
        """Every phase over `program` (ctx gives model config, options; its state is replaced by the
        program's). Returns the program (module passes may return a new one)."""
        if self.verify:
            for name, gm in program.graphs.items():
                check_invariants(gm, f"{name}: after capture")
        ran: dict[str, list[str]] = {}
        phases, i = self.phases, 0
        while i < len(phases):
            if phases[i].is_module:
                program = self._run_module_phase(phases[i], program, ctx, ran)
                i += 1
                continue
            block = []
            while i < len(phases) and not phases[i].is_module:
                block.append(phases[i])
                i += 1
            for name in program.names:
                gctx = self._graph_ctx(program, ctx, name)
                program.set(name, self._run_graph(program[name], gctx, block, ran.setdefault(name, [])))
        self._collect_notes(program)
        return program

    @staticmethod
    def _graph_ctx(program: Program, ctx: PassContext, name: str) -> PassContext:
        signature = program.signatures.get(name)
        return PassContext(ctx.model_config, ctx.options, program.make_inputs.get(name), name, program.state,
                           signature.outputs if signature else ())

    def _run_graph(self, gm, ctx: PassContext, phases: list[Phase], ran: list[str]) -> torch.fx.GraphModule:
        for phase in phases:
            if phase.is_module:
                raise TypeError(f"phase {phase.name!r} holds module passes; run it with run_program")
            for p in phase.passes:
                gm = self._run_one(p, phase, gm, ctx, ran)
            if self.verify:
                check_invariants(gm, f"{ctx.graph_name}: after phase {phase.name!r}")
            self.on_phase(phase.name, ctx.graph_name)
        return gm

    def _run_module_phase(self, phase: Phase, program: Program, ctx: PassContext,
                          ran: dict[str, list[str]]) -> Program:
        for p in phase.passes:
            program = self._run_module(p, phase, program, ctx, ran)
        if self.verify:
            for name, gm in program.graphs.items():
                check_invariants(gm, f"{name}: after phase {phase.name!r}")
        self.on_phase(phase.name, "program")
        return program

    def _run_module(self, p: ModulePass, phase: Phase, program: Program, ctx: PassContext,
                    ran: dict[str, list[str]]) -> Program:
        before = dict(program.graphs)
        rec = PassRecord("program", phase.name, p.name, ran=p.name not in self.disabled)
        self.records.append(rec)
        if not rec.ran:
            return program
        mctx = self._graph_ctx(program, ctx, "program")
        start = time.perf_counter()
        try:
            result = p.run(program, mctx)
        except Exception as e:
            done = list(dict.fromkeys(n for names in ran.values() for n in names))
            after = f" after {', '.join(done)}" if done else " (the first pass)"
            raise PassError(f"pass {p.name!r} (phase {phase.name!r}) failed on the program "
                            f"(graphs {list(before)}){after}: {type(e).__name__}: {e}") from e
        rec.seconds = time.perf_counter() - start
        program = result.program
        touched = [n for n, gm in program.graphs.items() if before.get(n) is not gm]
        # the record is named after the first graph the pass made or changed (fuse_spec_step: "step")
        rec.graph = touched[0] if touched else "program"
        source = before.get(rec.graph) or next(iter(before.values()))
        rec.modified, rec.matches, rec.notes = result.modified, result.matches, list(result.notes)
        rec.nodes_before, rec.ops_before = len(source.graph.nodes), count_ops(source)
        after_gm = program.graphs.get(rec.graph, source)
        rec.nodes_after, rec.ops_after = len(after_gm.graph.nodes), count_ops(after_gm)
        for name in touched:
            ran.setdefault(name, [])
            if self.dumper:   # NN.<pass>.before is the graph it read (the main graph for the spec fusion)
                index = max(0, len([r for r in self.records if r.graph == name and r.ran]) - (name == rec.graph))
                if name == rec.graph:
                    self.dumper.write_graph(name, index, p.name, "before", source)
                self.dumper.write_graph(name, index, p.name, "after", program.graphs[name])
            ran[name].append(p.name)
        return program

    def _collect_notes(self, program: Program) -> None:
        program.state.records = self.records
        for r in self.records:
            if r.notes:
                program.state.notes[f"{r.graph}/{r.name}"] = "; ".join(r.notes)

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
            rec.max_error, verdict = compare_outputs(before, gm, ctx, p, ran)
            rec.notes += verdict
        ran.append(p.name)
        return gm


def compare_outputs(before, after, ctx: PassContext, p: GraphPass, ran: list[str]) -> tuple[float, list[str]]:
    """Run both graphs on the same fresh inputs (one draw per `check.draws`) and judge the difference by
    the pass's check. Returns (max abs error over float values, notes for the pass record)."""
    check = CHECKS[p.numerics]
    pairs = []
    with torch.no_grad():
        for draw in range(check.draws):
            seed = 1234 + len(ran) + 1000 * draw
            args_ref, args_got = ctx.make_inputs(seed), ctx.make_inputs(seed)
            ref, got = flat(before(*args_ref)), flat(after(*args_got))
            pairs.append((Run(ref, flat(args_ref)), Run(got, flat(args_got))))
    try:
        notes = check.judge(p, ctx, pairs)
    except Mismatch as m:
        raise PassError(f"verify: pass {p.name!r} {m.what} of graph {ctx.graph_name!r} {m.how}; "
                        f"passes before it: {', '.join(ran) or 'none'}") from None
    worst = max((float((b.double() - a.double()).abs().max()) for ref, got in pairs
                 for _, a, b in values(ref, got, ctx) if a.dtype.is_floating_point and a.numel()), default=0.0)
    return worst, notes
