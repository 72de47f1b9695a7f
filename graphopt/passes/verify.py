"""Verify mode's checks: what each kind of pass may change, judged on the graph before and after it.

A pass declares its kind (`GraphPass.numerics`); the manager runs both graphs on `Check.draws` fresh
input draws and hands the runs to `CHECKS[kind].judge`, which raises a `Mismatch` naming the value and
the metric that failed (the manager adds the pass, the graph and the passes before it):

  close      every float output and mutated cache within the pass's rtol/atol, NaN only where it
             was NaN, integers equal: rewrites and fusions compute the same maths
  pruned     (expert pruning) float values finite and within REL_BOUND, integer inputs equal, integer
             outputs of the same shape and dtype: dropping experts may change the tokens
  quantised  the logits judged as next-token distributions, per position p_float = softmax(float
             logits), p_quant = softmax(quantised logits): mean KL(p_float || p_quant) and top-1
             agreement within the budget of the config's schemes (QUANT_BUDGETS); any other float
             value (hidden states, caches) finite where the float graph is and nearer the float
             value than zero is (||quant - float|| < ||float||: a sanity bound, see REL_BOUND);
             integer outputs (token ids) agree at the top-1 rate; integer inputs (ids, positions,
             block tables) equal, a quant pass never writes them

Logits are the outputs named "logits" in the graph's signature (PassContext.output_names), or, when
the names are unknown, float outputs whose last dimension is the model's vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .base import GraphPass, PassContext

__all__ = ["CHECKS", "Check", "Mismatch", "QUANT_BUDGETS", "QuantBudget", "REL_BOUND", "Run", "flat", "quant_budget"]


@dataclass
class Run:
    """One run of a graph in verify mode: its outputs, flat, and its inputs afterwards (mutated caches)."""
    outputs: list[torch.Tensor]
    inputs: list[torch.Tensor]


class Mismatch(Exception):
    """A check's verdict: `what` changed (e.g. "changed output 0 ('logits')") and `how`, beyond what the
    pass may change; the manager adds the pass, the graph and the passes before it."""

    def __init__(self, what: str, how: str):
        super().__init__(f"{what}: {how}")
        self.what, self.how = what, how


def values(ref: Run, got: Run, ctx: PassContext):
    """(label, before, after) of every output, then every input (mutated caches)."""
    names = ctx.output_names if len(ctx.output_names) == len(ref.outputs) else ()
    for i, (a, b) in enumerate(zip(ref.outputs, got.outputs)):
        yield (f"output {i} ({names[i]!r})" if names else f"output {i}"), a, b
    for j, (a, b) in enumerate(zip(ref.inputs, got.inputs)):
        yield f"input {j}", a, b


def _judge_close(p: GraphPass, ctx: PassContext, pairs: list[tuple[Run, Run]]) -> list[str]:
    """Every float value within the pass's rtol/atol of the graph before it, NaN only where it was NaN;
    integers equal."""
    for ref, got in pairs:
        for label, a, b in values(ref, got, ctx):
            if not a.dtype.is_floating_point:
                if not torch.equal(a, b):
                    raise Mismatch(f"changed integer {label}", "(a close pass keeps integers exact)")
                continue
            err = (b.double() - a.double()).abs()
            bound = p.atol + p.rtol * a.double().abs()
            if bool(torch.isnan(b).any() & ~torch.isnan(a).any()) or bool((err > bound).any()):
                rel = float(err.max() / a.double().abs().max().clamp_min(1e-30))
                raise Mismatch(f"changed {label}", f"beyond its tolerance (rtol={p.rtol}, atol={p.atol}): "
                               f"max abs error {float(err.max()):.3g}, relative {rel:.3g}")
    return []


@dataclass(frozen=True)
class QuantBudget:
    """What a quantisation scheme may change, against the float graph on verify mode's inputs."""
    kl: float      # mean KL(p_float || p_quant) of the next-token distributions (softmax of logits), nats
    top1: float    # least share of positions whose top-1 token (argmax of logits) must agree
    why: str = ""


