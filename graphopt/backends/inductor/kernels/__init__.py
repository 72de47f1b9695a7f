"""graphopt's Triton kernels: CUDA implementations of existing graphopt:: ops (the reference and fake
implementations in graphopt/ops stay the definition; a kernel never changes what an op means).

    mla_decode   graphopt::mla_paged_attention, absorbed MLA over the paged latent cache, split-K
    moe          graphopt::moe_experts, grouped expert GEMMs that read only the selected experts
    moe_route    graphopt::moe_route, the router (logits, scoring, group-limited top-k) in one program per token
    gemv         graphopt::linear, a GEMV for one row that streams the weight once (cuBLAS for more rows)
    quant_gemm   graphopt::int8_matmul (int8 tensor cores) and graphopt::fp8_linear (FP8, rowwise scales)
    int8_gemv    graphopt::int8_matmul at one row through gemv.py's program in int32
    w4a8_gemv    graphopt::w4a8_matmul at one row as a GEMV on the CUDA cores
    int8_expert_gemv  graphopt::int8_matmul over batched (per-expert) weights, one row each, in one
                 launch of int8_gemv's program (opt-in, below)
    int8_moe     graphopt::quantized_moe_experts for w8a8 experts at decode sizes: quantise, int8 dot,
                 dequantise and SwiGLU in one launch, the down projection in a second (opt-in, below)
    w4a8_gemm    graphopt::w4a8_matmul, the packed int4 weight widened to int8 in registers (up to 16 rows)

`register_all()` registers every available kernel for the "cuda" dispatch key (idempotent); the
inductor backend calls it when it lowers a Program for a CUDA device. GRAPHOPT_DISABLE_KERNELS=
"mla_paged_attention,moe_experts,moe_route,quant_gemm,linear,w4a8_matmul,int8_gemv,w4a8_gemv,
int8_expert_gemv,int8_moe" (or "all") leaves kernels out, for A/B runs in a fresh process; a name that is not
a kernel is an error (ValueError, with the accepted names).
A kernel joins the default set once its GPU tests have passed on the H200 (or an H100) and it has
been measured there against what it replaces; until then it is in OPT_IN and registered only when
GRAPHOPT_ENABLE_KERNELS names it (its interpreter tests run in CI).
"""

from __future__ import annotations

import os

from . import gemv, int8_moe, mla_decode, moe, moe_route, quant_gemm, w4a8_gemm

__all__ = ["register_all", "registered", "enable_route", "OPT_IN"]

_REGISTERED: list[str] = []
# w4a8_matmul joined the default set on 2026-12-07 (H100: 7-15x its reference path at decode sizes),
# int8_gemv and w4a8_gemv the same day (H100, one row: 1.3-2.3x and 0.9-1.8x a bf16 GEMM, faster than
# what each replaces at every V2-Lite linear). int8_expert_gemv was written after that day's device
# time ran out: bit-identical in Triton's interpreter, not yet run on a GPU; int8_moe (2026-12-08)
# likewise (tested against the reference under the interpreter only).
OPT_IN = {"int8_expert_gemv", "int8_moe"}
# routes: a kernel form inside another kernel's op implementation, switched on by a row limit in its
# module's ROUTE_ROWS (name -> module, rows it takes once enabled, the kernel module it runs if another)
_ROUTES = {"int8_gemv": (quant_gemm, 1, gemv), "w4a8_gemv": (w4a8_gemm, w4a8_gemm.GEMV_MAX_ROWS, None),
           "int8_expert_gemv": (quant_gemm, 1, gemv), "int8_moe": (quant_gemm, 1, int8_moe)}
# every name GRAPHOPT_DISABLE_KERNELS / GRAPHOPT_ENABLE_KERNELS accept -> (available, register), in
# registration order: the op kernels, then the routes inside them
_KERNELS = {
    **{name: (module.available, module.register)
       for name, module in (("mla_paged_attention", mla_decode), ("moe_experts", moe), ("moe_route", moe_route),
                            ("quant_gemm", quant_gemm), ("linear", gemv), ("w4a8_matmul", w4a8_gemm))},
    **{name: (lambda owner=owner, runs=runs: owner.available() and (runs is None or runs.available()),
              lambda name=name: enable_route(name))
       for name, (owner, _, runs) in _ROUTES.items()},
}


def register_all() -> list[str]:
    """Register the kernels whose dependencies (triton, CUDA) are present; returns their names."""
    off = _names("GRAPHOPT_DISABLE_KERNELS", {"all"})
    wanted = _names("GRAPHOPT_ENABLE_KERNELS", set())
    for name, (available, register) in _KERNELS.items():
        if name in OPT_IN and name not in wanted:
            continue
        if name not in _REGISTERED and available() and not off & {name, "all"}:
            register()
            _REGISTERED.append(name)
    return list(_REGISTERED)


def enable_route(name: str) -> None:
    """Switch a GEMV route on: its op implementation takes it up to the route's rows from now on."""
    owner, rows, _ = _ROUTES[name]
    owner.ROUTE_ROWS[name] = rows


def registered() -> list[str]:
    return list(_REGISTERED)


def _names(variable: str, extra: set[str]) -> set[str]:
    """The comma-separated kernel names in an environment variable; a name that is not a kernel is an
    error (a typo would otherwise leave an A/B run silently unchanged)."""
    names = {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}
    known = set(_KERNELS) | extra
    if names - known:
        raise ValueError(f"{variable}={os.environ[variable]!r}: unknown kernel name(s) "
                         f"{', '.join(sorted(names - known))}; accepted: {', '.join(sorted(known))}")
    return names
