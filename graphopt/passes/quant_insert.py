"""Insert quantisation: each site becomes explicit quantize -> integer matmul -> dequantize graphopt ops.

Cases (sites: graphopt/quant/graph_sites.py; schemes and their op sequences: quant/qlinear.py):
  * aten.linear(x, W[, b]) with a get_attr weight            -> the scheme's op sequence on x
  * aten.matmul(x, transpose(W [E, out, K]))  stacked experts -> the same sequence, broadcast over E
    (x [N, K] shared by all experts, or [E, N, K] per expert with per-expert smoothing / scales)
  * graphopt.moe_experts (fused by fuse_moe_experts)          -> graphopt.quantized_moe_experts: the same
    sparse dispatch, each stacked matmul through its quantised op sequence
  * C8: the kv_a_layernorm output                              -> quantize_kv -> dequantize_kv
The quantised tensors come from the same algorithms as quantize_model (quant.algorithms.quantize_target,
with ctx.state["quant_observers"] from quant_calibrate) and are registered on the GraphModule as
buffers `_quant.<site name with __>.<field>`, read by new get_attr nodes; the float weight is dropped
from the module when nothing else reads it. SmoothQuant scope="input": the quantised matmuls reading
one node (views followed back: quant.graph_sites.readers_of_one_input; q_a_proj + kv_a_proj_with_mqa,
gate_proj + up_proj, experts' gate_up + shared experts) get one max|W_j| over all their weights, as
quantize_model computes it, hence equal smooth_inv buffers (one per matmul; save_msmodelslim folds
the factor into the norm). The prefill copy `main_prefill` is quantised with
QuantConfig.prefill_config() (prefill_scheme), every other graph with the config. Not matched
(negative cases): linears the config skips
(router gate, lm_head, kv_b_proj by default) and linears whose weight is computed (a cast) rather
than a get_attr.

Before (w8a8, `capture_main(random_model())`, layer 0):
    linear: "f32[s18, s5, 32]" = torch.ops.aten.linear.default(mul_46, model_model_layers_0_self_attn_q_a_proj_weight)
After:
    quantize_per_token_default = torch.ops.graphopt.quantize_per_token.default(mul_46, None, 127)
    getitem_40: "i8[s5, s18, 64]" = quantize_per_token_default[0]
    getitem_41: "f32[s5, s18, 1]" = quantize_per_token_default[1]
    int8_matmul_default: "i32[s5, s18, 32]" = torch.ops.graphopt.int8_matmul.default(getitem_40, _quant_model__layers__0__self_attn__q_a_proj_weight)
    dequantize_int32_default: "f32[s5, s18, 32]" = torch.ops.graphopt.dequantize_int32.default(int8_matmul_default, getitem_41, _quant_model__layers__0__self_attn__q_a_proj_scale, None, torch.float32)
With SmoothQuant scope="input" (`random_model(num_hidden_layers=2)`, after the normalise phase), the
two readers of one rms_norm get buffers of equal values:
    quantize_per_token_default = torch.ops.graphopt.quantize_per_token.default(rms_norm_default, _quant_model__layers__0__self_attn__q_a_proj_smooth_inv, 127)
    quantize_per_token_default_2 = torch.ops.graphopt.quantize_per_token.default(rms_norm_default, _quant_model__layers__0__self_attn__kv_a_proj_with_mqa_smooth_inv, 127)
"""

from __future__ import annotations

import torch
from torch import fx

from ..ops import quant as _quant_ops  # noqa: F401  registers torch.ops.graphopt.* quant ops
from ..quant.algorithms import Target, quantize_target
from ..quant.algorithms.smoothquant import shared_column_amax, shares_input_factor
from ..quant.config import resolve
from ..quant.graph_sites import Site, attr_tensor, find_sites, readers_of_one_input
from ..quant.qlinear import QuantizedLinear, emit_linear, moe_op_args
from .base import GraphPass, PassContext, PassResult
from .split_prefill_weights import quant_config_for
from .patterns import call_op, fake_mode_of

__all__ = ["QuantInsertPass"]

OPS = torch.ops.graphopt


class QuantInsertPass(GraphPass):
    name = "quant_insert"
    # verify mode compares with the float graph, so it judges what quantisation may change (the
    # next-token distributions, per scheme: verify.QUANT_BUDGETS), not elementwise closeness; exact
    # numerics are tested against the eager quantised model instead
    numerics = "quantised"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config = resolve(quant_config_for(ctx.state.quant, ctx.graph_name))   # main_prefill: prefill_scheme
        if config is None:
            return PassResult(gm, modified=False)
        sites = find_sites(gm, config)
        observers = ctx.state.quant_observers
        column_amax = _shared_column_amax(gm, sites, config) if shares_input_factor(config) else {}
        fake = fake_mode_of(gm)
        old_weights = set()
        for site in sites:
            if site.kind == "latent":
                _insert_kv(gm, site, observers, fake)
                continue
            if site.kind == "moe":
                _insert_moe(gm, site, config, observers, column_amax, fake)
                old_weights |= {site.weight, site.down}
                continue
            weight = attr_tensor(gm, site.weight.target).detach().float()
            bias = attr_tensor(gm, site.bias.target).detach().float() if site.bias is not None else None
            q = quantize_target(Target(site.name, weight, bias, config.scheme_for(site.name), config,
                                       observers.get(site.name), column_amax.get(site.name)))
            out_dtype = site.node.meta["val"].dtype
            with gm.graph.inserting_before(site.node):
                tensors = {k: _buffer(gm, site.name, k, t, fake) for k, t in q.tensors.items()}
                call = lambda op, *args: call_op(gm.graph, fake, op, args)
                y = emit_linear(call, site.x, q, tensors, out_dtype)
            y.meta.setdefault("stack_trace", site.node.meta.get("stack_trace"))
            site.node.replace_all_uses_with(y)
            gm.graph.erase_node(site.node)
            old_weights |= {site.weight, site.bias} - {None}
        _drop_unused_attrs(gm, old_weights)
        return PassResult(gm, modified=bool(sites), matches=len(sites))