# One row per scheme (graphopt.quant.schemes) plus "c8", the int8 latent cache, which adds to the
# scheme's row. A config's budget: the loosest row among its schemes, plus c8's when kv_cache="int8".
QUANT_BUDGETS: dict[str, QuantBudget] = {
    #                          KL   top-1
    "w8a16":       QuantBudget(0.01, 0.90, "int8 weights, float activations: ~0.4% error per weight"),
    "w8a8":        QuantBudget(0.10, 0.70, "int8 activations per token too: outlier channels squeeze the rest"),
    "fp8":         QuantBudget(0.10, 0.70, "e4m3 weights and activations: 3 mantissa bits"),
    "fp8_block":   QuantBudget(0.10, 0.70, "e4m3 with a weight scale per 128x128 block: no worse than fp8"),
    "w8a8_static": QuantBudget(0.20, 0.60, "one calibrated scale per tensor: clips inputs unlike its data"),
    "w4a8":        QuantBudget(0.30, 0.50, "15 levels per group of weights, and int8 activations"),
    "w4a16":       QuantBudget(0.30, 0.50, "15 levels per group of weights"),
    "hif8":        QuantBudget(0.05, 0.80, "HiFloat8 weights, float activations: 3 mantissa bits, like e4m3"),
    "nf4":         QuantBudget(0.30, 0.50, "16 normal-quantile levels per group of weights, like w4a16"),
    "w2a16":       QuantBudget(1.50, 0.30, "4 levels per group of weights: a stress format, far from lossless"),
    "c8":          QuantBudget(0.02, 0.90, "int8 latent cache, per-channel static scales: attention only"),
}

# Other float values (hidden states, caches) get no per-scheme budget: a quantised router input moves
# some tokens to other experts under ANY scheme (w8a16 measured 15% relative error of the MTP hidden
# state), so their error is not a smooth function of the scheme; what it does to the next token is what
# the logits check measures. The bound only catches the absurd: a value further from the float one than
# zero is (a dropped or exploded output).
REL_BOUND = 1.0


def quant_budget(quant) -> tuple[str, QuantBudget]:
    """(name, budget) of a QuantConfig (or preset name): the loosest of its schemes, plus c8's if any."""
    from ..quant.config import resolve   # here, not at import: only quantised compiles need it
    config = resolve(quant)
    names = sorted({s.name for s in config.used_schemes() if s.quantized}
                   | set(config.mixed_precision.candidates if config.mixed_precision else ()))
    missing = [n for n in names if n not in QUANT_BUDGETS]
    if missing:
        raise ValueError(f"verify mode has no budget for scheme(s) {missing}; add them to graphopt.passes.verify.QUANT_BUDGETS")
    rows = [QUANT_BUDGETS[n] for n in names]
    budget = QuantBudget(max((r.kl for r in rows), default=0.0), min((r.top1 for r in rows), default=1.0))
    if config.kv_cache == "int8":
        names.append("c8")
        c8 = QUANT_BUDGETS["c8"]   # errors add: KLs sum, top-1 flips too (union bound)
        budget = QuantBudget(budget.kl + c8.kl, budget.top1 - (1 - c8.top1))
    return " + ".join(names), budget


def _judge_quantised(p: GraphPass, ctx: PassContext, pairs: list[tuple[Run, Run]]) -> list[str]:
    """Logits: next-token KL and top-1 agreement over every position of every draw. Other float values
    (hidden states, caches): finite where the float graph is, relative error below REL_BOUND. Integer
    outputs (token ids): agreement rate, as top-1. Integer inputs (ids, positions, block tables): a
    quant pass never writes them, so they stay equal."""
    scheme, budget = quant_budget(ctx.state.quant)
    over = f"beyond what {scheme} may change"
    draws = [list(values(ref, got, ctx)) for ref, got in pairs]
    n_out = len(pairs[0][0].outputs)
    notes, worst_rel = [], 0.0
    for k, (label, a, _) in enumerate(draws[0]):
        same = [(d[k][1], d[k][2]) for d in draws]     # value k in every draw: (float graph, quantised graph)
        if k < n_out and _is_logits(ctx, k, n_out, a):
            notes.append(_judge_logits(label, same, scheme, budget))
        elif a.dtype.is_floating_point:
            worst_rel = max(worst_rel, _judge_float(label, same, over))
        else:
            _judge_integer(label, same, over, budget, is_output=k < n_out)
    notes.append(f"verify: other float values within relative error {worst_rel:.2e} (bound {REL_BOUND:g})")
    return notes


