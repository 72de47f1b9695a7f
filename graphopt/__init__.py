"""graphopt: a compiler-style graph pipeline that makes DeepSeek-V3-family models fast to serve.

Public API: `compile`, `CompiledModel` (`.save(dir)`), `load_compiled(dir)` and the config
dataclasses `SpecConfig`, `QuantConfig`.
Everything else is reachable through the subpackages (`graphopt.models`, `graphopt.passes`, ...).
"""

__version__ = "0.1.0"

__all__ = ["compile", "CompiledModel", "load_compiled", "SpecConfig", "QuantConfig", "__version__"]


def __getattr__(name):
    # imported on first use, so `import graphopt` (and `graphopt --help`) does not import torch
    if name in ("compile", "CompiledModel", "load_compiled"):
        from . import api
        return getattr(api, name)
    if name == "SpecConfig":
        from .spec import SpecConfig
        return SpecConfig
    if name == "QuantConfig":
        from .quant.config import QuantConfig
        return QuantConfig
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
