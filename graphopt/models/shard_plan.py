"""Which weights tensor and expert parallelism split, and along which dimension: the one rule that the
shard-only loader (`models/shard_load.py`) and the sharding passes (`passes/shard_*.py`) share.

    shard_role("model.layers.0.self_attn.q_b_proj")     -> "column"   rows split over tp (its heads)
    shard_role("model.layers.0.self_attn.o_proj")       -> "row"      columns split over tp, then all_reduce
    shard_role("lm_head") / ("mtp.0.shared_head.head")  -> "vocab"    rows split over tp, then all_gather
    shard_role("model.layers.1.mlp.experts")            -> "experts"  dim 0 split over ep, then all_reduce
    anything else (norms, q_a_proj, kv_a_proj_with_mqa, the router, eh_proj, embeddings) -> None: replicated
"""

from __future__ import annotations

import re

__all__ = ["param_shard", "shard_role"]

_ROLES = (
    ("column", re.compile(r"self_attn\.(q_b_proj|q_proj|kv_b_proj)$|mlp\.(shared_experts\.)?(gate_proj|up_proj)$")),
    ("row", re.compile(r"self_attn\.o_proj$|mlp\.(shared_experts\.)?down_proj$")),
    ("vocab", re.compile(r"(^lm_head|shared_head\.head)$")),
    ("experts", re.compile(r"mlp\.experts$")),
)
_DIM = {"column": 0, "vocab": 0, "row": 1, "experts": 0}


def shard_role(site: str) -> str | None:
    """The role of a model-level module name (a parameter name without its last part)."""
    return next((role for role, pattern in _ROLES if pattern.search(site)), None)


def param_shard(name: str, tp: int, ep: int) -> tuple[int, int] | None:
    """(dim, parts) this parameter is split into under tp / ep, or None when every rank holds all of it.
    Biases of column-parallel linears split with their rows; other biases and norms are replicated."""
    site, _, leaf = name.rpartition(".")
    role = shard_role(site)
    if role == "experts" and leaf in ("gate_up_proj", "down_proj"):
        return (0, ep) if ep > 1 else None
    if role in ("column", "vocab") and leaf in ("weight", "bias") and tp > 1:
        return 0, tp
    if role == "row" and leaf == "weight" and tp > 1:
        return 1, tp
    return None
