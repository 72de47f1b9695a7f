"""OptiQuant for graphopt: calibration, smoothing / clipping / HQQ / rotation, W8A8, W4A8, FP8, C8.

Two verbs and the configs:
    qmodel = quantize_model(model, "w8a8")            # or a QuantConfig; eager, on the reference model
    save_quantized(qmodel, "out/"); load_quantized("out/")
    save_msmodelslim(qmodel, "ascend/"); load_msmodelslim("ascend/")   # msModelSlim's (Ascend) layout
and, in `graphopt.compile(model, quant=...)`, the graph passes passes/quant_calibrate.py and
passes/quant_insert.py do the same on the captured graph. docs/quantization.md has the accuracy table.
"""

from .config import (PRESETS, CalibrationConfig, ClippingConfig, FlexSmoothConfig, HadamardConfig, HQQConfig,
                     LearnableClippingConfig, MixedPrecisionConfig, QuantConfig, RTNConfig, SmoothQuantConfig,
                     resolve)
from .formats import load_quantized, save_quantized
from .model_quant import quantize_model, quantized_names
from .msmodelslim import load_msmodelslim
from .msmodelslim_export import save_msmodelslim
from .schemes import SCHEMES, QuantError

__all__ = [
    "PRESETS", "SCHEMES", "CalibrationConfig", "ClippingConfig", "FlexSmoothConfig", "HadamardConfig",
    "HQQConfig", "LearnableClippingConfig", "MixedPrecisionConfig", "QuantConfig", "QuantError", "RTNConfig",
    "SmoothQuantConfig", "load_msmodelslim", "load_quantized", "quantize_model", "quantized_names", "resolve",
    "save_msmodelslim", "save_quantized",
]
