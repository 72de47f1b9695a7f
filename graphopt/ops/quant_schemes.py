"""The quantisation schemes graphopt knows by name: what a weight and its input activation become.

`SCHEMES[name]` says which op sequence a quantised linear runs (`ops/quant_linear.py`); the weight
maths that produces the tensors (grids, groups, clipping) lives in `graphopt/quant/schemes.py`, which
re-exports these names. The table is in `ops` because the ops' own references (the quantised MoE
expert op) read it, and `ops` imports nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuantError", "SCHEMES", "Scheme", "get_scheme"]


class QuantError(ValueError):
    """A quantisation request names something graphopt does not support, or data is malformed."""


@dataclass(frozen=True)
class Scheme:
    name: str
    weight: str          # "int8" | "int4" | "int2" | "fp8" | "hif8" | "nf4" | "none"
    activation: str      # "int8_dynamic" | "int8_static" | "fp8_dynamic" | "none"
    grouped: bool        # weight scales per group of `group_size` input channels
    blocked: bool = False  # fp8 128x128 blocks
    summary: str = ""

    @property
    def quantized(self) -> bool:
        return self.weight != "none"

    @property
    def weight_bits(self) -> int:
        return {"int8": 8, "int4": 4, "int2": 2, "fp8": 8, "hif8": 8, "nf4": 4, "none": 16}[self.weight]

    @property
    def per_byte(self) -> int:
        """Weight values stored in one byte: 2 for int4 and NF4 codes, 4 for int2 (graphopt/ops/packing.py)."""
        return {"int4": 2, "nf4": 2, "int2": 4}.get(self.weight, 1)

    @property
    def codebook(self) -> bool:
        """Weights are codes into a value table (graphopt::dequantize_lut), not integers on a grid."""
        return self.weight in ("hif8", "nf4")


SCHEMES: dict[str, Scheme] = {s.name: s for s in [
    Scheme("w8a8", "int8", "int8_dynamic", False, summary="int8 per-channel weights, int8 per-token dynamic activations"),
    Scheme("w8a8_static", "int8", "int8_static", False, summary="int8 per-channel weights, int8 per-tensor static activations"),
    Scheme("w4a8", "int4", "int8_dynamic", True, summary="int4 group-wise weights (progressive via int8), int8 per-token activations"),
    Scheme("w8a16", "int8", "none", False, summary="int8 per-channel weights, 16-bit activations"),
    Scheme("w4a16", "int4", "none", True, summary="int4 group-wise weights, 16-bit activations"),
    Scheme("fp8", "fp8", "fp8_dynamic", False, summary="e4m3 per-channel weights, e4m3 per-token activations"),
    Scheme("fp8_block", "fp8", "fp8_dynamic", False, blocked=True, summary="e4m3 128x128 block weights, per-token-per-128 activations"),
    Scheme("w2a16", "int2", "none", True, summary="int2 group-wise weights (asymmetric, float zero point), 16-bit activations"),
    Scheme("hif8", "hif8", "none", False, summary="HiFloat8 per-channel scaled weights (uint8 codes), 16-bit activations"),
    Scheme("nf4", "nf4", "none", True, summary="NF4 codebook per group with an abs-max scale (QLoRA), 16-bit activations"),
    Scheme("bf16", "none", "none", False, summary="not quantised"),
]}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise QuantError(f"unknown quantisation scheme {name!r}; accepted: {', '.join(SCHEMES)}") from None
