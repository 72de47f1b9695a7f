"""Speculative decoding configuration: `graphopt.compile(model, spec=...)`.

    spec=None                                   plain decoding (one token per step)
    spec="mtp"                                  the model's own MTP head drafts one token (k = 1)
    spec=SpecConfig(method="mtp", num_speculative_tokens=k)
                                                k drafts per step, chaining the MTP layer(s); the main
                                                model verifies 1 + k tokens in the same step graph

What a step computes is written down in docs/speculative.md and graphopt/step/spec_step.py.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpecConfig", "SUPPORTED_METHODS", "MAX_SPECULATIVE_TOKENS", "resolve_spec"]

SUPPORTED_METHODS = ("mtp",)
# Verification runs 1 + k query tokens through the absorbed MLA path (graphopt.ops.attention,
# ABSORB_MAX_TOKENS = 8), and acceptance beyond a few drafts is rare (DeepSeek-V3: 85-90% for the 2nd).
MAX_SPECULATIVE_TOKENS = 7


@dataclass(frozen=True)
class SpecConfig:
    """method: how drafts are made ("mtp": the checkpoint's MTP layer(s)); k = num_speculative_tokens."""

    method: str = "mtp"
    num_speculative_tokens: int = 1

    def __post_init__(self) -> None:
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"SpecConfig.method = {self.method!r} is not supported; accepted values: "
                             f"{', '.join(map(repr, SUPPORTED_METHODS))}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"SpecConfig.num_speculative_tokens = {k!r} is not supported; accepted values: "
                             f"integers 1..{MAX_SPECULATIVE_TOKENS} (use spec=None for plain decoding)")


def resolve_spec(spec: "str | SpecConfig | None") -> SpecConfig | None:
    """The SpecConfig meant by a `compile(spec=...)` argument: None, "mtp" (k = 1) or a SpecConfig."""
    if spec is None or isinstance(spec, SpecConfig):
        return spec
    if isinstance(spec, str) and spec in SUPPORTED_METHODS:
        return SpecConfig(method=spec)
    raise ValueError(f"spec = {spec!r} is not supported; accepted values: None, "
                     f"{', '.join(map(repr, SUPPORTED_METHODS))} (one draft token) or "
                     f"graphopt.SpecConfig(method='mtp', num_speculative_tokens=k)")
