"""The inductor backend: the Program's step, greedy step, prefill and main graphs compiled by Inductor
(once each, dynamic batch / token / table / cache sizes), graphopt's Triton kernels registered as the
CUDA implementations of the graphopt:: ops they speed up, and on CUDA the WHOLE decode step (verify,
acceptance, sampling, MTP drafts, cache writes, next-step inputs) replayed as one CUDA graph per batch
bucket over static input buffers, and each prefill chunk as one per (rows, tokens, table width)
bucket. docs/backends.md has the buckets, when a graph is re-captured and
what memory the graphs hold.
"""

from .backend import InductorBackend, InductorExecutable, batch_buckets, for_inductor, prefill_shape

__all__ = ["InductorBackend", "InductorExecutable", "batch_buckets", "for_inductor", "prefill_shape"]