def _shared_column_amax(gm: fx.GraphModule, sites: list[Site], config) -> dict[str, torch.Tensor]:
    """{matmul name: max|W_j| [K] over every quantised matmul reading its input}, for the groups of two
    or more (SmoothQuant scope="input"); the float32 weights, as quantize_model takes them."""
    out = {}
    for group in readers_of_one_input(sites, config):
        amax = shared_column_amax([attr_tensor(gm, w.target).detach().float() for _, w in group])
        out.update((name, amax) for name, _ in group)
    return out


def _insert_moe(gm: fx.GraphModule, site: Site, config, observers: dict, column_amax: dict, fake) -> None:
    """graphopt.moe_experts -> graphopt.quantized_moe_experts with the stacked matmuls quantised."""
    parts, tensors = [], []
    for part, node in (("gate_up_proj", site.weight), ("down_proj", site.down)):
        name, w = f"{site.name}.{part}", attr_tensor(gm, node.target)
        scheme = config.scheme_for(name)
        with gm.graph.inserting_before(site.node):
            if scheme is None:                  # this matmul stays in 16 bit: pass the float weight on
                parts.append(QuantizedLinear("bf16", {"weight": w}))
                tensors.append({"weight": node})
                continue
            q = quantize_target(Target(name, w.detach().float(), None, scheme, config, observers.get(name),
                                       column_amax.get(name)))
            parts.append(q)
            tensors.append({k: _buffer(gm, name, k, t, fake) for k, t in q.tensors.items()})
    x, weights, ids = site.node.args[:3]
    with gm.graph.inserting_before(site.node):
        y = call_op(gm.graph, fake, OPS.quantized_moe_experts.default,
                    (x, weights, ids, *moe_op_args(parts[0], parts[1], *tensors)))
    y.meta.setdefault("stack_trace", site.node.meta.get("stack_trace"))
    site.node.replace_all_uses_with(y)
    gm.graph.erase_node(site.node)


def _buffer(gm: fx.GraphModule, site: str, field: str, tensor: torch.Tensor, fake) -> fx.Node:
    name = f"_quant_{site.replace('.', '__')}_{field}"
    device = _device_of(gm)
    if tensor.device != device:  # the algorithms compute beside the weights; this is the one explicit move
        tensor = tensor.to(device)
    gm.register_buffer(name, tensor)
    node = gm.graph.get_attr(name)
    if fake is not None:
        node.meta["val"] = fake.from_tensor(tensor, static_shapes=True)
    return node


def _device_of(gm: fx.GraphModule) -> torch.device:
    """The device of the graph's weights (the model's device): where every quantised tensor must live."""
    for t in (*gm.parameters(), *gm.buffers()):
        if t.dtype.is_floating_point:
            return t.device
    raise ValueError("quant_insert: the graph holds no floating-point weight to take the device from")


def _insert_kv(gm: fx.GraphModule, site: Site, observers: dict, fake) -> None:
    obs = observers.get(site.name)
    if obs is None:
        raise RuntimeError(f"{site.name}: C8 needs the latent's calibrated abs-max; run quant_calibrate first")
    latent = site.node
    users = list(latent.users)
    with gm.graph.inserting_after(latent):
        scale = _buffer(gm, site.name, "kv_scale", obs.channel_amax().clamp_min(1e-8) / 127, fake)
    with gm.graph.inserting_after(scale):
        q = call_op(gm.graph, fake, OPS.quantize_kv.default, (latent, scale))
    with gm.graph.inserting_after(q):
        back = call_op(gm.graph, fake, OPS.dequantize_kv.default, (q, scale, latent.meta["val"].dtype))
    for u in users:
        u.replace_input_with(latent, back)


def _drop_unused_attrs(gm: fx.GraphModule, nodes: set[fx.Node]) -> None:
    """Erase float weight get_attrs nobody reads any more, and the tensor if no get_attr names it."""
    for node in nodes:
        for user in list(node.users):
            if user.op == "call_function" and user.target is torch.ops.aten.transpose.int and not user.users:
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
    still = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in {n.target for n in nodes} - still:
        owner, _, leaf = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if hasattr(mod, leaf):
            delattr(mod, leaf)
