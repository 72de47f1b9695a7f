"""The Ascend lowering plan: how every node of a Program's graphs is run on an NPU, decided offline.

This module needs neither torch_npu nor torchair, so CI can check, on any machine, that a Program
(e.g. spec="mtp" + quant="w8a8") has an Ascend implementation for every node:

    torch_npu      the op becomes a call of a fused torch_npu kernel (`npu_impls.py`), which torchair
                   lowers with its own GE converter (graph mode) or runs as is (captured mode)
    decomposition  the op becomes its reference implementation in plain torch (the op's definition,
                   graphopt/ops), which torchair lowers op by op through its ATen converters
    aten           an ATen op torchair lowers itself
    python         shape arithmetic and tuple indexing (operator.*), gone once the graph is traced

`lowering_plan(program)` lists (graph, node, op, route, target) for every call node;
`check_plan(program)` raises `UnmappedOpError` naming every op without a route.

What was run: the plan and the decomposition rewrite (`lowering.py`) run in CI on the CPU. Nothing
here has run on an NPU: the torch_npu routes are written against the torch_npu / torchair public API
and its documented signatures, and are marked `executed: no` in docs/backends.md.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["ASCEND_OPS", "PlanRow", "Route", "UnmappedOpError", "check_plan", "lowering_plan", "route_of"]


@dataclass(frozen=True)
class Route:
    kind: str           # "torch_npu" | "decomposition" | "aten" | "python"
    target: str         # the torch_npu function(s), or what the decomposition is
    note: str = ""      # conditions (shapes, dtypes, chips) under which the route applies


# every graphopt:: op, by its overload name; ops/ is the list (tests check none is missing)
ASCEND_OPS: dict[str, Route] = {
    "graphopt.rms_norm.default": Route("torch_npu", "npu_rms_norm", "returns (y, rstd); y = weight * norm(x)"),
    "graphopt.swiglu.default": Route("torch_npu", "npu_swiglu", "on cat([gate, up], -1), dim=-1"),
    "graphopt.linear.default": Route("decomposition", "aten.linear (its reference)",
                                     "only the inductor backend on CUDA writes this op; Program graphs hold aten.linear"),
    "graphopt.moe_route.default": Route(
        "torch_npu", "npu_moe_gating_top_k",
        "sigmoid + noaux_tc (group top-2 sum, bias) routing with renorm and routed_scaling_factor; A2/A3 "
        "kernels accept 256 experts and k_group 4 only: other shapes (and softmax / greedy routers) take "
        "the decomposition"),
    "graphopt.moe_experts.default": Route(
        "torch_npu", "npu_grouped_matmul (x2) + npu_swiglu",
        "assignments sorted by expert on the device (torch), one grouped GEMM per projection over the "
        "per-expert counts, weighted combine in float32 (torch)"),
    "graphopt.moe_expert_terms.default": Route(
        "decomposition", "its reference", "no Program holds it: the CUDA backend's decode-step form of moe_experts"),
    "graphopt.quantized_moe_experts.default": Route(
        "decomposition", "sparse_moe over the quantised linears' op sequence",
        "per expert: npu_dynamic_quant + npu_quant_matmul through the linear routes below"),
    "graphopt.mla_attention.default": Route("decomposition", "absorbed / expanded MLA in torch",
                                            "only before use_paged_attention rewrote it"),
    "graphopt.mla_paged_attention.default": Route(
        "torch_npu", "npu_fused_infer_attention_score",
        "absorbed form: q_lat = q_nope W_UK as the query, the latent cache as key and value (one KV head), "
        "rope parts as query_rope / key_rope, block_table + actual_seq_lengths_kv, causal mask inside the "
        "1+k queries (sparse_mode 3); out @ W_UV. T > 8 (prefill) takes the decomposition"),
    "graphopt.kv_cache_write.default": Route("torch_npu", "npu_scatter_nd_update_",
                                             "in-place write of the new slots into the flat cache view"),
    "graphopt.sampling_probs.default": Route("decomposition", "softmax, top-k, top-p bisection in torch"),
    "graphopt.sample_from_probs.default": Route("decomposition", "counter-based draw + cumulative search in torch"),
    "graphopt.rejection_accept.default": Route("decomposition", "speculative acceptance in torch"),
    "graphopt.greedy_accept.default": Route("decomposition", "argmax comparison in torch"),
    "graphopt.quantize_per_token.default": Route("torch_npu", "npu_dynamic_quant",
                                                 "smooth_scales = smooth_inv; qmax 127 only"),
    "graphopt.quantize_per_tensor.default": Route("decomposition", "round(x / scale) + zero, clamped, in torch"),
    "graphopt.int8_matmul.default": Route("torch_npu", "npu_quant_matmul",
                                          "fused with the dequantize_int32 that follows (pertoken_scale, "
                                          "scale, bias, output_dtype); alone: the decomposition"),
    "graphopt.dequantize_int32.default": Route("torch_npu", "npu_quant_matmul (fused with int8_matmul)",
                                               "alone: the decomposition"),
    "graphopt.w4a8_matmul.default": Route("decomposition", "int4 nibbles unpacked, widened to int8 x group scales, int8 matmul",
                                          "npu_quant_matmul's int4 path wants int32-packed codes (graphopt packs two per uint8)"),
    "graphopt.dequantize_weight.default": Route("torch_npu", "npu_weight_quant_batchmatmul",
                                                "fused with the linear that reads it (antiquant_scale / offset, "
                                                "antiquant_group_size); alone: the decomposition"),
    "graphopt.dequantize_int4.default": Route("decomposition", "int4 nibbles unpacked, (nibble - zero) x scale in torch",
                                              "npu_weight_quant_batchmatmul's int4 path wants int32-packed codes"),
    "graphopt.dequantize_int2.default": Route("decomposition", "int2 codes unpacked, (code - zero) x scale in torch"),
    "graphopt.dequantize_lut4.default": Route("decomposition", "4-bit codes unpacked, codebook[codes] x scale in torch"),
    "graphopt.dequantize_lut.default": Route("decomposition", "codebook[codes] x scale per group in torch"),
    "graphopt.quantize_fp8.default": Route("decomposition", "e4m3 rounding in torch", "Atlas A2/A3 have no fp8 GEMM"),
    "graphopt.fp8_linear.default": Route("decomposition", "dequantise + matmul in torch", "Atlas A2/A3 have no fp8 GEMM"),
    "graphopt.quantize_kv.default": Route("decomposition", "round(x / scale) to int8 in torch", "C8 cache"),
    "graphopt.kv_int8_entry.default": Route("decomposition", "cat of the int8 latent codes and the rope bytes in torch",
                                            "C8 int8 cache storage"),
    "graphopt.mla_paged_attention_int8.default": Route("decomposition", "gather, decode int8 codes x scale, mla_attention",
                                                       "C8 int8 cache storage; npu_fused_infer_attention_score's "
                                                       "antiquant path is not wired"),
    "graphopt.dequantize_kv.default": Route("decomposition", "int8 x scale in torch",
                                            "inside npu_fused_infer_attention_score (antiquant) once fused"),
    "graphopt.hadamard_transform.default": Route("decomposition", "block Hadamard matmul in torch"),
}

_PYTHON = {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod,
           operator.neg, operator.truediv}


class UnmappedOpError(ValueError):
    """A node of the Program has no Ascend route; the message lists them."""


@dataclass(frozen=True)
class PlanRow:
    graph: str
    node: str
    op: str
    route: Route


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def route_of(node: fx.Node) -> Route | None:
    """The route of one call node, None when there is none."""
    t = node.target
    if node.op == "call_module":
        return Route("python", "export guard module (dropped at lowering)") if node.target == "_guards_fn" else None
    if t in _PYTHON:
        return Route("python", _op_name(t))
    if isinstance(t, torch._ops.OpOverload):
        if t.namespace == "graphopt":
            return ASCEND_OPS.get(_op_name(t))
        if t.namespace == "aten":
            return Route("aten", _op_name(t), "torchair's ATen converters")
    return None


def lowering_plan(program) -> list[PlanRow]:
    """One row per call node of every graph of `program` (a passes.program.Program)."""
    rows = []
    for name, gm in program.graphs.items():
        for node in gm.graph.nodes:
            if node.op in ("call_function", "call_module"):
                route = route_of(node)
                rows.append(PlanRow(name, node.name, _op_name(node.target), route or Route("unmapped", "")))
    return rows


def check_plan(program) -> list[PlanRow]:
    """The plan; UnmappedOpError listing every op (and a node using it) without an Ascend route."""
    rows = lowering_plan(program)
    missing = {}
    for r in rows:
        if r.route.kind == "unmapped":
            missing.setdefault(r.op, f"{r.graph}/{r.node}")
    if missing:
        listed = ", ".join(f"{op} (e.g. {where})" for op, where in sorted(missing.items()))
        raise UnmappedOpError(f"no Ascend lowering for {len(missing)} op(s): {listed}; add a route in "
                              "graphopt/backends/ascend/plan.py (a torch_npu kernel or the op's decomposition)")
    return rows


def summary(rows: list[PlanRow]) -> dict[str, dict[str, int]]:
    """{kind: {op: nodes}}: what the report and docs show."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r.route.kind, {}).setdefault(r.op, 0)
        out[r.route.kind][r.op] += 1
    return out