def _is_logits(ctx: PassContext, k: int, n_out: int, a: torch.Tensor) -> bool:
    """Output k holds logits: by its name where the graph's output names are known, else by its last dim."""
    if len(ctx.output_names) == n_out:
        return ctx.output_names[k] == "logits"
    return a.dtype.is_floating_point and a.shape[-1:] == (getattr(ctx.model_config, "vocab_size", None),)


def _judge_logits(label: str, same, scheme: str, budget: QuantBudget) -> str:
    a = torch.cat([r.reshape(-1, r.shape[-1]) for r, _ in same]).double()    # [positions, vocab]
    b = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in same]).double()
    over = f"beyond what {scheme} may change"
    if not bool(b.isfinite().all()):
        raise Mismatch(f"changed {label}", f"{over}: non-finite logits")
    # KL(p || q) = sum_v p_v (log p_v - log q_v), p the float graph's next-token distribution
    kl = float((a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    seen = f"{len(a)} positions"
    if kl > budget.kl:
        raise Mismatch(f"changed {label}", f"{over}: next-token KL {kl:.3g} > {budget.kl:g} "
                       f"(top-1 agreement {top1:.1%}, {seen})")
    if top1 < budget.top1:
        raise Mismatch(f"changed {label}", f"{over}: top-1 agreement {top1:.1%} < {budget.top1:.0%} "
                       f"(next-token KL {kl:.3g}, {seen})")
    return (f"verify {label}: next-token KL {kl:.2e}, top-1 agreement {top1:.1%} over {seen} "
            f"(budget for {scheme}: KL <= {budget.kl:g}, top-1 >= {budget.top1:.0%})")


def _judge_float(label: str, same, over: str) -> float:
    worst = 0.0
    for a, b in same:
        if bool((~b.isfinite() & a.isfinite()).any()):
            raise Mismatch(f"changed {label}", f"{over}: non-finite values where the float graph has none")
        rel = float((b.double() - a.double()).norm() / a.double().norm().clamp_min(1e-30))
        if rel >= REL_BOUND:
            raise Mismatch(f"changed {label}", f"{over}: relative error {rel:.3g} >= {REL_BOUND:g}")
        worst = max(worst, rel)
    return worst


def _judge_integer(label: str, same, over: str, budget: QuantBudget, is_output: bool) -> None:
    for a, b in same:
        if not is_output and not torch.equal(a, b):
            raise Mismatch(f"changed integer {label}", "(a quant pass never writes integer inputs)")
        agree = float((a == b).double().mean()) if a.numel() else 1.0
        if agree < budget.top1:
            raise Mismatch(f"changed integer {label}", f"{over}: agreement {agree:.1%} < {budget.top1:.0%}")


def _judge_pruned(p: GraphPass, ctx: PassContext, pairs: list[tuple[Run, Run]]) -> list[str]:
    """Expert pruning changes which experts a token reads, so tokens may differ: float values (the
    caches written) finite where they were and within REL_BOUND, integer inputs equal, integer
    outputs of the same shape and dtype."""
    worst = 0.0
    for ref, got in pairs:
        n_out = len(ref.outputs)
        for k, (label, a, b) in enumerate(values(ref, got, ctx)):
            if a.dtype.is_floating_point:
                worst = max(worst, _judge_float(label, [(a, b)], "beyond what expert pruning may change"))
            elif k >= n_out and not torch.equal(a, b):
                raise Mismatch(f"changed integer {label}", "(pruning never writes integer inputs)")
            elif a.shape != b.shape or a.dtype != b.dtype:
                raise Mismatch(f"changed {label}", f"from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)}")
    return [f"verify: float values within relative error {worst:.2e} of the unpruned graph (bound {REL_BOUND:g})"]


@dataclass(frozen=True)
class Check:
    """How verify mode judges one kind of pass: `draws` input draws, then `judge` raises a Mismatch."""
    judge: Callable[[GraphPass, PassContext, list[tuple[Run, Run]]], list[str]]
    draws: int = 1
    why: str = ""


CHECKS: dict[str, Check] = {
    "close": Check(_judge_close, 1, "rewrites and fusions: the same maths, up to float summation order"),
    # 8 draws: top-1 agreement is a rate, and one draw holds only batch x tokens (6) positions
    "quantised": Check(_judge_quantised, 8, "quantisation: judged by the next-token distribution it changes"),
    "pruned": Check(_judge_pruned, 1, "expert pruning: what it must not change (integer inputs, shapes, finite caches)"),
}


def flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)] if isinstance(out, (list, tuple)) else []
