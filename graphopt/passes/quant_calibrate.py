"""Calibrate: observe the inputs of every quantisation site on calibration data, then leave the graph as it was.

Cases (sites, graphopt/quant/graph_sites.py): `aten.linear` with a get_attr weight; the stacked expert
`aten.matmul(x, transpose(get_attr W))` (every token reaches every expert in the dense dispatch, so
each expert is observed on all tokens); a fused `graphopt.moe_experts` (its experts' inputs are
recomputed densely from x and the float gate_up weight, so there too every expert sees every token
while the graph's own output stays routed); the kv_a_layernorm output when kv_cache="int8" (C8).
Not sites: the router (its weight is cast to float32 first), and anything QuantConfig.skip keeps in
16 bit (lm_head, kv_b_proj by default).

How: one call node per site is inserted in front of it (`Observer.observe(x)`, a plain Python call,
so it never reaches a backend), the graph runs over the calibration inputs with a progress bar, and
the call nodes are erased again. Statistics go to ctx.state["quant_observers"][site name], shared
by all graphs of a compile, where quant_insert reads them.

The config: ctx.state["quant"] (what graphopt.compile puts there) or ctx.options["quant"].
Calibration inputs: ctx.state (or ctx.options) ["calibration_inputs"], a callable (graph name -> iterable of input
tuples for this graph) or a list of tuples; without it, `ctx.make_inputs(seed)` for
calibration.num_samples seeds (valid random steps: fine for weight-only RTN/HQQ, a poor sample of
real activations, hence a note in the pass record). Passes nothing if the config needs no data.

Before (layer 0, `capture_main(random_model())`):
    linear: "f32[s18, s5, 32]" = torch.ops.aten.linear.default(mul_46, model_model_layers_0_self_attn_q_a_proj_weight)
While calibrating (removed before the pass returns):
    observe = graphopt_quant_observers_observe(mul_46)
    linear: "f32[s18, s5, 32]" = torch.ops.aten.linear.default(mul_46, model_model_layers_0_self_attn_q_a_proj_weight)
After: the graph is unchanged (modified=False); matches = number of sites observed.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..quant.config import resolve
from ..quant.calibration import observe_expert_inputs
from ..quant.graph_sites import find_sites
from ..quant.observers import Observer
from .base import GraphPass, PassContext, PassResult

__all__ = ["QuantCalibratePass"]


class QuantCalibratePass(GraphPass):
    name = "quant_calibrate"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        config = resolve(ctx.state.quant)
        if config is None or not config.needs_calibration:
            return PassResult(gm, modified=False)
        sites = find_sites(gm, config)
        if not sites:
            return PassResult(gm, modified=False)
        observers = ctx.state.quant_observers
        cal = config.calibration
        hooks = []
        new = lambda name, per_expert=False: observers.setdefault(
            name, Observer(name, cal.max_rows, cal.bins, per_expert=per_expert, seed=cal.seed))
        for site in sites:
            if site.kind == "moe":  # fused experts: every expert's input on every token, computed densely
                gate_up, down = new(f"{site.name}.gate_up_proj"), new(f"{site.name}.down_proj", True)
                hook, args = _moe_observer(gate_up, down), (site.x, site.weight)
            else:
                watched = site.node if site.kind == "latent" else site.x
                hook, args = new(site.name, site.per_expert).observe, (watched,)
            where = gm.graph.inserting_after if site.kind == "latent" else gm.graph.inserting_before
            with where(site.node):                     # the latent is the node's output, the rest its input
                hooks.append(gm.graph.call_function(hook, args))
        gm.recompile()
        inputs, note = _calibration_inputs(ctx, cal.num_samples)
        try:
            with torch.no_grad():
                for args in tqdm(inputs, desc=f"calibrate {ctx.graph_name}", unit="step",
                                 disable=not ctx.options.progress):
                    gm(*args)
        finally:
            for h in hooks:
                gm.graph.erase_node(h)
            gm.recompile()
        return PassResult(gm, modified=False, matches=len(sites), notes=[note] if note else [])


def _moe_observer(gate_up: Observer, down: Observer):
    def observe_moe_inputs(x, gate_up_weight):
        observe_expert_inputs(x, gate_up_weight, gate_up, down)
    return observe_moe_inputs


def _calibration_inputs(ctx: PassContext, n: int):
    given = ctx.state.calibration_inputs
    if callable(given):
        return list(given(ctx.graph_name)), None
    if given is not None:
        return list(given), None
    if ctx.make_inputs is None:
        raise ValueError("quant_calibrate needs calibration inputs: set options['calibration_inputs'] "
                         "(graph name -> input tuples) or a PassContext.make_inputs")
    return [ctx.make_inputs(10_000 + i) for i in range(n)], \
        f"calibrated on {n} random valid steps (no options['calibration_inputs'])"
