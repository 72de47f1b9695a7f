"""Validated options of `graphopt.compile` (the public API's config dataclasses live here and in
`graphopt.spec` / `graphopt.quant.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

BACKENDS = ("auto", "eager")


@dataclass
class CompileOptions:
    """The `**options` of `graphopt.compile`; an unknown key is a ValueError listing these."""

    block_size: int = 16                  # tokens per KV-cache block
    disable_passes: list[str] = field(default_factory=list)
    max_batch_size: int = 64              # rows the runtime batches at once
    cache_budget_bytes: int | None = None  # KV-cache memory; None: enough for max_batch_size full rows
    prefill_chunk_size: int = 512         # longer prompts are prefilled in chunks of this many tokens
    fold_max_bytes: int = 64 << 20        # fold_constants skips results larger than this

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> "CompileOptions":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown compile option(s) {unknown}; accepted options: {names}")
        opts = cls(**options)
        if opts.block_size < 1 or opts.block_size & (opts.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {opts.block_size}")
        if opts.max_batch_size < 1 or opts.prefill_chunk_size < 1:
            raise ValueError("max_batch_size and prefill_chunk_size must be >= 1")
        if isinstance(opts.disable_passes, str):
            opts.disable_passes = [p.strip() for p in opts.disable_passes.split(",") if p.strip()]
        return opts


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    return "eager" if backend == "auto" else backend
