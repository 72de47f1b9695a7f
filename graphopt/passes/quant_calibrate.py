"""Calibrate: observe the inputs of every quantisation site on calibration data, then leave the graph as it was.

Cases (sites, graphopt/quant/graph_sites.py): `aten.linear` with a get_attr weight; the stacked expert
`aten.matmul(x, transpose(get_attr W))` (the dense dispatch computes every expert on every token; the
per-expert down_proj input counts for expert e only on the tokens routed to e, read from the
router's ids in the `einsum(y, scatter(zeros, 1, ids, weights))` that combines the experts); a fused
`graphopt.moe_experts(x, weights, ids, ...)` (its experts' inputs are recomputed densely from x and
the float gate_up weight and counted on the routed tokens by the same ids, while the graph's own
output is untouched); the kv_a_layernorm output when kv_cache="int8" (C8). Experts routed fewer
than calibration.min_expert_tokens tokens fall back to every token (quant/observers.py) and are
listed in the pass record; the shared gate_up input is observed on every token (each is routed).
Not sites: the router (its weight is cast to float32 first), and anything QuantConfig.skip keeps in
16 bit (lm_head, kv_b_proj by default).
The prefill copy `main_prefill` (split_prefill_weights) is the same float graph as main on the same
data: its sites reuse main's observers, and only sites main did not observe (a scheme main leaves in
16 bit) run, on main's calibration inputs; its config is QuantConfig.prefill_config().

How: one call node per site is inserted in front of it (`Observer.observe(x)`, a plain Python call,
so it never reaches a backend), the graph runs over the calibration inputs with a progress bar, and
the call nodes are erased again. Statistics go to ctx.state["quant_observers"][site name], shared
by all graphs of a compile, where quant_insert reads them.

The config: ctx.state["quant"] (what graphopt.compile puts there) or ctx.options["quant"].
Calibration inputs: ctx.state (or ctx.options) ["calibration_inputs"], a callable (graph name -> iterable of input
tuples for this graph; graphopt.compile passes a quant.calibration.GraphCalibration, which also says
what data it is) or a list of tuples. Without them: random valid steps (`ctx.make_inputs(seed)`, for
calibration.num_samples seeds) only when the config names the "random" source alone, else an error
saying what to pass. The pass record says which data calibrated the graph (its origin: sources,
tokenizer or token ids; steps and tokens). Passes nothing if the config needs no data. SmoothQuant
scope="input" needs nothing more here: the matmuls reading one node each observe it (the same
max|X_j|), and quant_insert shares max|W_j| between them.

Before (layer 0, `capture_main(random_model())`):
    linear: "f32[s18, s5, 32]" = torch.ops.aten.linear.default(mul_46, model_model_layers_0_self_attn_q_a_proj_weight)
While calibrating (removed before the pass returns):
    observe = graphopt_quant_observers_observe(mul_46)
    linear: "f32[s18, s5, 32]" = torch.ops.aten.linear.default(mul_46, model_model_layers_0_self_attn_q_a_proj_weight)
After: the graph is unchanged (modified=False); matches = number of sites observed.
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm import tqdm

from ..quant.config import CalibrationConfig, resolve
from ..quant.calibration import RANDOM, observe_expert_inputs, routed_mask
from ..quant.graph_sites import find_sites
from ..quant.observers import Observer
from .base import GraphPass, PassContext, PassResult
from .split_prefill_weights import PREFILL_MAIN, calibration_graph, quant_config_for

__all__ = ["QuantCalibratePass"]


class QuantCalibratePass(GraphPass):
    name = "quant_calibrate"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        config = resolve(quant_config_for(ctx.state.quant, ctx.graph_name))
        if config is None or not config.needs_calibration:
            return PassResult(gm, modified=False)
        sites = find_sites(gm, config)
        observers = ctx.state.quant_observers
        if ctx.graph_name == PREFILL_MAIN:   # main's copy: main's statistics are this graph's (same float graph, same data)
            sites = [s for s in sites if not all(n in observers for n in _observer_names(s))]
            if not sites:
                return PassResult(gm, modified=False, notes=["every site observed on main (the same float graph and data)"])
        if not sites:
            return PassResult(gm, modified=False)
        cal = config.calibration
        inputs, note = _calibration_inputs(ctx, cal)     # before touching the graph: a missing input is an error
        hooks, notes, routed = [], [], []
        new = lambda name, per_expert=False: observers.setdefault(name, Observer(
            name, cal.max_rows, cal.bins, per_expert=per_expert, seed=cal.seed, min_routed=cal.min_expert_tokens))
        for site in sites:
            if site.kind == "moe":  # fused experts: every expert's input computed densely, counted where routed
                gate_up, down = new(f"{site.name}.gate_up_proj").track_routed_rows(), new(f"{site.name}.down_proj", True)
                hook, args = _moe_observer(gate_up, down), (site.x, site.weight, site.node.args[2])
                routed.append(down)
            elif site.per_expert and (ids := _routing_ids(site.node)) is not None:
                obs = new(site.name, True)
                hook, args = _routed_observer(obs), (site.x, ids)
                routed.append(obs)
            else:
                watched = site.node if site.kind == "latent" else site.x
                hook, args = new(site.name, site.per_expert).observe, (watched,)
                if site.per_expert:
                    notes.append(f"{site.name}: router ids not found, every expert observed on every token")
            where = gm.graph.inserting_after if site.kind == "latent" else gm.graph.inserting_before
            with where(site.node):                     # the latent is the node's output, the rest its input
                hooks.append(gm.graph.call_function(hook, args))
        gm.recompile()
        try:
            with torch.no_grad():
                for args in tqdm(inputs, desc=f"calibrate {ctx.graph_name}", unit="step",
                                 disable=not ctx.options.progress):
                    gm(*args)
        finally:
            for h in hooks:
                gm.graph.erase_node(h)
            gm.recompile()
        for obs in routed:
            if obs.dense_experts():
                notes.append(f"{obs.name}: experts {obs.dense_experts()} routed fewer than {cal.min_expert_tokens} "
                             "tokens, observed on every token")
        return PassResult(gm, modified=False, matches=len(sites), notes=[note, *notes])


def _observer_names(site) -> list[str]:
    return [f"{site.name}.gate_up_proj", f"{site.name}.down_proj"] if site.kind == "moe" else [site.name]


def _moe_observer(gate_up: Observer, down: Observer):
    def observe_moe_inputs(x, gate_up_weight, ids):
        observe_expert_inputs(x, gate_up_weight, gate_up, down, ids)
    return observe_moe_inputs


def _routed_observer(obs: Observer):
    def observe_routed_input(x, ids):           # x [E, N, I], ids [N, k]
        obs.observe_routed(x, routed_mask(ids, x.shape[0]))
    return observe_routed_input


_CASTS = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)


def _routing_ids(node: fx.Node) -> fx.Node | None:
    """ids [N, k] of the dense dispatch that `node` (a per-expert matmul) feeds:
    einsum("enh,ne->nh", y, scatter(zeros, 1, ids, weights)), a few ops downstream."""
    frontier = [node]
    for _ in range(4):
        frontier = [u for n in frontier for u in n.users]
        for u in frontier:
            if u.target is not torch.ops.aten.einsum.default:
                continue
            for a in u.args[1]:
                while isinstance(a, fx.Node) and a.target in _CASTS:
                    a = a.args[0]
                if isinstance(a, fx.Node) and a.target is torch.ops.aten.scatter.src:
                    return a.args[2]
    return None


def _calibration_inputs(ctx: PassContext, cal: CalibrationConfig) -> tuple[list, str]:
    """(input tuples for this graph, what they are for the pass record)."""
    given = ctx.state.calibration_inputs
    if given is not None:
        inputs = list(given(calibration_graph(ctx.graph_name)) if callable(given) else given)
        if not inputs:
            raise ValueError(f"quant_calibrate ({ctx.graph_name}): the calibration inputs for this graph are empty")
        tokens = sum(int(a[0].numel()) for a in inputs if isinstance(a[0], torch.Tensor) and not a[0].is_floating_point())
        origin = getattr(given, "description", "the given calibration_inputs")
        return inputs, f"calibrated on {len(inputs)} steps ({tokens} tokens) of {origin}"
    if cal.tokens is not None or any(spec != RANDOM for spec, _ in cal.sources) or ctx.make_inputs is None:
        raise ValueError(
            f"quant_calibrate ({ctx.graph_name}): no calibration inputs. graphopt.compile builds them from "
            "QuantConfig.calibration; running the pass yourself, set CompileState.calibration_inputs (graph name "
            "-> input tuples, e.g. quant.calibration.step_inputs(model, tokens, block_size).__getitem__), or name "
            "only the random source, CalibrationConfig(sources=(('random', 1.0),)), for random valid steps")
    n = cal.num_samples
    return [ctx.make_inputs(10_000 + i) for i in range(n)], \
        f"calibrated on {n} random valid steps (the 'random' source, as configured)"
